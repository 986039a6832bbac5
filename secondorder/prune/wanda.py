r"""Wanda (Sun et al., 2023): prune by weight magnitude times input norm, per output row, no update.

For a linear layer with calibration inputs ``X`` (``cols × N`` tokens) the score of
``W_ij`` is

    S_ij = |W_ij| · ‖X_j‖₂,

the size of its contribution to the outputs. It is the diagonal approximation of
SparseGPT's saliency: with ``H = X Xᵀ`` replaced by its diagonal,
``w² / [H⁻¹]_jj = w² ‖X_j‖²`` is ``S²``. Weights are compared within their output
row (each row loses the same number), and the weights that stay are not changed.
"""

from __future__ import annotations

import torch

from .._checks import check_finite
from .layerwise import LayerwisePruner
from .masks import prune_lowest_per_row, prune_n_m
from .pruners import _Goal
from .targets import PruneTarget

__all__ = ["InputNormStatistic", "WandaPruner", "wanda_scores"]


class InputNormStatistic:
    """``‖X_j‖₂²``: the sum over every input row (token) seen of each feature squared, in float64."""

    def __init__(self, features: int, device: torch.device, what: str = "the layer") -> None:
        self.sum_of_squares = torch.zeros(features, dtype=torch.float64, device=device)
        self.count = 0
        self.what = what

    def add(self, inputs: torch.Tensor) -> None:
        check_finite(inputs, f"the calibration inputs of {self.what}")
        self.sum_of_squares += inputs.to(torch.float64).square().sum(0)
        self.count += inputs.shape[0]

    def norms(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError(
                f"{self.what} saw no calibration inputs: the model's forward never called it"
            )
        return self.sum_of_squares.sqrt()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| · ‖X_j‖₂`` for a ``[rows, cols]`` weight and the ``[cols]`` input norms."""
    return weight.abs().to(input_norms.dtype) * input_norms


class WandaPruner(LayerwisePruner[InputNormStatistic]):
    """Wanda (Sun et al., 2023): remove the weights of lowest ``|W_ij| · ‖X_j‖₂`` in each output row.

    ``‖X_j‖₂`` is the norm of input feature ``j`` over every calibration token that
    reaches the layer (the earlier blocks already pruned). Unstructured sparsity
    removes the nearest count from every row (:func:`~.masks.prune_lowest_per_row`);
    N:M compares the ``m`` weights of each group of a row. The kept weights are
    not changed.

    Args:
        model: the model; pruned in place.
        data: calibration batches (see :class:`~.layerwise.LayerwisePruner`).
        params: ``nn.Linear`` weights to prune; ``None`` for all but the output layer.
        device, offload_activations, sequential: where blocks are pruned, where
            their cached inputs are kept, and the calibration (see
            :class:`~.layerwise.LayerwisePruner`).
        progress: show a progress bar over the blocks of the model.

    ``prune(n_m=(n, m))`` keeps ``n`` weights of every ``m`` (the reference's
    ``prune_n``/``prune_m`` count the weights removed).
    """

    method = "Wanda"

    def _statistic(self, target: PruneTarget) -> InputNormStatistic:
        return InputNormStatistic(target.parameter.shape[1], self.device, what=target.qualname)

    def _layer_bytes(self, target: PruneTarget) -> tuple[int, int]:
        rows, cols = target.parameter.shape
        # the norms; to prune: float64 scores, int64 sort order, masks, the new weights
        return 8 * cols, rows * cols * (8 + 8 + 3 + 4)

    def _prune_layer(
        self, target: PruneTarget, statistic: InputNormStatistic, goal: _Goal
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight, alive = target.weight(), target.mask()
        scores = wanda_scores(weight, statistic.norms())
        if goal.sparsity is None:
            removed = prune_n_m(scores, alive, goal.n, goal.m)
        else:
            removed = prune_lowest_per_row(scores, alive, goal.sparsity)
        kept = alive & ~removed
        return weight.masked_fill(~kept, 0), kept
