"""Baselines the benchmarks measure against, written from the papers' maths.

They exist to be timed side by side with the library, not to be used.
"""

from __future__ import annotations

import torch


def sequential_recurrence(
    grads: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The static M-FAC algorithm as the paper states it, on ``[blocks, n, b]`` gradients.

    ``F_0 = λ I`` and ``F_i = F_{i−1} + g_i g_iᵀ / n``. Sherman–Morrison gives
    ``F_i⁻¹ = F_{i−1}⁻¹ − h_i h_iᵀ / (n + g_iᵀ h_i)`` with ``h_i = F_{i−1}⁻¹ g_i``,
    and unrolling ``F_{i−1}⁻¹`` expresses every ``h_i`` through the earlier ones:

        h_i = g_i / λ − Σ_{j<i} (h_jᵀ g_i / c_j) h_j,     c_j = n + g_jᵀ h_j.

    Then ``F⁻¹ x = x / λ − Σ_j (h_jᵀ x / c_j) h_j`` and
    ``[F⁻¹]_kk = 1/λ − Σ_j h_jk² / c_j``. Step ``i`` is two matrix-vector
    products with ``H[:i]`` (per block), so the whole is ``n`` sequential
    passes of growing length: O(n² b) per block, like ours, but as GEMVs.
    Returns ``H``, ``c`` and the diagonal.
    """
    blocks, n, _ = grads.shape
    H = torch.empty_like(grads)
    c = torch.empty(blocks, n, dtype=grads.dtype, device=grads.device)
    for i in range(n):
        g = grads[:, i, :]
        coef = torch.bmm(H[:, :i, :], g.unsqueeze(-1)).squeeze(-1) / c[:, :i]
        H[:, i, :] = g / damp - torch.bmm(coef.unsqueeze(1), H[:, :i, :]).squeeze(1)
        c[:, i] = n + (g * H[:, i, :]).sum(-1)
    diagonal = 1 / damp - (H.square() / c.unsqueeze(-1)).sum(1)
    return H, c, diagonal


def sequential_solve(
    H: torch.Tensor, c: torch.Tensor, damp: float, x: torch.Tensor
) -> torch.Tensor:
    """``F⁻¹ x = x / λ − Σ_j (h_jᵀ x / c_j) h_j`` per block, from :func:`sequential_recurrence`;
    ``x`` is ``[blocks, b]``."""
    coef = torch.bmm(H, x.unsqueeze(-1)).squeeze(-1) / c
    return x / damp - torch.bmm(coef.unsqueeze(1), H).squeeze(1)


def woodbury_from_scratch(G: torch.Tensor, damp: float, g: torch.Tensor) -> torch.Tensor:
    """``F⁻¹ g`` with ``K = n λ I + G Gᵀ`` rebuilt and solved every call: O(n² d)."""
    n = G.shape[0]
    K = (G @ G.T).double()
    K.diagonal().add_(n * damp)
    c = torch.linalg.solve(K, (G @ g).double()).to(G.dtype)
    return (g - G.T @ c) / damp
