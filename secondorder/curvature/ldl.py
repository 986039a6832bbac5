r"""LDLᵀ factorisations of small symmetric positive definite matrices, kept
current under low-rank changes in O(n²).

``K = L D Lᵀ`` with ``L`` unit lower triangular and ``D`` a positive vector.

A rank-one change ``K + σ z zᵀ`` (σ = ±1) follows Gill, Golub, Murray and
Saunders (1974), method C1. With ``p = L⁻¹ z`` and the scalars

    1/α_j = σ + Σ_{i<j} p_i² / d_i,    d̄_j = d_j + α_j p_j²,    β_j = α_j p_j / d̄_j,

the new factor is ``L̄ = L + S diag(β)`` where ``S[:, j] = Σ_{i>j} p_i L[:, i]``.
The recurrence for ``α`` is a prefix sum and ``S`` a suffix sum over columns,
so the whole modification is a triangular solve plus two cumulative sums: no
loop over columns. The suffix sum is formed in place as the row total minus the
inclusive prefix sum, ``S[:, j] = C[:, n−1] − C[:, j]`` with ``C = cumsum(L diag(p))``:
one ``n × n`` buffer instead of seven, which made the update 2-4x faster at
n = 1024 to 4096, with the same accuracy after thousands of updates.

Nothing here reads a number back to the host: whether an update stayed positive
definite, and how accurate it is, come back as tensors, for the caller to read
together with whatever else it decides on, in one synchronisation.
"""

from __future__ import annotations

import torch


def ldl_factor(K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ``K = L D Lᵀ``. Raises ``torch.linalg.LinAlgError`` if ``K`` is not positive definite."""
    chol = torch.linalg.cholesky(K)
    root = chol.diagonal()
    # LAPACK hands back a column-major factor; the row-major copy keeps the elementwise
    # work of the up/down-date contiguous (measured 1.7x faster at n = 1024)
    return (chol / root).contiguous(), root.square()


def ldl_solve(L: torch.Tensor, D: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``K⁻¹ b`` for a vector or a ``[n, k]`` matrix ``b``."""
    column = b.dim() == 1
    y = b.unsqueeze(1) if column else b
    y = torch.linalg.solve_triangular(L, y, upper=False, unitriangular=True)
    y = y / D.unsqueeze(1)
    y = torch.linalg.solve_triangular(L.mT, y, upper=True, unitriangular=True)
    return y.squeeze(1) if column else y


def _exclusive_cumsum(v: torch.Tensor, dim: int) -> torch.Tensor:
    shifted = v.narrow(dim, 0, v.shape[dim] - 1)
    return torch.cat([torch.zeros_like(v.narrow(dim, 0, 1)), shifted.cumsum(dim)], dim)


def ldl_rank_one(
    L: torch.Tensor, D: torch.Tensor, z: torch.Tensor, sign: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor of ``L D Lᵀ + sign · z zᵀ`` (sign = +1 or -1). The result is numerically
    positive definite only if every pivot is ``> 0`` (possibly not for sign = -1, and not
    when NaN crept in): the caller checks ``new_D``."""
    p = torch.linalg.solve_triangular(L, z.unsqueeze(1), upper=False, unitriangular=True)[:, 0]
    alpha = 1.0 / (sign + _exclusive_cumsum(p * p / D, 0))
    new_D = D + alpha * p * p
    beta = alpha * p / new_D
    prefix = (L * p).cumsum_(1)
    row_total = prefix[:, -1:].clone()
    new_L = prefix.sub_(row_total).neg_().mul_(beta).add_(L)  # L + S diag(β)
    return new_L, new_D


def ldl_replace_row(
    L: torch.Tensor, D: torch.Tensor, i: int, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor of ``K'`` where ``K'`` differs from ``K = L D Lᵀ`` only in row and
    column ``i``, by ``delta = K'[i] - K[i]``. It failed unless every pivot of the
    result is ``> 0`` (the caller checks, e.g. with :func:`ldl_row_error`, whose error is
    then NaN or large).

    The change is ``e_i vᵀ + v e_iᵀ`` with ``v = delta`` except ``v_i = delta_i / 2``,
    written as ``a aᵀ - b bᵀ`` with ``a, b = (s e_i ± v / s) / √2``; ``s = ‖v‖^½``
    balances the two terms (at least the square root of the smallest normal float, so
    that ``v = 0`` gives ``a = b``, a change of exactly nothing, without asking the host
    whether ``v`` is zero). The update comes first, so the intermediate matrix stays
    positive definite.
    """
    v = delta.clone()
    v[i] *= 0.5
    s = torch.linalg.vector_norm(v).clamp_min_(torch.finfo(v.dtype).tiny).sqrt_()
    a = v / (s * 2**0.5)
    b = -a
    a[i] += s / 2**0.5
    b[i] += s / 2**0.5
    return ldl_rank_one(*ldl_rank_one(L, D, a, 1.0), b, -1.0)


def ldl_row_error(L: torch.Tensor, D: torch.Tensor, K: torch.Tensor, i: int) -> torch.Tensor:
    """Relative error of the factor on row ``i`` and on the diagonal, in O(n²), as a 0-d
    tensor: ``max(‖(L D Lᵀ)[i] - K[i]‖ / ‖K[i]‖, max_k |(L D Lᵀ)_kk - K_kk| / K_kk)``, and
    ``inf`` if a pivot of ``D`` is not ``> 0`` (NaN if NaN crept in)."""
    row = (L[i] * D) @ L.mT
    row_error = torch.linalg.vector_norm(row - K[i]) / torch.linalg.vector_norm(K[i])
    diagonal = (L * L) @ D
    K_diag = K.diagonal()
    diagonal_error = ((diagonal - K_diag).abs() / K_diag).max()
    # a pivot <= 0 (not positive definite) counts as an infinite error
    positive = torch.where(D.min() > 0, 0.0, torch.inf)
    return torch.maximum(row_error, diagonal_error) + positive
