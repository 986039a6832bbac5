r"""The layer-wise Optimal Brain Surgeon sweep shared by SparseGPT and GPTQ.

A linear layer ``Y = W X`` (``W``: ``rows × cols``, ``X``: ``cols × N`` calibration
inputs) is changed so as to keep its outputs: ``‖W X − Ŵ X‖²`` splits into one
quadratic per row, ``(w − ŵ)ᵀ H (w − ŵ) / 2``, all with the same Hessian

    H = (2/N) Σ_t x_t x_tᵀ      (the mean over the ``N`` calibration tokens).

The sweep goes through the columns left to right and freezes each once done, so
all rows share the sequence of sets ``F_j = {j, j+1, …}`` of columns still free.
Setting column ``j`` to new values ``q`` (zero for a pruned weight, a grid point
for a quantized one) while the columns ``F_j`` move to compensate is the OBS step
on the coordinates ``F_j``; the rows of the upper Cholesky factor ``U`` of ``H⁻¹``
(``H⁻¹ = UᵀU``) hold what it needs, ``[H_{F_j}⁻¹]_{j,F_j} = U_jj U_{j,F_j}``:

    err = (w_j − q) / U_jj,        W[:, F_j] −= err ⊗ U_{j,F_j},

which leaves column ``j`` at ``q``. Updates inside a block of ``block_size``
columns are applied at once; those of the columns right of the block are gathered
into one product ``E U_{block, right}`` (the "lazy batch" update): the same
result, GEMM-shaped.

What ``q`` is, the per-column decision, is all a method supplies
(:class:`ColumnDecision`): SparseGPT chooses which weights to remove, GPTQ rounds
to a grid, and both at once prune and quantize in one sweep.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .._checks import check_finite
from ..errors import NotPositiveDefiniteError

__all__ = [
    "ColumnDecision",
    "HessianStatistic",
    "ObsSweep",
    "damped_hessian",
    "upper_cholesky_of_inverse",
]


class HessianStatistic:
    """``H = (2/N) Σ_t x_t x_tᵀ`` over the ``N`` input rows (tokens) seen, summed in float64."""

    def __init__(
        self, features: int, device: torch.device, dtype: torch.dtype, what: str = "the layer"
    ) -> None:
        self.total = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.count = 0
        self.dtype = dtype
        self.what = what

    def add(self, inputs: torch.Tensor) -> None:
        check_finite(inputs, f"the calibration inputs of {self.what}")
        x = inputs.to(self.dtype)
        self.total += (x.T @ x).to(torch.float64)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError(
                f"{self.what} saw no calibration inputs: the model's forward never called it"
            )
        return self.total * (2 / self.count)


def damped_hessian(hessian: torch.Tensor, relative_damp: float) -> torch.Tensor:
    """``H + λI`` in float64, ``λ = relative_damp · mean_j H_jj`` over the live inputs.

    A dead input, zero on every calibration token (``H_jj = 0``), gets ``H_jj = 1``: its
    row and column of ``H`` are zero, so this decouples it, and its value reaches nothing
    but the dead input's own weights. Leaving the dead inputs out of the mean keeps
    ``λ / H`` and so the result unchanged when the inputs are scaled; the references take
    the mean after setting them to 1, which equals this when no input is dead.
    """
    H = hessian.to(torch.float64).clone()
    diagonal = H.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1
    live_mean = float(diagonal[~dead].mean()) if not bool(dead.all()) else 1.0
    diagonal += relative_damp * live_mean
    return H


def upper_cholesky_of_inverse(hessian: torch.Tensor, relative_damp: float) -> torch.Tensor:
    """``U`` upper triangular with ``UᵀU = (H + λI)⁻¹`` (:func:`damped_hessian`), in float64."""
    factor, info = torch.linalg.cholesky_ex(damped_hessian(hessian, relative_damp))
    if int(info) == 0:
        inverse = torch.cholesky_inverse(factor)
        factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0:
        raise NotPositiveDefiniteError(
            f"the damped Hessian of the layer inputs is not positive definite in float64 "
            f"(relative_damp={relative_damp}); raise relative_damp or use more calibration data"
        )
    return factor


class ColumnDecision(Protocol):
    """What a method decides in the sweep: the values each column is set to."""

    def begin_block(self, sweep: ObsSweep, start: int, stop: int) -> None:
        """Called when the sweep reaches the block of columns ``start:stop``."""

    def target(self, sweep: ObsSweep, column: int) -> torch.Tensor:
        """The ``[rows]`` values column ``column`` is set to (its current ones: ``sweep.weights[:, column]``)."""
        ...


class ObsSweep:
    """The lazy block sweep of the module docstring over one ``[rows, cols]`` weight.

    Args:
        weight: the starting weights, copied; computed on in their dtype.
        factor: ``U``, upper triangular with ``UᵀU = (H + λI)⁻¹``
            (:func:`upper_cholesky_of_inverse`), cast to the weights' dtype.
        block_size: columns per block.
    """

    def __init__(self, weight: torch.Tensor, factor: torch.Tensor, block_size: int) -> None:
        self.weights = weight.clone()
        self.factor = factor.to(weight.dtype)
        self.block_size = block_size
        self._start = self._stop = 0
        self._block_start = self.weights[:, :0]

    def at_block_start(self, start: int, stop: int) -> torch.Tensor:
        """The weights of columns ``start:stop`` as they stood when the current block began.

        That is, with the updates of every earlier block (the lazy updates) and
        none of the columns of this block; ``start`` must lie in the current block.
        """
        if not self._start <= start < self._stop:
            raise ValueError(f"column {start} is not in the block {self._start}:{self._stop}")
        inside = self._block_start[:, start - self._start : min(stop, self._stop) - self._start]
        if stop <= self._stop:
            return inside.clone()
        return torch.cat([inside, self.weights[:, self._stop : stop]], dim=1)

    def run(self, decision: ColumnDecision) -> torch.Tensor:
        """Sweep every column, setting each to ``decision.target``; returns the new weights."""
        W, U = self.weights, self.factor
        cols = W.shape[1]
        for start in range(0, cols, self.block_size):
            stop = min(start + self.block_size, cols)
            self._start, self._stop = start, stop
            self._block_start = W[:, start:stop].clone()
            decision.begin_block(self, start, stop)
            W1, U1 = W[:, start:stop], U[start:stop, start:stop]
            errors = torch.zeros_like(W1)
            for i in range(stop - start):
                target = decision.target(self, start + i)
                error = (W1[:, i] - target) / U1[i, i]
                W1[:, i:].addr_(error, U1[i, i:], alpha=-1)  # the OBS step on the columns i..stop
                W1[:, i] = target  # exactly (the step leaves rounding)
                errors[:, i] = error
            W[:, stop:].addmm_(errors, U[start:stop, stop:], alpha=-1)  # lazy: the rest
        return W
