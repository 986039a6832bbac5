r"""Model surgery for Sparse Spectral Training: linear layers kept as their SVD.

A :class:`SpectralLinear` stores ``W = U diag(s) Vᵀ`` (``U``: ``out × k``, ``V``: ``in × k``,
``k = min(in, out)``) and trains ``s`` and ``rank`` sampled pairs ``(u_i, v_i)`` of its
singular vectors, never forming the dense weight or its gradient; :func:`to_spectral`
converts the ``nn.Linear`` layers of a model in place. Backward gives ``s`` its true
gradient ``∂L/∂s_i = u_iᵀ G v_i`` and the sampled vectors their *enhanced* gradients
``G v_i`` and ``Gᵀ u_i`` (the true ones without the factor ``s_i``), where ``G = ∂L/∂W``.

The optimiser that trains these layers is :class:`secondorder.optim.SST`; this module
imports only torch (and the library's shared dtype policy).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .._common import statistics_dtype

__all__ = ["SpectralLinear", "refactor", "spectral_factors", "to_spectral"]


def spectral_factors(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, s, V`` with ``W = U diag(s) Vᵀ`` (thin SVD, in float32 or float64 for float64 ``W``).

    All three are row-major, as :func:`refactor`'s are: a product's rounding depends on its
    operands' layout, and a checkpoint loaded into existing tensors (``torch.distributed.
    checkpoint``) keeps their layout, so factors from either function must share one."""
    U, s, Vh = torch.linalg.svd(W.to(statistics_dtype(W.dtype)), full_matrices=False)
    return U.contiguous(), s, Vh.mT.contiguous()


def refactor(
    U: torch.Tensor, s: torch.Tensor, V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""An exact SVD of ``U diag(s) Vᵀ`` for any ``U, V`` (``m × k``, ``n × k``), never forming it.

    With ``U = Q_U R_U`` and ``V = Q_V R_V`` (QR), ``U diag(s) Vᵀ = Q_U (R_U diag(s) R_Vᵀ) Q_Vᵀ``;
    the SVD ``A Σ Bᵀ`` of the ``k × k`` core gives ``Q_U A, Σ, Q_V B``. Costs
    ``O((m + n) k² + k³)``.
    """
    Q_U, R_U = torch.linalg.qr(U)
    Q_V, R_V = torch.linalg.qr(V)
    A, singular, Bh = torch.linalg.svd((R_U * s) @ R_V.mT)
    return Q_U @ A, singular, Q_V @ Bh.mT


class _SampledPairs(torch.autograd.Function):
    """``(x v diag(s_r)) uᵀ``, whose backward gives ``u`` and ``v`` their enhanced gradients."""

    @staticmethod
    def forward(ctx, x, u, s_r, v):
        projected = x @ v  # (..., r)
        ctx.save_for_backward(x, u, s_r, v, projected)
        return (projected * s_r) @ u.mT

    @staticmethod
    def backward(ctx, grad_out):
        x, u, s_r, v, projected = ctx.saved_tensors
        back = grad_out @ u  # (..., r)
        grad_x = (back * s_r) @ v.mT if ctx.needs_input_grad[0] else None
        rows_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_u = rows_out.mT @ projected.reshape(-1, projected.shape[-1])  # G v, no s
        grad_v = x.reshape(-1, x.shape[-1]).mT @ back.reshape(-1, back.shape[-1])  # Gᵀ u, no s
        grad_s = (back * projected).reshape(-1, s_r.numel()).sum(0)  # u_iᵀ G v_i
        return grad_x, grad_u, grad_s, grad_v


class SpectralLinear(nn.Module):
    r"""``y = x V diag(s) Uᵀ + b``: a linear layer stored as its SVD, trained by
    :class:`~secondorder.optim.SST`.

    ``U`` (``out × k``) and ``V`` (``in × k``) are buffers; ``s`` (``k``) is a parameter, and
    so are ``u = U[:, indices]`` and ``v = V[:, indices]``, the ``rank`` pairs sampled this
    round (the columns of ``U, V`` at ``indices`` are stale until :meth:`fold`). Backward
    gives ``s`` its true gradient and ``u, v`` their *enhanced* gradients ``G v``, ``Gᵀ u``
    (without the factor ``s_i``), and never forms the ``out × in`` gradient.

    Args:
        U: the left singular vectors, ``out × k``.
        s: the singular values, ``k``.
        V: the right singular vectors, ``in × k``.
        bias: the bias (``out``), or ``None``.
        rank: how many pairs ``(u_i, v_i)`` are sampled and trained per round.

    Raises:
        ValueError: ``rank`` is not in ``[1, k]``.
    """

    U: torch.Tensor
    V: torch.Tensor
    indices: torch.Tensor
    bias: nn.Parameter | None

    def __init__(
        self,
        U: torch.Tensor,
        s: torch.Tensor,
        V: torch.Tensor,
        bias: torch.Tensor | None,
        rank: int,
    ) -> None:
        super().__init__()
        k = s.numel()
        if not 0 < rank <= k:
            raise ValueError(
                f"rank must be in [1, {k}] for a layer of shape {(U.shape[0], V.shape[0])}"
            )
        self.register_buffer("U", U.contiguous())
        self.register_buffer("V", V.contiguous())
        self.register_buffer("indices", torch.arange(rank, device=s.device))
        self.s = nn.Parameter(s.clone())
        self.u = nn.Parameter(U[:, :rank].clone())
        self.v = nn.Parameter(V[:, :rank].clone())
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias)
        self.register_parameter("bias", bias)
        self.rank = rank

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> SpectralLinear:
        """The SVD of ``linear.weight`` (in float32, stored in its dtype); ``linear.bias`` is reused."""
        U, s, V = spectral_factors(linear.weight.detach())
        dtype = linear.weight.dtype
        return cls(U.to(dtype), s.to(dtype), V.to(dtype), linear.bias, rank)

    @property
    def in_features(self) -> int:
        return self.V.shape[0]

    @property
    def out_features(self) -> int:
        return self.U.shape[0]

    def extra_repr(self) -> str:
        k = self.s.numel()
        return f"in={self.in_features}, out={self.out_features}, pairs={k}, sampled={self.rank}"

    @torch.no_grad()
    def fold(self) -> None:
        """Write the sampled columns ``u, v`` back into ``U, V``."""
        self.U[:, self.indices] = self.u.to(self.U.dtype)
        self.V[:, self.indices] = self.v.to(self.V.dtype)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The dense ``out × in`` weight this layer stands for (for inspection; costs ``mn``)."""
        U, V = self.U.clone(), self.V.clone()
        U[:, self.indices], V[:, self.indices] = self.u, self.v
        return (U * self.s) @ V.mT

    @torch.no_grad()
    def refactor(self) -> None:
        """Fold the sampled columns in and replace ``U, s, V`` by an exact SVD of the product."""
        self.fold()
        dtype = statistics_dtype(self.s.dtype)
        U, s, V = refactor(self.U.to(dtype), self.s.to(dtype), self.V.to(dtype))
        self.U.copy_(U)
        self.V.copy_(V)
        self.s.copy_(s)
        self.u.copy_(self.U[:, self.indices])
        self.v.copy_(self.V[:, self.indices])

    @torch.no_grad()
    def select(self, indices: torch.Tensor) -> None:
        """Fold the current pairs in and make ``indices`` the sampled ones."""
        self.fold()
        self.indices.copy_(indices)
        self.u.copy_(self.U[:, indices])
        self.v.copy_(self.V[:, indices])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        others = self.s.index_fill(0, self.indices, 0)  # the sampled pairs go through u, v
        y = ((x @ self.V) * others) @ self.U.mT
        y = y + _SampledPairs.apply(x, self.u, self.s[self.indices], self.v)
        return y if self.bias is None else y + self.bias


def to_spectral(model: nn.Module, rank: int, *, modules: Iterable[str] | None = None) -> nn.Module:
    """Replace ``nn.Linear`` layers of ``model`` (in place) by :class:`SpectralLinear` ones.

    Args:
        model: the model; it is modified and returned.
        rank: pairs sampled per round in each layer, at most ``min(in, out)`` of each.
        modules: qualified names of the layers to convert (``model.named_modules()``);
            every ``nn.Linear`` by default.

    Returns:
        ``model``, whose chosen layers are now :class:`SpectralLinear`.

    Raises:
        ValueError: before anything changes, if a name in ``modules`` is not an
            ``nn.Linear`` of ``model`` or ``rank`` exceeds ``min(in, out)`` of a layer.
    """
    names = None if modules is None else set(modules)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (names is None or name in names)
    ]
    if names is not None:
        missing = names - {name for name, _ in chosen}
        if missing:
            raise ValueError(f"not nn.Linear layers of this model: {sorted(missing)}")
    for name, linear in chosen:
        if rank > min(linear.in_features, linear.out_features):
            raise ValueError(
                f"rank {rank} is larger than min(in, out) = "
                f"{min(linear.in_features, linear.out_features)} of layer {name!r}"
            )
    # every layer converted before any is replaced: a refusal leaves the model as it was
    converted = [(name, SpectralLinear.from_linear(linear, rank)) for name, linear in chosen]
    for name, spectral in converted:
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, spectral)
    return model
