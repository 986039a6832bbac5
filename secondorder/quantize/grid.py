r"""Uniform integer grids for weights: min-max scales and zero points per output row and group.

A ``bits``-bit grid has the codes ``0 … maxq`` (``maxq = 2^bits − 1``); code ``c``
stands for ``scale · (c − zero)``. For a group of weights ``x`` (one row's weights in
a group of input columns) the min-max grid spans ``[min(x, 0), max(x, 0)]``:

    asymmetric:  scale = (x_max − x_min) / maxq,   zero = round(−x_min / scale),
    symmetric:   scale = 2 m / maxq,  m = max |x|,  zero = (maxq + 1) / 2,

(a group of zeros gets the range ``[−1, 1]``), and ``x`` is rounded to the nearest
code, ``c = clamp(round(x / scale) + zero, 0, maxq)``. Zero is a grid point: a
pruned weight stays exactly zero. This is the grid of GPTQ's reference (``quant.py``
of IST-DASLab/gptq), except that a symmetric group with no negative weight gets the
range ``[−m, m]`` (the reference keeps ``[0, m]`` and clips its upper half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .._checks import check_positive_int

if TYPE_CHECKING:
    from ..prune.obs_sweep import ObsSweep

__all__ = ["GroupQuantizer", "QuantizedWeight", "dequantize_codes", "minmax_grid", "round_to_grid"]


def minmax_grid(
    weights: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)``, each ``[rows]``, of the min-max grid of each row of ``weights`` (``[rows, k]``)."""
    maxq = 2**bits - 1
    low = weights.amin(dim=1).clamp(max=0)
    high = weights.amax(dim=1).clamp(min=0)
    if symmetric:
        high = torch.maximum(-low, high)
        low = -high
    empty = (low == 0) & (high == 0)
    low, high = low.masked_fill(empty, -1), high.masked_fill(empty, 1)
    scale = (high - low) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-low / scale)
    return scale, zero


def round_to_grid(
    values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """The codes ``clamp(round(values / scale) + zero, 0, 2^bits − 1)``, in ``values``' dtype."""
    return torch.clamp(torch.round(values / scale) + zero, 0, 2**bits - 1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale · (codes − zero)``: the values the codes stand for, in ``scale``'s dtype."""
    return scale * (codes.to(scale.dtype) - zero)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized ``[rows, cols]`` weight: integer codes and the grid of each row and group.

    Column ``c`` belongs to group ``g(c) = k(c) // group_size``, where ``k(c)`` is its
    position in the quantization order: ``perm`` (``perm[k]`` is the column quantized
    ``k``-th; act-order) or the natural order when ``perm`` is ``None``. Weight
    ``(r, c)`` is ``scales[r, g(c)] · (codes[r, c] − zeros[r, g(c)])`` (:meth:`dequantize`).

    Attributes:
        codes: ``[rows, cols]`` uint8, in ``0 … 2^bits − 1``.
        scales: ``[rows, groups]`` floating point.
        zeros: ``[rows, groups]`` uint8 zero points (a code standing for 0).
        group_size: columns per group; ``-1`` for one group per row.
        bits: bits per code.
        symmetric: whether the zero points are all ``2^(bits−1)``.
        perm: ``[cols]`` order in which the columns were quantized, or ``None``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    bits: int
    symmetric: bool
    perm: torch.Tensor | None = None

    def group_index(self) -> torch.Tensor:
        """``[cols]``: the group of each column (``g_idx`` in GPTQ's packed formats)."""
        cols = self.codes.shape[1]
        size = cols if self.group_size == -1 else self.group_size
        position = torch.arange(cols, device=self.codes.device)
        if self.perm is not None:
            position = torch.argsort(self.perm)
        return position // size

    def dequantize(self) -> torch.Tensor:
        """The ``[rows, cols]`` weights the codes stand for, in the scales' dtype."""
        groups = self.group_index()
        return dequantize_codes(self.codes, self.scales[:, groups], self.zeros[:, groups])


class GroupQuantizer:
    """Rounds each column, as the sweep reaches it, onto the grid of its group (GPTQ's decision).

    Columns are taken in the sweep's order, in groups of ``group_size`` (``-1``:
    one group of all columns). A group's grid is the min-max grid
    (:func:`minmax_grid`) of its weights when the sweep reaches the block of its
    first column (the updates of the earlier blocks included, not those of the
    earlier columns of the same block: the rule of GPTQ's reference, which makes
    the grids of groups that start inside a block depend on ``block_size``), the
    weights already removed (``kept`` false) counting as zero. A removed weight is
    set to 0.

    Args:
        rows, cols: the weight's shape.
        bits: bits per code, 2 to 8.
        group_size: columns per group, or ``-1``.
        symmetric: symmetric grids (zero point ``2^(bits−1)``).
        dtype, device: of the scales (the weights' compute dtype).
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        *,
        bits: int,
        group_size: int,
        symmetric: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        check_quantization(bits, group_size)
        self.bits, self.symmetric = bits, symmetric
        self.group_size = cols if group_size == -1 else group_size
        groups = math.ceil(cols / self.group_size)
        self.scales = torch.ones(rows, groups, dtype=dtype, device=device)
        self.zeros = torch.zeros(rows, groups, dtype=dtype, device=device)
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=device)
        self._requested_group_size = group_size

    def quantize_column(self, sweep: ObsSweep, column: int, kept: torch.Tensor) -> torch.Tensor:
        """The grid values of ``column`` of the sweep's current weights (0 where ``kept`` is false).

        At the first column of a group, the group's grid is found first, on the
        group's weights as they stood when the sweep's block began
        (``sweep.at_block_start``). ``kept`` is ``[rows, cols]`` boolean.
        """
        group = column // self.group_size
        if column % self.group_size == 0:
            end = min(column + self.group_size, self.codes.shape[1])
            weights = sweep.at_block_start(column, end).masked_fill(~kept[:, column:end], 0)
            self.scales[:, group], self.zeros[:, group] = minmax_grid(
                weights, self.bits, self.symmetric
            )
        scale, zero = self.scales[:, group], self.zeros[:, group]
        values = sweep.weights[:, column].masked_fill(~kept[:, column], 0)
        codes = round_to_grid(values, scale, zero, self.bits)
        self.codes[:, column] = codes.to(torch.uint8)
        return dequantize_codes(codes, scale, zero)

    def record(self, perm: torch.Tensor | None = None) -> QuantizedWeight:
        """The codes and grids found, as a :class:`QuantizedWeight` in the original column order."""
        codes = self.codes
        if perm is not None:
            codes = torch.empty_like(codes)
            codes[:, perm] = self.codes
        return QuantizedWeight(
            codes=codes,
            scales=self.scales.clone(),
            zeros=self.zeros.to(torch.uint8),
            group_size=self._requested_group_size,
            bits=self.bits,
            symmetric=self.symmetric,
            perm=perm,
        )


def check_quantization(bits: int, group_size: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is in 2…8 and ``group_size`` positive or ``-1``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    if group_size != -1:
        check_positive_int(group_size, "group_size")
