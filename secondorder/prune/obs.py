r"""Optimal Brain Surgeon on an inverse empirical Fisher: the maths, without models or data.

Around trained weights ``w`` the loss grows as ``½ δwᵀ F δw`` for a curvature
``F`` (here the damped empirical Fisher). Removing weight ``q`` means the
constraint ``e_qᵀ (w + δw) = 0``; the cheapest ``δw`` under it and its cost are

    δw = −(w_q / [F⁻¹]_qq) F⁻¹ e_q,        ρ_q = w_q² / (2 [F⁻¹]_qq)   (the saliency),

and indeed ``w_q + δw_q = 0`` and ``ρ_q = ½ δwᵀ F δw``. Removing a set ``Q`` at
once, the M-FAC / WoodFisher step sums the single-weight updates,

    δw = −Σ_{q∈Q} (w_q / [F⁻¹]_qq) F⁻¹ e_q = F⁻¹ v,   v_q = −w_q / [F⁻¹]_qq on Q, 0 elsewhere,

one product with ``F⁻¹`` for any number of weights. It neglects the
interactions between the removed weights (the exact step needs ``([F⁻¹]_QQ)⁻¹``),
so ``w_Q`` is set to zero after adding ``δw``; removing weights in several smaller
steps, with ``F`` re-estimated in between, keeps that error small.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["obs_saliency", "obs_update", "relative_damping"]


def obs_saliency(weights: torch.Tensor, inverse_diag: torch.Tensor) -> torch.Tensor:
    """``ρ_q = w_q² / (2 [F⁻¹]_qq)``: the loss increase of removing ``w_q`` alone, to second order."""
    return weights.square() / (2 * inverse_diag)


def obs_update(
    weights: torch.Tensor,
    pruned: torch.Tensor,
    inverse_diag: torch.Tensor,
    solve: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The OBS update ``δw = F⁻¹ v`` with ``v_q = −w_q / [F⁻¹]_qq`` on the ``pruned`` entries, 0 elsewhere.

    For a single pruned weight ``w_q + δw_q = 0`` exactly; for several, the
    caller sets the pruned weights to zero after adding ``δw``.

    Args:
        weights: ``[d]`` weights.
        pruned: ``[d]`` boolean, the weights to remove.
        inverse_diag: ``[d]`` diagonal of ``F⁻¹``.
        solve: ``x ↦ F⁻¹ x`` for ``[d]`` vectors.
    """
    v = torch.zeros_like(weights)
    v[pruned] = -weights[pruned] / inverse_diag[pruned].to(weights.dtype)
    return solve(v).to(weights.dtype)


def relative_damping(grads: torch.Tensor, fraction: float) -> float:
    """``fraction`` times the mean diagonal of ``(1/n) Gᵀ G`` for ``grads = G`` of shape ``[n, d]``.

    A trained model's gradients are small, and the scale of ``(1/n) Gᵀ G`` varies
    from model to model; damping relative to it (SparseGPT's percentage damping)
    keeps the same balance between curvature and identity everywhere.
    """
    n, d = grads.shape
    total = sum(float(torch.linalg.vector_norm(row, dtype=torch.float64)) ** 2 for row in grads)
    return fraction * total / (n * d)
