"""Which weights to remove, given a score per weight: the lowest scores go first.

Pure functions on flat or ``[rows, cols]`` tensors. ``alive`` marks the weights
still in the model; only those can be chosen, so pruned weights stay pruned.
"""

from __future__ import annotations

import math

import torch

__all__ = ["count_to_prune", "prune_lowest", "prune_lowest_per_row", "prune_n_m"]


def count_to_prune(sparsity: float, numel: int, pruned: int) -> int:
    """How many more of ``numel`` weights to remove to reach ``sparsity`` (the nearest count).

    A sparsity below 1 always leaves at least one weight: the nearest count of
    ``0.999 * 52`` is 52, which would empty the tensor, so it becomes 51.
    """
    target = math.floor(sparsity * numel + 0.5)
    if sparsity < 1:
        target = min(target, numel - 1)
    return max(0, target - pruned)


def prune_lowest(scores: torch.Tensor, alive: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` alive entries of lowest score (ties: lower index first)."""
    available = int(alive.sum())
    if not 0 <= count <= available:
        raise ValueError(f"cannot remove {count} weights: {available} are left")
    chosen = torch.zeros_like(alive)
    if count:
        order = torch.argsort(scores.masked_fill(~alive, math.inf), stable=True)
        chosen[order[:count]] = True
    return chosen


def prune_lowest_per_row(
    scores: torch.Tensor, alive: torch.Tensor, sparsity: float
) -> torch.Tensor:
    """Each row of ``[rows, cols]`` to ``sparsity``: its lowest-scoring alive weights go.

    Every row ends with the nearest count of zeros (:func:`count_to_prune`, so at
    least one weight stays), counting those already pruned; a row already sparser
    loses nothing. Returns the boolean mask of the alive weights removed.
    """
    zeros = count_to_prune(sparsity, scores.shape[1], 0)
    order = torch.argsort(scores.masked_fill(~alive, -math.inf), dim=1, stable=True)
    removed = torch.zeros_like(alive)
    removed.scatter_(1, order[:, :zeros], True)  # pruned weights first, then the lowest
    return removed & alive


def prune_n_m(scores: torch.Tensor, alive: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M sparsity: at most ``n`` weights left in every group of ``m`` consecutive entries of a row.

    ``scores`` and ``alive`` are ``[rows, cols]`` with ``cols`` a multiple of ``m``.
    Each group keeps its ``n`` highest-scoring alive weights (fewer if fewer are
    alive); returns the boolean mask of the alive weights removed.
    """
    if not 0 <= n <= m:
        raise ValueError(f"N:M sparsity needs 0 <= N <= M, got {n}:{m}")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"rows of {cols} weights cannot be cut into groups of {m}")
    groups = scores.masked_fill(~alive, -math.inf).reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=-1, stable=True)  # pruned weights first, then lowest
    removed = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    removed.scatter_(-1, order[..., : m - n], True)
    return removed.reshape(rows, cols) & alive
