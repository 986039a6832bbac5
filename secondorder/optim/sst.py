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

Sampling and the re-SVD happen once per round, not every step as the paper describes its
sampling (as far as secondary sources say; its re-SVD is once per round). Every resample
restarts the sampled vectors' Adam moments, and the first bias-corrected steps on fresh
unit vectors are the costly ones (each entry moves by about ``±lr``): the loss jumps at
every round boundary until a re-warm-up damps it (``rewarmup_steps``). Resampling every
step would make every step such a first step. The defaults (a 10-step re-warm-up, the
paper's half-uniform sampling mix) were chosen by ``benchmarks/lowrank_bench.py --part sst``
(docs/benchmarks.md).

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

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import check_positive_int
from .._common import statistics_dtype
from .._distributed import row_shard
from ..nn import SpectralLinear, refactor, spectral_factors
from ..nn import to_spectral as _to_spectral
from .adamw_core import AdamWCore, Prepared
from .base import check_shapes, learning_rate
from .functional import apply_adam_, decoupled_decay_, written

__all__ = ["SST", "SpectralConfig", "sample_pairs"]


@dataclass(frozen=True)
class SpectralConfig:
    """The SST settings of one parameter group with a ``rank`` (drop-in mode)."""

    rank: int | None
    update_proj_gap: int
    uniform_mix: float

    def __post_init__(self) -> None:
        if self.rank is not None:
            check_positive_int(self.rank, "rank")
        check_positive_int(self.update_proj_gap, "update_proj_gap")
        if not 0 <= self.uniform_mix <= 1:
            raise ValueError(f"uniform_mix must be in [0, 1], got {self.uniform_mix!r}")

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> SpectralConfig:
        return cls(group.get("rank"), group["update_proj_gap"], group["uniform_mix"])


def to_spectral(model: nn.Module, rank: int, *, modules: Iterable[str] | None = None) -> nn.Module:
    """Deprecated alias of :func:`secondorder.nn.to_spectral` (removed in the next release)."""
    warnings.warn(
        "secondorder.optim.sst.to_spectral moved to secondorder.nn.to_spectral; this alias "
        "will be removed in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return _to_spectral(model, rank, modules=modules)


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


class SST(AdamWCore):
    r"""Sparse Spectral Training as a ``torch.optim`` optimiser; the maths is in the module docstring.

    Drop-in mode: ``SST([{"params": matrices, "rank": 16, "update_proj_gap": 200},
    {"params": others}], lr=...)``; matrix (and conv) weights of groups with ``rank`` are
    trained spectrally, everything else by AdamW (``torch.optim.AdamW``'s arithmetic, from
    the :class:`~secondorder.optim.adamw_core.AdamWCore`).

    Spectral mode: ``SST(secondorder.nn.to_spectral(model, rank=16), lr=...)``: pass the
    *model*; every :class:`~secondorder.nn.SpectralLinear` layer is trained spectrally (its
    rank is the layer's), every other parameter by AdamW.

    Args:
        params: parameter groups (drop-in) or a model holding ``SpectralLinear`` layers.
        lr, betas, eps, weight_decay, correct_bias: AdamW's, for every tensor updated.
        rank: pairs sampled per round (drop-in default for groups).
        update_proj_gap: steps per round (sampling, then re-SVD at its end).
        uniform_mix: ``α`` in ``[0, 1]``, the share of uniform sampling (default ``0.5``,
            the paper's half/half mix).
        seed: the sampling of round ``t`` of weight ``i`` depends on ``(seed, i, t)`` only,
            so a run resumed from a ``state_dict`` samples the same pairs.
        rewarmup_steps: after each resampling but the first, the spectral steps of that
            weight are scaled by ``min(1, (j + 1) / rewarmup_steps)`` at step ``j`` of the
            round (0 turns it off). The first bias-corrected Adam steps of freshly sampled
            unit vectors move every entry by about ``±lr``, and without this the loss jumps
            at every round boundary (docs/benchmarks.md, "SST's round boundaries").
        nonfinite: ``"raise"``, ``"skip"`` or ``"skip_on_device"`` (skip without a host
            synchronisation; round boundaries are decided on the host) a step with a NaN or
            Inf gradient (see :mod:`secondorder.optim.nonfinite`).
        skip_report_every: with ``"skip_on_device"``, steps between host reads of the
            count of skipped steps.
    """

    masks_writes = True

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
        uniform_mix: float = 0.5,
        seed: int = 0,
        rewarmup_steps: int = 10,
        nonfinite: str = "raise",
        skip_report_every: int = 100,
    ) -> None:
        SpectralConfig(rank, update_proj_gap, uniform_mix)
        if (
            isinstance(rewarmup_steps, bool)
            or not isinstance(rewarmup_steps, int)
            or rewarmup_steps < 0
        ):
            raise ValueError(f"rewarmup_steps must be an integer >= 0, got {rewarmup_steps!r}")
        self.seed = seed
        self.rewarmup_steps = rewarmup_steps
        self._layers: list[SpectralLinear] = []
        if isinstance(params, nn.Module):
            if rank is not None:
                raise ValueError("in spectral mode each layer has its rank: give it to to_spectral")
            params = self._spectral_groups(params)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "uniform_mix": uniform_mix,
        }
        super().__init__(params, defaults, nonfinite=nonfinite, skip_report_every=skip_report_every)
        for index, layer in enumerate(self._layers):
            group = next(g for g in self.param_groups if g.get("spectral_layer") == index)
            self._start_round(layer, group, index)

    def _spectral_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        self._layers = [m for m in model.modules() if isinstance(m, SpectralLinear)]
        if not self._layers:
            raise ValueError(
                "the model has no SpectralLinear layers: call secondorder.nn.to_spectral(model, "
                "rank) first, or pass parameter groups with 'rank' for the drop-in mode"
            )
        spectral = {id(p) for layer in self._layers for p in (layer.s, layer.u, layer.v)}
        others = [p for p in model.parameters() if id(p) not in spectral]
        groups: list[dict[str, Any]] = [
            {"params": [layer.s, layer.u, layer.v], "spectral_layer": index}
            for index, layer in enumerate(self._layers)
        ]
        return [*groups, {"params": others}] if others else groups

    # ----------------------------------------------------------------- settings
    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        config = SpectralConfig.from_group(group)
        spectral = config.rank is not None or group.get("spectral_layer") is not None
        for p in group["params"] if spectral else ():
            if p.is_complex() and (p.dim() >= 2 or config.rank is None):
                raise ValueError(
                    f"a complex weight of shape {tuple(p.shape)} cannot be trained spectrally: "
                    "SST's factors are real; put complex parameters in a group without 'rank' "
                    "(AdamW on their real view)"
                )
        rank = config.rank
        for p in group["params"] if rank is not None else ():
            k = min(p.shape[0], math.prod(p.shape[1:]))
            if p.dim() >= 2 and rank > k:
                raise ValueError(
                    f"rank {rank} is larger than the {k} singular values of a weight of "
                    f"shape {tuple(p.shape)}; lower the rank or put this weight in a group "
                    "without 'rank'"
                )

    def _claims(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        if group.get("spectral_layer") is not None:
            return True
        return group.get("rank") is not None and p.dim() >= 2

    def _check_state(self, p: torch.Tensor, group: dict[str, Any], saved: dict[str, Any]) -> None:
        if not self._claims(p, group):
            super()._check_state(p, group, saved)
            return
        if group.get("spectral_layer") is not None:  # s, u or v of a SpectralLinear
            check_shapes(saved, {"exp_avg": p.shape, "exp_avg_sq": p.shape}, p)
            return
        m, n, rank = p.shape[0], math.prod(p.shape[1:]), group["rank"]
        k = min(m, n)
        check_shapes(saved, {"U": (m, k), "s": (k,), "V": (n, k), "indices": (rank,)}, p)
        for name, shape in {"s": (k,), "u": (m, rank), "v": (n, rank)}.items():
            moments = saved.get("moments", {}).get(name, {})
            check_shapes(moments, {"exp_avg": shape, "exp_avg_sq": shape}, p)

    def _schedule(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[Any, int, int] | None:
        """A round boundary needs the host (the re-SVD, the sampling): drop-in, when the
        weight's step count is a multiple of ``update_proj_gap``; spectral, on the step
        that ends the layer's round."""
        if group.get("spectral_layer") is None:
            step = self.state[p].get("step")
            return None if step is None else (step, group["update_proj_gap"], 0)
        if p is not group["params"][0]:
            return None
        gap = group["update_proj_gap"]
        return self.state[p]["round_step"], gap, gap - 1

    def _prepare(self, p: torch.Tensor, group: dict[str, Any]) -> Prepared:
        """Nothing to prepare; under ``nonfinite="skip_on_device"``, a round boundary is
        decided on the host."""
        schedule = self._schedule(p, group)
        due = False
        if schedule is not None:
            counter, period, phase = schedule
            due = self.nonfinite_policy.value(counter) % period == phase
        return Prepared(needs_host=due)

    def _apply(self, p: torch.Tensor, group: dict[str, Any], prepared: Prepared) -> None:
        layer = group.get("spectral_layer")
        if layer is None:
            self._drop_in_step(p, group, SpectralConfig.from_group(group))
        elif p is group["params"][0]:  # s: the layer steps once, with all three gradients
            self._layer_step(self._layers[layer], group, layer)

    # ----------------------------------------------------------------- the shared step
    def _spectral_step(
        self,
        factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        grads: tuple[torch.Tensor, ...],
        moments: tuple[dict[str, Any], ...],
        group: dict[str, Any],
        round_index: int,
        round_step: int | torch.Tensor,
    ) -> None:
        """AdamW on ``s`` and on the sampled ``u, v`` (enhanced gradients); clamp; renormalise.

        ``round_step`` counts from 0 in each round (a device counter under
        ``nonfinite="skip_on_device"``); from the second round on, the first
        ``rewarmup_steps`` steps are scaled down linearly (see the class docstring)."""
        warmup: float | torch.Tensor = 1.0
        if round_index > 0 and self.rewarmup_steps:
            if isinstance(round_step, torch.Tensor):  # a device counter: the same float64
                warmup = ((round_step + 1).to(torch.float64) / self.rewarmup_steps).clamp(max=1.0)
            else:
                warmup = min(1.0, (round_step + 1) / self.rewarmup_steps)
        found_inf = self.nonfinite_policy.found_inf
        for index, (tensor, grad, state) in enumerate(zip(factors, grads, moments, strict=True)):
            step_size, denom = self._adam(state, grad.to(state["exp_avg"].dtype), group)
            step_size = step_size * warmup
            with written(tensor, state["exp_avg"].dtype, found_inf) as target:
                if index == 0:  # (1 - lr·wd) s  ⇔  (1 - lr·wd) W
                    decoupled_decay_(target, learning_rate(group), group["weight_decay"])
                apply_adam_(target, state["exp_avg"], denom, step_size)
                if index == 0:
                    target.clamp_(min=0)
                else:
                    target.div_(torch.linalg.vector_norm(target, dim=0).clamp_min(1e-30))

    def _fresh_moments(self, *tensors: torch.Tensor) -> list[dict[str, Any]]:
        moments = []
        for t in tensors:
            zeros = torch.zeros(t.shape, dtype=statistics_dtype(t.dtype), device=t.device)
            step = self.nonfinite_policy.new_counter(t.device)
            moments.append({"step": step, "exp_avg": zeros, "exp_avg_sq": zeros.clone()})
        return moments

    def _sample(
        self, s: torch.Tensor, rank: int, uniform_mix: float, ordinal: int, round_index: int
    ):
        generator = _round_generator(self.seed, ordinal, round_index)
        return sample_pairs(s, rank, uniform_mix, generator)

    # ----------------------------------------------------------------- drop-in mode
    def _ordinal(self, p: torch.Tensor) -> int:
        """Position of ``p`` among the weights trained spectrally, in group order."""
        weights = [
            q
            for g in self.param_groups
            if g.get("rank") is not None and g.get("spectral_layer") is None
            for q in g["params"]
            if q.dim() >= 2
        ]
        return next(i for i, q in enumerate(weights) if q is p)

    def _drop_in_step(self, p: torch.Tensor, group: dict[str, Any], config: SpectralConfig) -> None:
        if row_shard(p) is not None:
            raise NotImplementedError(
                "SST keeps the full U diag(s) Vᵀ of each weight; it does not step FSDP2-sharded "
                "weights (use it under DDP, or give it unsharded weights)"
            )
        state = self.state[p]
        dtype = statistics_dtype(p.dtype)
        policy = self.nonfinite_policy
        if "step" not in state:
            state["step"] = policy.new_counter(p.device, scheduled=True)
        step = policy.value(state["step"])  # exact on a round boundary (decided on the host)
        if step % config.update_proj_gap == 0:
            if "U" in state:
                U, s, V = refactor(state["U"], state["s"], state["V"])
            else:
                U, s, V = spectral_factors(p.detach().reshape(p.shape[0], -1).to(dtype))
            round_index = step // config.update_proj_gap
            assert config.rank is not None  # a drop-in group claims its matrices by its rank
            indices = self._sample(
                s, config.rank, config.uniform_mix, self._ordinal(p), round_index
            )
            state.update(U=U, s=s, V=V, indices=indices)
            u, v = U[:, indices], V[:, indices]
            state["moments"] = dict(zip("suv", self._fresh_moments(s, u, v), strict=True))
        # the round is the host's (a boundary is decided there); the step in it the device's
        round_index = step // config.update_proj_gap
        round_step: int | torch.Tensor = step % config.update_proj_gap
        if isinstance(state["step"], torch.Tensor):
            round_step = torch.remainder(state["step"], config.update_proj_gap)
        policy.increment(state, "step")
        U, s, V, indices = state["U"], state["s"], state["V"], state["indices"]
        G = p.grad.reshape(p.shape[0], -1).to(dtype)  # type: ignore[union-attr]
        GV = G @ V
        grads = (torch.einsum("ik,ik->k", U, GV), GV[:, indices], G.mT @ U[:, indices])
        u, v = U[:, indices], V[:, indices]
        moments = tuple(state["moments"][name] for name in "suv")
        self._spectral_step((s, u, v), grads, moments, group, round_index, round_step)
        U[:, indices], V[:, indices] = u, v
        weight = ((U * s) @ V.mT).reshape(p.shape)
        policy.keep(p, weight)

    # ----------------------------------------------------------------- spectral mode
    def _layer_step(self, layer: SpectralLinear, group: dict[str, Any], ordinal: int) -> None:
        s, u, v = layer.s, layer.u, layer.v
        grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in (s, u, v))
        moments = tuple(self.state[t] for t in (s, u, v))
        state = self.state[s]
        round_index = state["rounds"] - 1  # _start_round has counted the current one
        self._spectral_step((s, u, v), grads, moments, group, round_index, state["round_step"])
        self.nonfinite_policy.increment(state, "round_step")
        # the last step of a round is decided on the host: the count is exact there
        if self.nonfinite_policy.value(state["round_step"]) == group["update_proj_gap"]:
            layer.refactor()
            self._start_round(layer, group, ordinal)

    def _start_round(self, layer: SpectralLinear, group: dict[str, Any], ordinal: int) -> None:
        """Sample the pairs the next forward passes use, with fresh Adam moments.

        Runs when the optimiser is built (round 0) and after the last step of each round,
        so that backward always produces gradients for the pairs of the current round.
        """
        state = self.state[layer.s]
        rounds = state.get("rounds", 0)
        layer.select(self._sample(layer.s, layer.rank, group["uniform_mix"], ordinal, rounds))
        tensors = (layer.s, layer.u, layer.v)
        for tensor, fresh in zip(tensors, self._fresh_moments(*tensors), strict=True):
            self.state[tensor].update(fresh)
        state["rounds"] = rounds + 1
        self.nonfinite_policy.reset(state, "round_step", layer.s.device)
