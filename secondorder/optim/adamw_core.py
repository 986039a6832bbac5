r"""The AdamW family's core: AdamW for every parameter a subclass does not claim.

:class:`AdamWCore` steps every parameter with ``torch.optim.AdamW``'s arithmetic
(:func:`secondorder.optim.functional.adamw`), except those a subclass *claims*: the
projected optimisers claim the matrices of groups with a ``rank``, SST the weights it
trains spectrally, SOAP the tensors it rotates. The moments are float32 for any weight
dtype (float64 for float64 weights): a low-precision weight is updated in float32 and
rounded once. A complex weight is stepped as its ``view_as_real``, as ``torch.optim.AdamW``
does.

A claimed step comes in two parts, so that every gradient is checked before anything
changes while each gradient is read once: :meth:`AdamWCore._prepare` computes what changes
nothing (a projection ``G P``, which then stands in for the gradient in the check) and
:meth:`AdamWCore._apply` the rest, writing through the step's ``found_inf`` under
``nonfinite="skip_on_device"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._common import statistics_dtype
from .._distributed import local, row_shard
from .base import BaseOptimizer, check_shapes, learning_rate, real_view
from .functional import Scalar, adam_moments_, adam_scaling, adamw
from .nonfinite import check_gradients

__all__ = ["AdamWConfig", "AdamWCore", "Prepared"]


@dataclass(frozen=True)
class AdamWConfig:
    """AdamW's settings of one parameter group."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    correct_bias: bool = True

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ValueError(f"lr must be >= 0, got {self.lr!r}")
        beta1, beta2 = self.betas
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {self.betas!r}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> AdamWConfig:
        return cls(
            learning_rate(group),
            tuple(group["betas"]),
            group["eps"],
            group["weight_decay"],
            group["correct_bias"],
        )


class Prepared:
    """What :meth:`AdamWCore._prepare` hands to :meth:`AdamWCore._apply`.

    Attributes:
        checked: checked for NaN and Inf in place of the gradient (``None``: the gradient).
        needs_host: the step must be decided on the host under ``"skip_on_device"`` (a
            refresh, a round boundary).
        reads: 0-d tensors to read in the check's host synchronisation; their ``values``
            are filled in before :meth:`AdamWCore._apply`.
        on_cancel: undoes what preparing began, if the step is refused.
    """

    def __init__(self, *, checked: torch.Tensor | None = None, needs_host: bool = False) -> None:
        self.checked = checked
        self.needs_host = needs_host
        self.reads: list[torch.Tensor] = []
        self.values: list[float] = []
        self.on_cancel: Callable[[], None] | None = None

    def cancel(self) -> None:
        if self.on_cancel is not None:
            self.on_cancel()


class AdamWCore(BaseOptimizer):
    """AdamW for every parameter a subclass does not claim. Subclasses fill in:

    - :meth:`_claims` ``(p, group)``: whether ``p`` takes the subclass's step;
    - :meth:`_prepare` and :meth:`_apply`: that step (see the module docstring);
    - :meth:`_schedule` ``(p, group)``: the counter that schedules a refresh needing the
      host, if any;
    - :meth:`_validate_group` and :meth:`_check_state`, calling ``super()``.

    A subclass whose :meth:`_apply` writes through ``self.nonfinite_policy`` (``keep``,
    ``increment``, :meth:`_adam`, ``functional.written`` with ``found_inf``) sets
    ``masks_writes``; otherwise its steps are decided on the host under
    ``"skip_on_device"``, which is always correct.
    """

    masks_writes: ClassVar[bool] = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        **options: Any,
    ) -> None:
        super().__init__(params, {"correct_bias": True, **defaults}, **options)

    # ----------------------------------------------------------------- what subclasses fill in
    def _claims(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return False

    def _prepare(self, p: torch.Tensor, group: dict[str, Any]) -> Prepared:
        return Prepared()

    def _apply(self, p: torch.Tensor, group: dict[str, Any], prepared: Prepared) -> None:
        raise NotImplementedError

    def _schedule(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[Any, int, int] | None:
        """``(counter, period, phase)``: a claimed ``p`` needs the host on steps where its
        ``counter % period == phase``."""
        return None

    def _validate_group(self, group: dict[str, Any]) -> None:
        AdamWConfig.from_group(group)

    def _check_state(self, p: torch.Tensor, group: dict[str, Any], saved: dict[str, Any]) -> None:
        check_shapes(saved, dict.fromkeys(("exp_avg", "exp_avg_sq"), real_view(local(p)).shape), p)

    # ----------------------------------------------------------------- stepping
    def _step(self, params: list[torch.Tensor]) -> None:
        policy = self.nonfinite_policy
        wanted = set(params)
        work = [(p, g) for g in self.param_groups for p in g["params"] if p in wanted]
        claimed = [(p, g) for p, g in work if self._claims(p, g)]
        if policy.on_device:
            policy.sync([s for p, g in claimed if (s := self._schedule(p, g)) is not None])
        prepared = []
        try:
            for p, group in claimed:
                prepared.append(self._prepare(p, group))
            self._decide(params, claimed, prepared)
            for position, ((p, group), ready) in enumerate(zip(claimed, prepared, strict=True)):
                try:
                    self._apply(p, group, ready)
                except BaseException:
                    prepared = prepared[position + 1 :]
                    raise
            prepared = []
            for group in self.param_groups:
                plain = [p for p in group["params"] if p in wanted and not self._claims(p, group)]
                if plain:
                    self._adamw(plain, group)
        finally:
            for ready in reversed(prepared):  # a refused step undoes what preparing began
                ready.cancel()

    def _decide(
        self,
        params: list[torch.Tensor],
        claimed: list[tuple[torch.Tensor, dict[str, Any]]],
        prepared: list[Prepared],
    ) -> None:
        """Check the gradients on the host (raising :class:`NonFiniteError`), or set the step's
        ``found_inf`` on the device where every write of the step can be masked."""
        policy = self.nonfinite_policy
        proxies = {
            p: r.checked
            for (p, _), r in zip(claimed, prepared, strict=True)
            if r.checked is not None
        }
        host = (
            not policy.on_device
            or any("step" not in self.state[p] for p in params)  # first steps create state
            or (bool(claimed) and not self.masks_writes)
            or any(r.needs_host for r in prepared)
        )
        if not host:
            checked = [proxies.get(p, local(p.grad)) for p in params]  # type: ignore[arg-type]
            shards = {shard.group for shard in map(row_shard, params) if shard is not None}
            policy.decide_on_device(checked, shards)
            return
        values = check_gradients(params, proxies, [t for r in prepared for t in r.reads])
        for ready in prepared:
            ready.values, values = values[: len(ready.reads)], values[len(ready.reads) :]

    def _step_one(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if not self._claims(p, group):
            self._adamw([p], group)
            return
        prepared = self._prepare(p, group)
        if prepared.reads:
            prepared.values = check_gradients([], reads=prepared.reads)
        self._apply(p, group, prepared)

    # ----------------------------------------------------------------- AdamW
    def _adamw(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """:func:`~secondorder.optim.functional.adamw` on parameters of one group."""
        policy = self.nonfinite_policy
        weights, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in params:
            state = self.state[p]
            weight = real_view(local(p))
            grad = real_view(local(p.grad)).to(statistics_dtype(weight.dtype))  # type: ignore[arg-type]
            if "exp_avg" not in state:
                state["step"] = policy.new_counter(grad.device)
                state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            policy.increment(state, "step")
            weights.append(weight)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw(weights, grads, exp_avgs, exp_avg_sqs, steps, lr=learning_rate(group), beta1=beta1,
              beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
              correct_bias=group["correct_bias"], found_inf=policy.found_inf)  # fmt: skip

    def _adam(
        self, state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any]
    ) -> tuple[Scalar, torch.Tensor]:
        """Count the step and update ``state``'s moments with ``grad`` (masked by the step's
        ``found_inf``); return Adam's step size and denominator."""
        policy = self.nonfinite_policy
        beta1, beta2 = group["betas"]
        policy.increment(state, "step")
        adam_moments_(state["exp_avg"], state["exp_avg_sq"], grad, beta1=beta1, beta2=beta2,
                      found_inf=policy.found_inf)  # fmt: skip
        return adam_scaling(state["exp_avg_sq"], state["step"], lr=learning_rate(group),
                            beta1=beta1, beta2=beta2, eps=group["eps"],
                            correct_bias=group["correct_bias"])  # fmt: skip
