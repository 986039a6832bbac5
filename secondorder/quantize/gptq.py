r"""GPTQ (Frantar et al., 2023): each linear layer rounded to a grid, column by column, with OBS compensation.

GPTQ is the sweep of :mod:`secondorder.prune.obs_sweep` with the decision "round
column ``j`` onto the grid of its group" (:class:`~.grid.GroupQuantizer`): the
rounding error ``(w_j − q) / U_jj`` is spread over the columns not yet quantized
through the Cholesky factor ``U`` of ``(H + λI)⁻¹``, ``H = (2/N) Σ x xᵀ`` over the
calibration tokens. As in the authors' reference (IST-DASLab/gptq):

- ``λ`` is ``relative_damp`` (1%) of the mean diagonal of ``H``; an input that is
  zero on every token (``H_jj = 0``) gets ``H_jj = 1`` and its weights are set to 0;
- a group's grid is the min-max grid of its weights when the sweep reaches the
  block of ``block_size`` columns that holds its first column (the updates of the
  earlier blocks included, not those of the same block's earlier columns), one
  group per row when ``group_size = -1``. A group that starts inside a block thus
  depends on ``block_size``; with ``group_size`` a multiple of it, none does;
- with ``act_order`` the columns are swept by decreasing ``H_jj`` (the inputs of
  largest energy first, while the most columns are free to compensate), and groups
  are consecutive in that order.

One difference, on purpose: the reference finds per-row grids (``group_size = -1``)
before it zeroes the weights of dead inputs, which then widen the range for nothing;
here they are zeroed first. ``docs/benchmarks.md`` has the side-by-side numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .._checks import check_positive_int
from ..prune.layerwise import HessianLayerwise
from ..prune.obs_sweep import HessianStatistic, ObsSweep, upper_cholesky_of_inverse
from ..prune.pruners import _Goal, _non_negative
from ..prune.targets import ParamSpec, PruneTarget
from .grid import GroupQuantizer, QuantizedWeight, check_quantization

__all__ = ["GPTQQuantizer", "act_order_permutation", "gptq_quantize"]


class _RoundColumns:
    """GPTQ's decision: every column onto its group's grid, removed weights held at 0."""

    def __init__(self, quantizer: GroupQuantizer, kept: torch.Tensor) -> None:
        self.quantizer, self.kept = quantizer, kept

    def begin_block(self, sweep: ObsSweep, start: int, stop: int) -> None:
        pass

    def target(self, sweep: ObsSweep, column: int) -> torch.Tensor:
        return self.quantizer.quantize_column(sweep, column, self.kept)


def act_order_permutation(hessian: torch.Tensor) -> torch.Tensor:
    """The columns by decreasing ``H_jj`` (a dead input, ``H_jj = 0``, counted as 1), ties in order."""
    diagonal = hessian.diagonal().masked_fill(hessian.diagonal() == 0, 1)
    return torch.argsort(diagonal, descending=True, stable=True)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    alive: torch.Tensor | None = None,
    *,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    act_order: bool = False,
    block_size: int = 128,
    relative_damp: float = 0.01,
) -> QuantizedWeight:
    """GPTQ on one ``[rows, cols]`` weight with input Hessian ``hessian`` (see the module docstring).

    Args:
        weight: the layer's weights; computed on in their dtype (float32 for half
            precision), with the factor ``U`` formed in float64.
        hessian: ``[cols, cols]``, ``H = (2/N) X Xᵀ`` (any positive scale).
        alive: ``[rows, cols]`` boolean, the weights not pruned (default all): pruned
            weights stay exactly 0, the others compensating.
        bits: bits per weight, 2 to 8.
        group_size: input columns sharing a grid, or ``-1`` for one grid per row.
        symmetric: grids symmetric about 0 (see :mod:`.grid`).
        act_order: sweep the columns by decreasing ``H_jj``.
        block_size: columns per lazy block; it changes only the grids of groups that
            start inside a block (see the module docstring).
        relative_damp: ``λ`` as a fraction of the mean diagonal of ``H``.

    Returns:
        The codes and grids; ``.dequantize()`` gives the new weights.

    Raises:
        ValueError: on shapes or settings out of range.
        NotPositiveDefiniteError: when ``H + λI`` cannot be factorised.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"weight must be [rows, cols] and hessian [cols, cols], got {tuple(weight.shape)} "
            f"and {tuple(hessian.shape)}"
        )
    check_quantization(bits, group_size)
    block_size = check_positive_int(block_size, "block_size")
    rows, cols = weight.shape
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    kept = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    if alive is not None:
        kept &= alive
    kept &= hessian.diagonal() != 0  # the weights of a dead input do nothing: zero them
    perm = act_order_permutation(hessian) if act_order else None
    W = weight.to(compute)
    if perm is not None:
        W, kept, hessian = W[:, perm], kept[:, perm], hessian[perm][:, perm]
    factor = upper_cholesky_of_inverse(hessian, relative_damp)
    quantizer = GroupQuantizer(
        rows, cols, bits=bits, group_size=group_size, symmetric=symmetric,
        dtype=compute, device=weight.device,
    )  # fmt: skip
    ObsSweep(W.masked_fill(~kept, 0), factor, block_size).run(_RoundColumns(quantizer, kept))
    return quantizer.record(perm)


class _GPTQLayers(HessianLayerwise):
    """The layer-wise base (calibration block by block) with GPTQ as the per-layer step."""

    method = "GPTQ"
    bytes_per_weight = 3  # and the codes

    def __init__(self, model: nn.Module, data: Iterable[Any], settings: dict, **base: Any) -> None:
        super().__init__(model, data, **base)
        self.settings = settings
        self.quantized: dict[str, QuantizedWeight] = {}

    def _prune_layer(
        self, target: PruneTarget, statistic: HessianStatistic, goal: _Goal
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kept = target.mask()
        record = gptq_quantize(
            target.weight().to(self._dtype), statistic.hessian(), kept, **self.settings
        )
        self.quantized[target.qualname] = record
        return record.dequantize(), kept


class GPTQQuantizer:
    """GPTQ on every ``nn.Linear`` of a model (but the output layer), block after block.

    Calibration is that of :class:`~secondorder.prune.SparseGPTPruner` (the same
    layer-wise base): each block's layers see the outputs of the blocks before it,
    already quantized; each layer is quantized by :func:`gptq_quantize`.
    :meth:`quantize` replaces every weight by its dequantized value and keeps the
    codes and grids in :attr:`quantized` (by qualified name), for saving and export.
    A weight pruned before (``torch.nn.utils.prune`` masks, e.g. by SparseGPT)
    stays exactly zero and keeps its mask.

    Args:
        model: the model; quantized in place.
        data: re-iterable of calibration batches (see :class:`~secondorder.prune.LayerwisePruner`).
        bits: bits per weight, 2 to 8.
        group_size: input columns sharing a grid (``-1``: one grid per output row).
        symmetric: grids symmetric about 0.
        act_order: quantize the input columns by decreasing ``H_jj``.
        relative_damp: ``λ = relative_damp · mean diag(H)`` over the inputs that are not
            always zero (``>= 0``).
        block_size: columns per lazy block (see :func:`gptq_quantize`).
        params: ``nn.Linear`` weights to quantize; ``None`` for all but the output layer.
        device: where each block is calibrated and quantized, one at a time (``None``:
            where the weights are).
        offload_activations: keep the cached inputs of the blocks on the CPU.
        progress: show a progress bar over the blocks of the model.

    Raises:
        ValueError: on settings out of range or weights that are not ``nn.Linear``.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        *,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = False,
        act_order: bool = False,
        relative_damp: float = 0.01,
        block_size: int = 128,
        params: Iterable[ParamSpec] | None = None,
        device: torch.device | str | None = None,
        offload_activations: bool = False,
        progress: bool = True,
    ) -> None:
        check_quantization(bits, group_size)
        settings = {
            "bits": bits,
            "group_size": group_size,
            "symmetric": bool(symmetric),
            "act_order": bool(act_order),
            "block_size": check_positive_int(block_size, "block_size"),
            "relative_damp": _non_negative(relative_damp, "relative_damp"),
        }
        base: dict[str, Any] = {"params": params, "progress": progress, "device": device,
                                "offload_activations": offload_activations}  # fmt: skip
        self._layers = _GPTQLayers(model, data, settings, **base)
        self.model = model
        self.settings = settings

    @property
    def quantized(self) -> dict[str, QuantizedWeight]:
        """The codes and grids of every weight quantized so far, by qualified name."""
        return self._layers.quantized

    def quantize(self) -> dict[str, QuantizedWeight]:
        """Quantize every target weight in place; returns :attr:`quantized`.

        On any error (bad data, a Hessian that cannot be factorised, memory) the
        model is restored to what it was before the call.
        """
        targets = self._layers.targets
        saved = [target.snapshot() for target in targets]
        try:
            self._layers._prune_step(_Goal())
        except BaseException:
            for target, state in zip(targets, saved, strict=True):
                target.restore(state)
            self._layers.quantized.clear()
            raise
        for target, (_, mask) in zip(targets, saved, strict=True):
            if mask is None:  # not pruned before: drop the all-ones mask the base added
                torch_prune.remove(target.module, target.name)
        return self.quantized
