r"""Sparse Spectral Training (Zhao et al., 2024): train a weight through its singular vectors.

Each chosen weight ``W`` (``m × n``) is kept as ``U diag(s) Vᵀ`` from its SVD, with
``k = min(m, n)`` pairs. Training runs in rounds of ``update_proj_gap`` steps. At the start
of a round, ``r = rank`` pairs are sampled without replacement with probabilities

.. math::

    p_i = (1 - \alpha)\, \frac{s_i}{\sum_j s_j} + \frac{\alpha}{k} \qquad (\alpha = \text{uniform\_mix}),

and every step of the round, with ``G = ∂L/∂W``, AdamW updates

- all singular values with their gradient ``∂L/∂s_i = u_iᵀ G v_i``, then clamps them at ``≥ 0``;
- the sampled vectors with the *enhanced* gradients ``G v_i`` and ``Gᵀ u_i`` (the true
  gradients ``s_i G v_i`` and ``s_i Gᵀ u_i`` without the factor ``s_i``, which would
  starve small singular values), then scales each back to unit norm.

Decoupled weight decay multiplies ``s`` by ``1 - lr·wd``, which is ``W ← (1 - lr·wd) W``.
At the end of a round ``U diag(s) Vᵀ`` is re-factored into an exact SVD
(:func:`refactor`), the updated vectors having drifted from orthogonality, and the Adam
state of the weight starts again: its coordinates (the pairs) have changed.

Two modes, the same arithmetic (a test checks they follow the same trajectory):

- **drop-in** (``SST(param_groups)``, groups with ``rank``): the model keeps its dense
  weights and gradients; the optimiser keeps ``U, s, V`` in its state and writes
  ``W = U diag(s) Vᵀ`` after every step. Per ``m × n`` weight it holds ``(m + n) k + k``
  numbers of factors plus Adam moments for ``s`` and the ``r`` sampled pairs,
  ``2 (k + (m + n) r)``: for a square weight about ``2 mn``, *as much as AdamW's two
  moments*. It saves no memory; it runs SST on an unmodified model (e.g. in a
  ``transformers`` Trainer).
- **spectral** (``to_spectral(model, rank)`` then ``SST(model)``): each ``nn.Linear``
  becomes a :class:`SpectralLinear` that holds ``U, V`` as buffers, ``s`` and the sampled
  columns ``u, v`` as parameters, and no dense weight. Backward never forms the ``m × n``
  gradient: gradients and Adam moments exist for ``k + (m + n) r`` numbers only. The
  factors themselves take ``(m + n) k + k`` numbers, more than ``W``'s ``mn`` (twice for a
  square weight), so the saving is in gradients and optimiser state: for a square weight
  and ``r ≪ n`` about half of AdamW's ``4 mn`` (weight, gradient, two moments).

docs/benchmarks.md measures both against AdamW on a Llama-style model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._distributed import RowShard
from .projected_adam import (
    LowRankConfig,
    ProjectedAdam,
    _decay,
    _writable,
    adam_moments,
    as_matrix,
    compute_dtype,
)

__all__ = ["SST", "SpectralLinear", "refactor", "sample_pairs", "spectral_factors", "to_spectral"]


def spectral_factors(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, s, V`` with ``W = U diag(s) Vᵀ`` (thin SVD, in float32 or float64 for float64 ``W``)."""
    U, s, Vh = torch.linalg.svd(W.to(compute_dtype(W)), full_matrices=False)
    return U, s, Vh.mT.contiguous()


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


def sample_pairs(
    s: torch.Tensor, rank: int, uniform_mix: float, generator: torch.Generator
) -> torch.Tensor:
    """``rank`` distinct indices drawn with probabilities ``(1 - α) s / Σs + α / k``, sorted."""
    weights = s.detach().to("cpu", torch.float64).clamp_min(0)
    k = weights.numel()
    total = float(weights.sum())
    proportional = weights / total if total > 0 else torch.full_like(weights, 1 / k)
    probabilities = (1 - uniform_mix) * proportional + uniform_mix / k
    chosen = torch.multinomial(probabilities, rank, replacement=False, generator=generator)
    return chosen.sort().values.to(s.device)


def _round_generator(seed: int, ordinal: int, round_index: int) -> torch.Generator:
    """The sampling of a round depends only on (seed, which weight, which round): resumable."""
    return torch.Generator().manual_seed(hash((seed, ordinal, round_index)) & (2**63 - 1))


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
    r"""``y = x V diag(s) Uᵀ + b``: a linear layer stored as its SVD, trained by :class:`SST`.

    ``U`` (``out × k``) and ``V`` (``in × k``) are buffers; ``s`` (``k``) is a parameter, and
    so are ``u = U[:, indices]`` and ``v = V[:, indices]``, the ``rank`` pairs sampled this
    round (the columns of ``U, V`` at ``indices`` are stale until :meth:`fold`). Backward
    gives ``s`` its true gradient and ``u, v`` their *enhanced* gradients ``G v``, ``Gᵀ u``
    (without the factor ``s_i``), and never forms the ``out × in`` gradient.
    """

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
        dtype = compute_dtype(self.s)
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
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if rank > min(linear.in_features, linear.out_features):
            raise ValueError(
                f"rank {rank} is larger than min(in, out) = "
                f"{min(linear.in_features, linear.out_features)} of layer {name!r}"
            )
        setattr(parent, attribute, SpectralLinear.from_linear(linear, rank))
    return model


class SST(ProjectedAdam):
    r"""Sparse Spectral Training as a ``torch.optim`` optimiser; the maths is in the module docstring.

    Drop-in mode: ``SST([{"params": matrices, "rank": 16, "update_proj_gap": 200},
    {"params": others}], lr=...)``; matrix (and conv) weights of groups with ``rank`` are
    trained spectrally, everything else by AdamW (``torch.optim.AdamW``'s arithmetic).

    Spectral mode: ``SST(to_spectral(model, rank=16), lr=...)``: pass the *model*; every
    :class:`SpectralLinear` layer is trained spectrally (its rank is the layer's), every
    other parameter by AdamW.

    Args:
        params: parameter groups (drop-in) or a model holding :class:`SpectralLinear` layers.
        lr, betas, eps, weight_decay, correct_bias: AdamW's, for every tensor updated.
        rank: pairs sampled per round (drop-in default for groups).
        update_proj_gap: steps per round (sampling, then re-SVD at its end).
        uniform_mix: ``α`` in ``[0, 1]``, the share of uniform sampling (the paper's
            half/half mix is ``0.5``).
        seed: the sampling of round ``t`` of weight ``i`` depends on ``(seed, i, t)`` only,
            so a run resumed from a ``state_dict`` samples the same pairs.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        uniform_mix: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0 <= uniform_mix <= 1:
            raise ValueError(f"uniform_mix must be in [0, 1], got {uniform_mix!r}")
        self.seed = seed
        self._layers: list[SpectralLinear] = []
        if isinstance(params, nn.Module):
            if rank is not None:
                raise ValueError("in spectral mode each layer has its rank: give it to to_spectral")
            params = self._spectral_groups(params)
        super().__init__(
            params,
            None,
            lr,
            betas,
            eps,
            weight_decay,
            correct_bias,
            rank=rank,
            update_proj_gap=update_proj_gap,
            extra_defaults={"uniform_mix": uniform_mix},
        )
        for index, layer in enumerate(self._layers):
            group = next(g for g in self.param_groups if g.get("spectral_layer") == index)
            self._start_round(layer, group, index)

    def _spectral_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        self._layers = [m for m in model.modules() if isinstance(m, SpectralLinear)]
        if not self._layers:
            raise ValueError(
                "the model has no SpectralLinear layers: call to_spectral(model, rank) first, or "
                "pass parameter groups with 'rank' for the drop-in mode"
            )
        spectral = {id(p) for layer in self._layers for p in (layer.s, layer.u, layer.v)}
        others = [p for p in model.parameters() if id(p) not in spectral]
        groups: list[dict[str, Any]] = [
            {"params": [layer.s, layer.u, layer.v], "spectral_layer": index}
            for index, layer in enumerate(self._layers)
        ]
        return [*groups, {"params": others}] if others else groups

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if not 0 <= group["uniform_mix"] <= 1:
            raise ValueError(f"uniform_mix must be in [0, 1], got {group['uniform_mix']!r}")

    # ----------------------------------------------------------------- the shared step
    def _spectral_step(
        self,
        factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        moments: tuple[dict[str, Any], ...],
        group: dict[str, Any],
    ) -> None:
        """AdamW on ``s`` and on the sampled ``u, v`` (enhanced gradients); clamp; renormalise."""
        for index, (tensor, grad, state) in enumerate(zip(factors, grads, moments, strict=True)):
            step_size, denom = adam_moments(state, grad.to(state["exp_avg"].dtype), group)
            with _writable(tensor, state["exp_avg"].dtype) as target:
                if index == 0:
                    _decay(target, group)  # (1 - lr·wd) s  ⇔  (1 - lr·wd) W
                target.addcdiv_(state["exp_avg"], denom, value=-step_size)
                if index == 0:
                    target.clamp_(min=0)
                else:
                    target.div_(torch.linalg.vector_norm(target, dim=0).clamp_min(1e-30))

    @staticmethod
    def _fresh_moments(*tensors: torch.Tensor) -> list[dict[str, Any]]:
        moments = []
        for t in tensors:
            dtype = compute_dtype(t)
            zeros = torch.zeros(t.shape, dtype=dtype, device=t.device)
            moments.append({"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros.clone()})
        return moments

    def _sample(
        self, s: torch.Tensor, rank: int, group: dict[str, Any], ordinal: int, round_index: int
    ):
        generator = _round_generator(self.seed, ordinal, round_index)
        return sample_pairs(s, rank, group["uniform_mix"], generator)

    # ----------------------------------------------------------------- drop-in mode
    def _ordinal(self, p: torch.Tensor) -> int:
        """Position of ``p`` among the weights trained spectrally, in group order."""
        weights = [
            q
            for g in self.param_groups
            if LowRankConfig.from_group(g) is not None
            for q in g["params"]
            if q.dim() >= 2
        ]
        return next(i for i, q in enumerate(weights) if q is p)

    def _low_rank_update(
        self,
        p: torch.Tensor,
        group: dict[str, Any],
        config: LowRankConfig,
        grad: torch.Tensor,
        shard: RowShard | None,
    ) -> None:
        if shard is not None:
            raise NotImplementedError(
                "SST keeps the full U diag(s) Vᵀ of each weight; it does not step FSDP2-sharded "
                "weights (use it under DDP, or give it unsharded weights)"
            )
        state = self.state[p]
        if state["step"] % config.update_proj_gap == 0:
            if "U" in state:
                U, s, V = refactor(state["U"], state["s"], state["V"])
            else:
                U, s, V = spectral_factors(as_matrix(p.detach()).to(grad.dtype))
            round_index = state["step"] // config.update_proj_gap
            indices = self._sample(s, config.rank, group, self._ordinal(p), round_index)
            state.update(U=U, s=s, V=V, indices=indices)
            u, v = U[:, indices], V[:, indices]
            state["moments"] = dict(zip("suv", self._fresh_moments(s, u, v), strict=True))
        state["step"] += 1
        U, s, V, indices = state["U"], state["s"], state["V"], state["indices"]
        G = as_matrix(grad)
        GV = G @ V
        grads = (torch.einsum("ik,ik->k", U, GV), GV[:, indices], G.mT @ U[:, indices])
        u, v = U[:, indices], V[:, indices]
        moments = tuple(state["moments"][name] for name in "suv")
        self._spectral_step((s, u, v), grads, moments, group)
        U[:, indices], V[:, indices] = u, v
        with torch.no_grad():
            p.copy_(((U * s) @ V.mT).reshape(p.shape))

    # ----------------------------------------------------------------- spectral mode
    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        index = group.get("spectral_layer")
        if index is None:
            super()._update(p, group)
        elif p is group["params"][0]:  # s: the layer steps once, with all three gradients
            self._layer_update(self._layers[index], group, index)

    def _layer_update(self, layer: SpectralLinear, group: dict[str, Any], ordinal: int) -> None:
        s, u, v = layer.s, layer.u, layer.v
        grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in (s, u, v))
        moments = tuple(self.state[t] for t in (s, u, v))
        self._spectral_step((s, u, v), grads, moments, group)
        state = self.state[s]
        state["round_step"] += 1
        if state["round_step"] == group["update_proj_gap"]:
            layer.refactor()
            self._start_round(layer, group, ordinal)

    def _start_round(self, layer: SpectralLinear, group: dict[str, Any], ordinal: int) -> None:
        """Sample the pairs the next forward passes use, with fresh Adam moments.

        Runs when the optimiser is built (round 0) and after the last step of each round,
        so that backward always produces gradients for the pairs of the current round.
        """
        state = self.state[layer.s]
        rounds = state.get("rounds", 0)
        layer.select(self._sample(layer.s, layer.rank, group, ordinal, rounds))
        tensors = (layer.s, layer.u, layer.v)
        for tensor, fresh in zip(tensors, self._fresh_moments(*tensors), strict=True):
            self.state[tensor].update(fresh)
        state.update(rounds=rounds + 1, round_step=0)
