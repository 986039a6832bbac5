r"""SparseGPT (Frantar and Alistarh, 2023): Optimal Brain Surgeon per linear layer, column by column.

A linear layer ``Y = W X`` (``W``: ``rows × cols``, ``X``: ``cols × N`` calibration
inputs) is pruned to keep its outputs: ``‖W X − Ŵ X‖²`` splits into one quadratic
per row, ``(w − ŵ)ᵀ H (w − ŵ) / 2``, all with the same Hessian

    H = (2/N) Σ_t x_t x_tᵀ      (the mean over the ``N`` calibration tokens).

For one row, removing weight ``q`` while the weights in the set ``F`` may still
move is the single-weight Optimal Brain Surgeon step of :mod:`.obs` with ``F``
playing the Fisher's part, on the coordinates ``F``:

    δw_F = −(w_q / [H_F⁻¹]_qq) [H_F⁻¹]_{F,q},     ρ_q = w_q² / (2 [H_F⁻¹]_qq).

SparseGPT goes through the columns left to right and freezes each once done,
so that all rows share the sequence of sets ``F_j = {j, j+1, …}``. The rows of
the upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) hold exactly the
inverses this needs: ``[H_{F_j}⁻¹]_{j,F_j} = U_jj U_{j,F_j}``, so column ``j`` is
handled by

    err = w_j / U_jj on the rows where ``w_j`` is removed (0 elsewhere),
    W[:, F_j] −= err ⊗ U_{j,F_j},

which zeroes the removed entries of column ``j`` and compensates with the columns
to its right. The mask of a block of ``block_size`` columns is chosen when the
block is reached, by the saliency ``w² / U_jj²`` (:func:`~.obs.obs_saliency`
with ``[H_F⁻¹]_jj = U_jj²``), over all rows at once: an unstructured sparsity
is spread unevenly over the rows. N:M patterns are chosen per group of ``m``
columns when the group is reached. Updates inside a block are applied at once;
those of the columns to the right of the block are gathered into one product
``E U_{block, right}`` ("lazy batch" updates): the same result, GEMM-shaped.
The sweep is :class:`~.obs_sweep.ObsSweep`, shared with GPTQ
(:mod:`secondorder.quantize`); SparseGPT supplies only the choice of the mask.

With ``bits``, the kept weights are also rounded onto ``bits``-bit grids in the same
sweep (the paper's joint sparsification and quantization): column ``j`` goes to
``q = quant(w_j ⊙ m_j)`` and the error ``(w_j − q) / U_jj`` of both the removal and
the rounding is compensated by the columns to its right.

The result is not the least-squares optimum for its mask: a kept weight left of
a removed one is frozen before the removal is known, so it cannot help
compensate. How much that costs depends on how correlated the input features
are: on 8-column layers at 50% (float64, ten seeds) the output error was within
0.5% of the optimum for its mask with independent features, and with strongly
correlated ones a median 1.35x to 1.57x, at worst 3.7x, the optimum (the
inputs of ``tests/test_prune_sparsegpt.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._checks import check_positive_int
from .layerwise import HessianLayerwise
from .masks import count_to_prune, prune_lowest, prune_n_m
from .obs import obs_saliency
from .obs_sweep import HessianStatistic, ObsSweep, upper_cholesky_of_inverse
from .pruners import _Goal, _non_negative
from .targets import ParamSpec, PruneTarget

if TYPE_CHECKING:
    from ..quantize.grid import GroupQuantizer, QuantizedWeight

__all__ = ["HessianStatistic", "SparseGPTPruner", "sparsegpt_prune", "upper_cholesky_of_inverse"]


class _PruneColumns:
    """SparseGPT's decision: which weights of a column to remove (then, optionally, round the rest).

    The mask of a block is chosen when the block is reached (unstructured), or of
    a group of ``m`` columns when the group is reached (N:M), by the saliency
    ``w² / U_jj²`` at the current weights; a removed weight goes to 0 and, with a
    quantizer, a kept one to the grid of its group (SparseGPT's joint mode).
    """

    def __init__(
        self,
        kept: torch.Tensor,
        factor: torch.Tensor,
        dead: torch.Tensor,
        *,
        total: int,
        n_m: tuple[int, int] | None,
        quantizer: GroupQuantizer | None,
    ) -> None:
        self.kept, self.dead, self.total, self.n_m = kept, dead, total, n_m
        self.inverse_diagonal = factor.diagonal().square()
        self.quantizer = quantizer

    def saliency(self, columns: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        scores = obs_saliency(columns, self.inverse_diagonal[start:stop])
        return scores.masked_fill(self.dead[start:stop], 0)

    def begin_block(self, sweep: ObsSweep, start: int, stop: int) -> None:
        if self.n_m is not None:
            return
        cols = self.kept.shape[1]
        kept = self.kept[:, start:stop]
        due = (self.total * stop + cols // 2) // cols - int((~self.kept[:, :stop]).sum())
        count = max(0, min(due, int(kept.sum())))
        scores = self.saliency(sweep.weights[:, start:stop], start, stop)
        kept &= ~prune_lowest(scores.flatten(), kept.flatten(), count).reshape(kept.shape)

    def target(self, sweep: ObsSweep, column: int) -> torch.Tensor:
        if self.n_m is not None and column % self.n_m[1] == 0:
            group = slice(column, column + self.n_m[1])
            scores = self.saliency(sweep.weights[:, group], group.start, group.stop)
            self.kept[:, group] &= ~prune_n_m(scores, self.kept[:, group], *self.n_m)
        if self.quantizer is not None:
            return self.quantizer.quantize_column(sweep, column, self.kept)
        return sweep.weights[:, column].masked_fill(~self.kept[:, column], 0)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    alive: torch.Tensor | None = None,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    relative_damp: float = 0.01,
    bits: int | None = None,
    group_size: int = 128,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one ``[rows, cols]`` weight with input Hessian ``hessian`` (see the module docstring).

    Args:
        weight: the layer's weights; computed on in their dtype (float32 for half
            precision), with the factor ``U`` formed in float64.
        hessian: ``[cols, cols]``, ``H = (2/N) X Xᵀ``. Any positive multiple gives
            the same result (up to rounding): the damping is relative to the mean
            diagonal over the live inputs (:func:`~.obs_sweep.damped_hessian`), and
            inputs that are always zero are decoupled, whatever the scale.
        alive: ``[rows, cols]`` boolean, the weights not pruned yet (default all).
            Pruned weights stay pruned: they are held at zero, the other weights
            compensating, and count towards the sparsity.
        sparsity: fraction of zeros in the layer (nearest count, at least one
            weight kept); each block of columns gets its share, ``round(total ·
            stop / cols)`` zeros up to its last column ``stop``.
        n_m: ``(n, m)``: at most ``n`` weights kept in every group of ``m`` columns
            of a row; ``block_size`` must be a multiple of ``m``.
        block_size: columns per block (mask choice and lazy update).
        relative_damp: ``λ`` as a fraction of the mean diagonal of ``H``.
        bits: also quantize the kept weights, in the same sweep, to ``bits``-bit
            grids (:mod:`secondorder.quantize.grid`); ``None``: no quantization.
        group_size: with ``bits``, input columns per grid (``-1``: one per row).
        symmetric: with ``bits``, grids symmetric about 0.

    Returns the new weights (zero where removed) and the mask of kept weights.
    """
    pruned, kept, _ = sparsegpt_sweep(
        weight, hessian, alive, sparsity=sparsity, n_m=n_m, block_size=block_size,
        relative_damp=relative_damp, bits=bits, group_size=group_size, symmetric=symmetric,
    )  # fmt: skip
    return pruned, kept


def sparsegpt_sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    alive: torch.Tensor | None = None,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    relative_damp: float = 0.01,
    bits: int | None = None,
    group_size: int = 128,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight | None]:
    """:func:`sparsegpt_prune`, also returning the codes and grids when ``bits`` is given."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"weight must be [rows, cols] and hessian [cols, cols], got {tuple(weight.shape)} "
            f"and {tuple(hessian.shape)}"
        )
    if (sparsity is None) == (n_m is None):
        raise ValueError("give exactly one of sparsity and n_m")
    block_size = check_positive_int(block_size, "block_size")
    if n_m is not None and block_size % n_m[1]:
        raise ValueError(f"block_size {block_size} is not a multiple of m = {n_m[1]}")
    rows, cols = weight.shape
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    kept = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    if alive is not None:
        kept &= alive
    factor = upper_cholesky_of_inverse(hessian, relative_damp).to(compute)
    quantizer = None
    if bits is not None:
        from ..quantize.grid import GroupQuantizer  # the grids live with GPTQ

        quantizer = GroupQuantizer(
            rows, cols, bits=bits, group_size=group_size, symmetric=symmetric,
            dtype=compute, device=weight.device,
        )  # fmt: skip
    decision = _PruneColumns(
        kept,
        factor,
        hessian.diagonal() == 0,  # inputs that are always zero: their weights do nothing
        total=0 if sparsity is None else count_to_prune(sparsity, rows * cols, 0),
        n_m=n_m,
        quantizer=quantizer,
    )
    W = weight.to(compute).masked_fill(~kept, 0)
    pruned = ObsSweep(W, factor, block_size).run(decision)
    return pruned.to(weight.dtype), kept, None if quantizer is None else quantizer.record()


class SparseGPTPruner(HessianLayerwise):
    """SparseGPT (Frantar and Alistarh, 2023): per-layer OBS on the inputs' Hessian (:func:`sparsegpt_prune`).

    Each ``nn.Linear`` is pruned to keep its outputs on the calibration data:
    ``H = (2/N) Σ x xᵀ`` over every token that reaches it (with the earlier blocks
    already pruned), damped by ``relative_damp`` times its mean diagonal (SparseGPT's
    percentage damping, as ``relative_damp`` in :class:`MFACPruner`), and the
    columns pruned left to right with the OBS step through the Cholesky factor of
    ``H⁻¹``, masks chosen per block of ``block_size`` columns.

    ``prune(..., bits=4)`` also quantizes the kept weights in the same sweep
    (SparseGPT's joint mode): every kept weight lands on the ``bits``-bit grid of its
    row and group of columns, the pruned ones stay exactly 0, and the codes and
    grids are kept in :attr:`quantized` (:class:`~secondorder.quantize.QuantizedWeight`).

    Args:
        model: the model; pruned in place.
        data: calibration batches (see :class:`~.layerwise.LayerwisePruner`).
        params: ``nn.Linear`` weights to prune; ``None`` for all but the output layer.
        block_size: columns per block: the mask of a block is chosen when the block
            is reached, and updates to the right of it are applied once per block.
        relative_damp: ``λ = relative_damp · mean diag(H)`` over the inputs that
            are not always zero (``>= 0``).
        device, offload_activations, sequential: where blocks are pruned, where
            their cached inputs are kept, and the calibration (see
            :class:`~.layerwise.LayerwisePruner`).
        progress: show a progress bar over the blocks of the model.

    ``prune(n_m=(n, m))`` keeps ``n`` weights of every ``m`` (the reference's
    ``prunen``/``prunem`` count the weights removed).
    """

    method = "SparseGPT"

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        *,
        params: Iterable[ParamSpec] | None = None,
        block_size: int = 128,
        relative_damp: float = 0.01,
        device: torch.device | str | None = None,
        offload_activations: bool = False,
        sequential: bool = True,
        progress: bool = True,
    ) -> None:
        self.block_size = check_positive_int(block_size, "block_size")
        self.relative_damp = _non_negative(relative_damp, "relative_damp")
        super().__init__(
            model, data, params=params, device=device, offload_activations=offload_activations,
            sequential=sequential, progress=progress,
        )  # fmt: skip
        #: codes and grids of the weights quantized by ``prune(..., bits=...)``, by name
        self.quantized: dict[str, QuantizedWeight] = {}
        self._quantization: dict[str, Any] = {}

    def prune(
        self,
        sparsity: float | None = None,
        *,
        n_m: tuple[int, int] | None = None,
        recompute_steps: int | None = None,
        bits: int | None = None,
        group_size: int = 128,
        symmetric: bool = False,
    ) -> float:
        """:meth:`Pruner.prune`; with ``bits``, the kept weights are quantized in the same sweep.

        Args:
            sparsity, n_m, recompute_steps: as for :meth:`Pruner.prune`.
            bits: bits per kept weight (2 to 8), on grids found as GPTQ's
                (:class:`~secondorder.quantize.GroupQuantizer`); ``None``: no quantization.
            group_size: with ``bits``, input columns per grid (``-1``: one per row).
            symmetric: with ``bits``, grids symmetric about 0.

        Raises:
            ValueError: on bad settings, or ``bits`` with more than one step.
        """
        if bits is not None:
            from ..quantize.grid import check_quantization  # the grids live with GPTQ

            check_quantization(bits, group_size)
            if recompute_steps not in (None, 1):
                raise ValueError("bits quantizes in one sweep: recompute_steps must be 1")
            self._quantization = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
        before = dict(self.quantized)
        try:
            return super().prune(sparsity, n_m=n_m, recompute_steps=recompute_steps)
        except BaseException:
            self.quantized = before  # the model is restored: so are its records
            raise
        finally:
            self._quantization = {}

    def _plan(self, sparsity: float | None, n_m: tuple[int, int] | None, steps: int) -> list[_Goal]:
        goals = super()._plan(sparsity, n_m, steps)
        for goal in goals:
            if goal.sparsity is None and self.block_size % goal.m:
                raise ValueError(
                    f"N:M groups of {goal.m} columns must not straddle two blocks: "
                    f"block_size={self.block_size} is not a multiple of {goal.m}"
                )
        return goals

    def _prune_layer(
        self, target: PruneTarget, statistic: HessianStatistic, goal: _Goal
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight, kept, record = sparsegpt_sweep(
            target.weight().to(self._dtype),
            statistic.hessian(),
            target.mask(),
            sparsity=goal.sparsity,
            n_m=None if goal.sparsity is not None else (goal.n, goal.m),
            block_size=self.block_size,
            relative_damp=self.relative_damp,
            **self._quantization,
        )
        if record is not None:
            self.quantized[target.qualname] = record
        return weight, kept
