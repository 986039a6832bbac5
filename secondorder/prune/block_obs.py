r"""Optimal Brain Surgeon for a set of weights at once, inside each block of a block-diagonal Fisher.

With the inverse Fisher ``H = F⁻¹`` of one block and its weights ``w``, removing the
set ``Q`` of them at the least cost ``½ δwᵀ F δw`` under ``(w + δw)_Q = 0`` is

    δw = −H_{:,Q} (H_QQ)⁻¹ w_Q,      ρ_Q = ½ w_Qᵀ (H_QQ)⁻¹ w_Q,

which is exact where the summed single-weight updates of :mod:`.obs` neglect the
interactions between the removed weights. The weights that stay then have the
inverse Fisher ``H − H_{:,Q} (H_QQ)⁻¹ H_{Q,:}`` (the inverse of ``F`` restricted to
them), so removals can go on in rounds, each re-scoring by ``w_q² / (2 H_qq)`` with
the updated weights and inverse: exact sequential OBS on a fixed quadratic, the
Fisher estimated once. Every block is ``[block_size]`` consecutive weights of one
tensor; the functions here work on all blocks at once, ``[blocks, B]`` weights and
``[blocks, B, B]`` inverses.
"""

from __future__ import annotations

import torch

from ..errors import NotPositiveDefiniteError

__all__ = ["block_inverse_fisher", "remove_jointly", "to_blocks"]

# Blocks per batched Gram matrix and factorisation: bounds the temporaries.
_BUILD_BLOCKS = 128


def to_blocks(values: torch.Tensor, block_size: int, fill: float | bool = 0) -> torch.Tensor:
    """``[..., d]`` cut into ``[..., ceil(d / B), B]`` blocks, the last padded with ``fill``."""
    d = values.shape[-1]
    pad = -d % block_size
    if pad:
        padding = values.new_full((*values.shape[:-1], pad), fill)
        values = torch.cat([values, padding], dim=-1)
    return values.reshape(*values.shape[:-1], -1, block_size)


def block_inverse_fisher(
    grads: torch.Tensor, block_size: int, damp: float, dtype: torch.dtype
) -> torch.Tensor:
    """``[blocks, B, B]``: ``(damp·I + G_bᵀ G_b / n)⁻¹`` for each block of ``B`` columns of ``grads = G``.

    ``grads`` is ``[n, d]``; the last block is padded with zero gradients, so its
    padding coordinates are decoupled (``1 / damp`` on the diagonal), as are the
    coordinates whose gradients are all zero (weights already pruned).

    Raises:
        NotPositiveDefiniteError: a block could not be factored (damping too small
            for the rounding of ``dtype``, or non-finite gradients).
    """
    n = grads.shape[0]
    blocks = to_blocks(grads, block_size).transpose(0, 1)  # [blocks, n, B]
    inverse = torch.empty(blocks.shape[0], block_size, block_size, dtype=dtype, device=grads.device)
    for start in range(0, blocks.shape[0], _BUILD_BLOCKS):
        part = blocks[start : start + _BUILD_BLOCKS].to(dtype)
        fisher = part.mT @ part / n
        fisher.diagonal(dim1=-2, dim2=-1).add_(damp)
        factor, info = torch.linalg.cholesky_ex(fisher)
        if bool((info != 0).any()) or not bool(torch.isfinite(factor).all()):
            raise NotPositiveDefiniteError(
                f"a block of the damped Fisher (damp={damp:g}) could not be factored in "
                f"{dtype}: raise damp, or the gradients are not finite"
            )
        inverse[start : start + _BUILD_BLOCKS] = torch.cholesky_inverse(factor)
    return inverse


def remove_jointly(
    weights: torch.Tensor, inverse: torch.Tensor, removed: torch.Tensor, *, downdate: bool = True
) -> None:
    """Remove the ``removed`` weights of every block at once by exact OBS, in place.

    ``weights`` (``[blocks, B]``) become ``w + δw`` with ``δw = −H_{:,Q} (H_QQ)⁻¹ w_Q``
    (exactly zero on ``Q``). With ``downdate``, ``inverse`` (``[blocks, B, B]``)
    becomes ``H − H_{:,Q} (H_QQ)⁻¹ H_{Q,:}``: on the weights that stay, the inverse of
    the Fisher restricted to them; the removed coordinates decoupled (their rows and
    columns zero up to rounding, 1 on the diagonal).
    The removed coordinates of each block are gathered (``k`` = the most in any
    block), so a round costs ``O(B² k)`` per block.
    """
    k = int(removed.sum(dim=1).max()) if removed.numel() else 0
    if k == 0:
        return
    size = weights.shape[1]
    # The removed coordinates of each block first (the sort is stable), padded by others.
    order = torch.argsort((~removed).to(torch.uint8), dim=1, stable=True)[:, :k]
    valid = removed.gather(1, order)
    rows = inverse.gather(1, order[:, :, None].expand(-1, -1, size))  # H_{Q,:}
    rows.mul_(valid[:, :, None])
    system = rows.gather(2, order[:, None, :].expand(-1, k, -1))  # H_QQ (padding: 0)
    system.diagonal(dim1=-2, dim2=-1).add_((~valid).to(system.dtype))  # padding: identity
    factor, info = torch.linalg.cholesky_ex(system)
    if bool((info != 0).any()):
        raise NotPositiveDefiniteError(
            "the inverse Fisher restricted to the removed weights is not positive definite: "
            "raise the damping"
        )
    w_q = (weights.gather(1, order) * valid).to(inverse.dtype)
    c = torch.cholesky_solve(w_q[:, :, None], factor)  # (H_QQ)⁻¹ w_Q
    weights.sub_((rows.mT @ c)[:, :, 0].to(weights.dtype))
    weights.masked_fill_(removed, 0)
    if downdate:
        inverse.baddbmm_(rows.mT, torch.cholesky_solve(rows, factor), alpha=-1)
        # The rows and columns of Q are now zero up to rounding; 1 on their diagonal
        # keeps the saliencies defined (the caller no longer counts those weights).
        inverse.diagonal(dim1=-2, dim2=-1).masked_fill_(removed, 1)
