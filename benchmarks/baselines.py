"""Baselines the benchmarks measure against, written from the papers' maths.

They exist to be timed side by side with the library, not to be used.
"""

from __future__ import annotations

import torch


def sequential_static_mfac(grads: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The static M-FAC precomputation as the paper states it: n dependent GEMV rounds.

    With ``F_0 = λ I`` and ``F_i = F_{i-1} + g_i g_iᵀ / n``, Sherman-Morrison gives
    ``F_i⁻¹ = F_{i-1}⁻¹ − h_i h_iᵀ / (n + g_iᵀ h_i)`` with ``h_i = F_{i-1}⁻¹ g_i``, so

        h_i = g_i / λ − Σ_{j<i} (h_jᵀ g_i / d_j) h_j,      d_i = n + g_iᵀ h_i,

    after which ``F⁻¹ x = x / λ − Σ_j (h_jᵀ x / d_j) h_j``. Returns ``(H, d)``.
    """
    n, _ = grads.shape
    H = torch.empty_like(grads)
    denom = torch.empty(n, dtype=grads.dtype, device=grads.device)
    for i in range(n):
        g = grads[i]
        h = g / damp
        if i:
            coefficients = (H[:i] @ g) / denom[:i]
            h = h - coefficients @ H[:i]
        H[i] = h
        denom[i] = n + g @ h
    return H, denom


def sequential_static_solve(H: torch.Tensor, denom: torch.Tensor, damp: float, x: torch.Tensor):
    """``F⁻¹ x`` from :func:`sequential_static_mfac`'s output."""
    return x / damp - ((H @ x) / denom) @ H


def woodbury_from_scratch(G: torch.Tensor, damp: float, g: torch.Tensor) -> torch.Tensor:
    """``F⁻¹ g`` with ``K = n λ I + G Gᵀ`` rebuilt and solved every call: O(n² d)."""
    n = G.shape[0]
    K = (G @ G.T).double()
    K.diagonal().add_(n * damp)
    c = torch.linalg.solve(K, (G @ g).double()).to(G.dtype)
    return (g - G.T @ c) / damp
