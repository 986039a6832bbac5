r"""The AdamW core of the optimiser family: one step loop, one set of checks, one AdamW.

For a parameter ``w`` with gradient ``g`` at step ``t`` of a group with ``lr``,
``betas = (β₁, β₂)``, ``eps`` and ``weight_decay``:

.. math::

    m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
    v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
    w &\leftarrow (1 - \text{lr} \cdot \text{wd})\, w
        - \frac{\text{lr}}{1 - \beta_1^t} \cdot \frac{m}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}

the same operations, in the same order, as ``torch.optim.AdamW`` (decoupled decay before
the update, ``ε`` added after the bias correction of ``√v``); ``correct_bias=False`` drops
both bias corrections (GaLore's flag). The moments are float32 for any weight dtype
(float64 for float64 weights), and a low-precision weight is updated in float32 and
rounded once (:class:`write_back`). A complex weight is stepped as its ``view_as_real``
(real and imaginary parts are two coordinates), as ``torch.optim.AdamW`` does; its
moments are real, with a trailing dimension of 2.

:class:`AdamWCore` is a ``torch.optim.Optimizer`` that steps every parameter with a
gradient this way, except those a subclass *claims* (:meth:`AdamWCore._claims`), which it
steps its own way (:meth:`AdamWCore._step_claimed`): the low-rank optimisers claim the
matrices of groups with a ``rank``, SST the weights it trains spectrally. The core owns
what they share: the loop over groups, the gradient checks (before anything changes), the
per-group settings validated once (:class:`AdamWSettings`), the layer-wise mode that
steps each parameter from a hook during ``backward()``, and loading state without
torch's dtype cast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._checks import check_finite, check_positive_int
from .._common import statistics_dtype
from .._distributed import all_reduce_sum, local, row_shard
from ..errors import NonFiniteError
from ._nonfinite import (
    COUNTERS,
    DeviceVerdict,
    check_nonfinite_policy,
    device_skip_count,
    device_verdict,
    read_skip_count,
    report_skips,
    skip_step,
)
from ._state import load_state_dict_exactly, tag_rank_local, untag_rank_local

__all__ = [
    "AdamWCore",
    "AdamWSettings",
    "Prepared",
    "adam_moments",
    "add_scaled",
    "apply_adam",
    "check_shapes",
    "decoupled_decay",
    "grad_of",
    "learning_rate",
    "write_back",
]


@dataclass(frozen=True)
class AdamWSettings:
    """AdamW's settings of one parameter group, checked once when the group is added."""

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
    def from_group(cls, group: dict[str, Any]) -> AdamWSettings:
        return cls(
            lr=learning_rate(group),
            betas=tuple(group["betas"]),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            correct_bias=group["correct_bias"],
        )


def learning_rate(group: dict[str, Any]) -> float:
    """The group's ``lr`` as a number: a float, or (as ``torch.optim`` allows) a one-element
    tensor, which an LR scheduler updates in place."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        return float(lr)
    return lr


def adam_moments(
    state: dict[str, Any],
    g: torch.Tensor,
    group: dict[str, Any],
    verdict: DeviceVerdict | None = None,
) -> tuple[float | torch.Tensor, torch.Tensor]:
    """Count the step and update ``state``'s moments with ``g``; return AdamW's step size and
    denominator, so that the update is ``-step_size · exp_avg / denom`` (:func:`apply_adam`).

    A step counter that is a tensor (``nonfinite="skip_on_device"``) is counted on the
    device and the bias corrections computed there, in float64 with the operations Python
    applies to the int (``x ** 0.5`` as a ``pow``, ``lr / x`` as a division), so that the
    step size, a 0-d float64 tensor then, has the bits of the float it would be. With a
    ``verdict``, the moments and the counter are left as they were if it found NaN or Inf."""
    beta1, beta2 = group["betas"]
    step = state["step"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if not isinstance(step, torch.Tensor):
        state["step"] = step = step + 1
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if not group["correct_bias"]:
            return learning_rate(group), exp_avg_sq.sqrt().add_(group["eps"])
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        return learning_rate(group) / (1 - beta1**step), denom
    taken = (step + 1).to(torch.float64)  # the count if the step is taken
    if verdict is None:
        step.add_(1)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    else:
        verdict.increment(step)
        verdict.keep(exp_avg, exp_avg.lerp(g, 1 - beta1))
        verdict.keep(exp_avg_sq, exp_avg_sq.mul(beta2).addcmul_(g, g, value=1 - beta2))
    if not group["correct_bias"]:
        return learning_rate(group), exp_avg_sq.sqrt().add_(group["eps"])
    half = torch.full((), 0.5, dtype=torch.float64, device=step.device)
    bias_correction2_sqrt = torch.pow(1 - beta2**taken, half)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt.to(exp_avg_sq.dtype)).add_(group["eps"])
    lr = torch.full((), learning_rate(group), dtype=torch.float64, device=step.device)
    return torch.div(lr, 1 - beta1**taken), denom


def apply_adam(
    target: torch.Tensor,
    exp_avg: torch.Tensor,
    denom: torch.Tensor,
    step_size: float | torch.Tensor,
) -> None:
    """``target ← target − step_size · exp_avg / denom``; a tensor ``step_size`` (on the
    device) gives the bits a float would on a CPU."""
    if isinstance(step_size, torch.Tensor):
        target.addcdiv_(exp_avg * (-step_size).to(exp_avg.dtype), denom)
    else:
        target.addcdiv_(exp_avg, denom, value=-step_size)


def add_scaled(target: torch.Tensor, update: torch.Tensor, alpha: float | torch.Tensor) -> None:
    """``target ← target + alpha · update`` (one rounding, as ``add_(update, alpha=...)``,
    for a float or a 0-d tensor ``alpha``)."""
    if isinstance(alpha, torch.Tensor):
        target.addcmul_(update, alpha.to(update.dtype))
    else:
        target.add_(update, alpha=alpha)


def decoupled_decay(target: torch.Tensor, group: dict[str, Any]) -> None:
    """``w ← (1 − lr · weight_decay) w``, AdamW's decoupled weight decay."""
    if group["weight_decay"]:
        target.mul_(1 - learning_rate(group) * group["weight_decay"])


def grad_of(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, for a parameter the step already found to have one (the optimisers step
    only those)."""
    grad = p.grad
    assert grad is not None, "a parameter without a gradient reached the step"
    return grad


def real_view(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a complex ``t`` its ``view_as_real`` (a view: writes reach ``t``). AdamW
    steps the real and imaginary parts as two coordinates, as ``torch.optim.AdamW`` does."""
    return torch.view_as_real(t) if t.is_complex() else t


class write_back:
    """``p`` itself, or for a low-precision ``p`` a copy in ``dtype`` that is written back
    (rounded once) when the block exits without an error. With a ``verdict``
    (``nonfinite="skip_on_device"``) the block always works on a copy, written back only
    if the verdict found no NaN or Inf (``torch.where`` on the device)."""

    def __init__(
        self, p: torch.Tensor, dtype: torch.dtype, verdict: DeviceVerdict | None = None
    ) -> None:
        self.p = p
        self.verdict = verdict
        if verdict is not None:
            self.target = p.to(dtype, copy=True)
        else:
            self.target = p if p.dtype == dtype else p.to(dtype)

    def __enter__(self) -> torch.Tensor:
        return self.target

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        if self.verdict is not None:
            self.verdict.keep(self.p, self.target)
        elif self.target is not self.p:
            self.p.copy_(self.target)


def uses_foreach(device: torch.device) -> bool:
    """Whether the AdamW steps of several parameters on ``device`` go through
    ``torch._foreach_*`` kernels (GPUs) rather than one parameter at a time (CPUs)."""
    return device.type != "cpu"


def _graph_task_id() -> int | None:
    """Which backward pass is running (autograd's graph task), ``None`` if unknown."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return None if current is None else current()


def check_gradients(
    params: list[torch.Tensor],
    proxies: dict[torch.Tensor, torch.Tensor] | None = None,
    reads: Sequence[torch.Tensor] = (),
) -> list[float]:
    """Raise before anything changes if a gradient is sparse or holds NaN or Inf.

    One reduction over all gradients of a device and one host synchronisation: their
    2-norms, which NaN and Inf propagate through (24x faster on CPU than the largest
    magnitude, the ∞-norm). A finite gradient whose squares overflow also gives an infinite
    norm; only then are the suspects checked entry by entry. ``proxies`` stand in for the
    gradients of some parameters: a tensor computed from the gradient (say ``G P``, a
    projection) that NaN or Inf in it would make non-finite, smaller to reduce; a proxy
    that overflowed from a finite gradient is refused too. For FSDP2 gradients the verdict
    is agreed over their group, so that a NaN in one rank's rows stops every rank instead of
    leaving the others waiting in a collective.

    ``reads`` are 0-d tensors that the caller needs on the host this step (a Fisher
    window's verdict on its updated factor, say): they come back in the same
    synchronisation as the verdict of their device, and their values are returned, in
    order."""
    proxies = proxies or {}
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        grad = grad_of(p)
        if grad.is_sparse:
            raise RuntimeError("this optimiser does not support sparse gradients")
        by_device.setdefault(grad.device, []).append(p)
    values: list[float] = [0.0] * len(reads)
    devices = list(by_device)
    devices += [r.device for r in reads if r.device not in devices]
    for device in dict.fromkeys(devices):
        group = by_device.get(device, [])
        mine = [i for i, r in enumerate(reads) if r.device == device]
        numbers = [reads[i].reshape(1).to(torch.float64) for i in mine]
        if group:
            checked = [proxies[p] if p in proxies else local(grad_of(p)) for p in group]
            suspects = ~torch.isfinite(torch.stack(torch._foreach_norm(checked, 2)))
            numbers.insert(0, suspects.any().reshape(1).to(torch.float64))
        read = torch.cat(numbers).tolist()  # the one synchronisation of this device
        for i, value in zip(mine, read[len(read) - len(mine) :], strict=True):
            values[i] = value
        if not group:
            continue
        bad = None
        if read[0]:
            flagged = ((group[i], checked[i]) for i in suspects.nonzero()[:, 0].tolist())
            bad = next((p for p, t in flagged if not bool(torch.isfinite(t).all())), None)
        shards = {shard.group for shard in map(row_shard, group) if shard is not None}
        for process_group in shards:
            count = torch.tensor([int(bad is not None)], device=suspects.device)
            if all_reduce_sum(count, process_group).item() and bad is None:
                raise NonFiniteError("a gradient holds NaN or Inf in the rows of another rank")
        if bad is not None:
            what = f"the gradient of a parameter of shape {tuple(bad.shape)}"
            check_finite(local(grad_of(bad)), what)
            raise NonFiniteError(f"{what} overflows (to Inf) once projected; nothing was changed")
    return values


class Prepared:
    """What :meth:`AdamWCore._prepare_claimed` hands on to :meth:`AdamWCore._finish_claimed`
    besides its own data: 0-d tensors to ``read`` in the synchronisation of the gradients'
    verdict (their ``values`` are filled in before finishing), whether the step ``needs_host``
    under ``nonfinite="skip_on_device"`` (a refresh, a round boundary), and how to
    ``cancel`` what preparing began if the step is refused."""

    def __init__(self, *, needs_host: bool = False) -> None:
        self.needs_host = needs_host
        self.reads: list[torch.Tensor] = []
        self.values: list[float] = []
        self.on_cancel: Callable[[], None] | None = None  # undoes what preparing began

    def cancel(self) -> None:
        """The step was refused: undo what preparing began (``on_cancel``, if any)."""
        if self.on_cancel is not None:
            self.on_cancel()


class AdamWCore(torch.optim.Optimizer):
    r"""AdamW (the module docstring's step) for every parameter a subclass does not claim.

    Subclasses fill in:

    - :meth:`_claims` ``(p, index)``: whether parameter ``p`` of group ``index`` is stepped
      by :meth:`_step_claimed` instead of AdamW (default: none is);
    - :meth:`_step_claimed` ``(p, group, index)``: that step;
    - :meth:`_validate_group` to check their own group keys (calling ``super()``), and
      :meth:`_group_changed` to cache what they derive from a group;
    - :meth:`_claimed_by` ``(p, group)``: :meth:`_claims` for a group not added yet, and
      :meth:`_check_claimed_state` to refuse a saved state their step cannot take.

    Args:
        params: parameters or groups.
        defaults: every group setting and its default; AdamW's (``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``correct_bias``) are required.
        layerwise: update each parameter from a hook as soon as its gradient is
            accumulated, and free that gradient, so full gradients never coexist. See
            :meth:`step` for the contract.
        accumulation_steps: with ``layerwise``, update on every this many backward passes.
        nonfinite: ``"raise"`` (NaN or Inf in a gradient raises, nothing changed),
            ``"skip"`` (the step is skipped, counted and warned about, as GradScaler does)
            or ``"skip_on_device"`` (the same skip, decided on the device without a host
            synchronisation, as GradScaler with a fused AdamW); see
            :mod:`secondorder.optim._nonfinite`.
        skip_report_every: with ``nonfinite="skip_on_device"``, read the count of skipped
            steps on the host every this many steps (one synchronisation) and warn if it grew.
    """

    #: attributes rebuilt rather than copied by ``copy.deepcopy`` and ``pickle``: name → factory
    _transient: ClassVar[dict[str, Callable[[], Any]]] = {
        "_hooks": list,
        "_stepped": list,
        "_graph_task": lambda: None,
        "_verdict": lambda: None,
        "_mirrors": dict,
    }
    #: whether :meth:`_finish_claimed` writes through ``self._verdict`` (masked writes, for
    #: ``nonfinite="skip_on_device"``); if not, a step with claimed parameters is decided
    #: on the host under that policy, so a subclass that knows nothing of it stays correct
    _masks_claimed_steps: ClassVar[bool] = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        nonfinite: str = "raise",
        skip_report_every: int = 100,
    ) -> None:
        self.nonfinite = check_nonfinite_policy(nonfinite)
        if layerwise and nonfinite != "raise":
            raise ValueError(
                f"nonfinite={nonfinite!r} cannot be combined with layerwise=True: the parameters "
                "whose hooks ran before the bad gradient are already updated, so the step cannot "
                "be skipped whole"
            )
        self.skip_report_every = check_positive_int(skip_report_every, "skip_report_every")
        # nonfinite="skip_on_device": the skip count last read on the host, the steps since
        self._reported_skips = 0
        self._unreported_steps = 0
        # the verdict of the step being taken on the device (None: decided on the host)
        self._verdict: DeviceVerdict | None = None
        # host copies of device step counters that schedule refreshes: exact, or too high by
        # the steps skipped on the device since they were read (see _sync_schedule)
        self._mirrors: dict[torch.Tensor, int] = {}
        self.layerwise = layerwise
        self.accumulation_steps = check_positive_int(accumulation_steps, "accumulation_steps")
        self._backward_counts: dict[torch.Tensor, int] = {}
        self._group_of: dict[torch.Tensor, int] = {}
        self._hooks: list[Any] = []
        self._graph_task: int | None = None  # the backward pass _stepped belongs to
        self._stepped: list[torch.Tensor] = []  # updated by hooks during that backward pass
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- what subclasses fill in
    def _claims(self, p: torch.Tensor, index: int) -> bool:
        """Whether ``p`` (of ``self.param_groups[index]``) is stepped by :meth:`_step_claimed`."""
        return False

    def _step_claimed(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        raise NotImplementedError

    def _prepare_claimed(
        self, p: torch.Tensor, group: dict[str, Any], index: int
    ) -> tuple[torch.Tensor | None, Prepared | None]:
        """The part of a claimed step that changes nothing (or that :meth:`Prepared.cancel`
        undoes), run before the gradients are checked: ``(proxy, prepared)``. ``proxy``
        (``None``: the gradient itself) is checked for NaN and Inf in place of the gradient
        (see :func:`check_gradients`), and ``prepared`` (a :class:`Prepared`, or ``None``) is
        handed to :meth:`_finish_claimed`. The default prepares nothing."""
        return None, None

    def _finish_claimed(
        self, p: torch.Tensor, group: dict[str, Any], index: int, prepared: Any
    ) -> None:
        """The rest of a claimed step, once every gradient has passed its check. A subclass
        that sets ``_masks_claimed_steps`` makes every write of it through ``self._verdict``
        when that is not ``None`` (``nonfinite="skip_on_device"``: :class:`write_back` with
        the verdict, :meth:`_increment`, ``self._verdict.keep``)."""
        self._step_claimed(p, group, index)

    def _schedule(self, p: torch.Tensor, index: int) -> tuple[torch.Tensor, int, int] | None:
        """``(counter, period, phase)`` if a claimed ``p`` has a step that needs the host
        (a refresh) whenever its device step ``counter`` satisfies ``counter % period ==
        phase`` before the step; ``None`` if not (the default)."""
        return None

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for a bad setting of ``group`` (nothing has changed yet)."""
        AdamWSettings.from_group(group)
        if any(p.device.type == "meta" for p in group["params"]):
            raise ValueError(
                "parameters on the meta device hold no values to update: materialise the model "
                "(e.g. model.to_empty(device=...) and initialise it) before building the optimiser"
            )

    def _group_changed(self, index: int) -> None:
        """``self.param_groups[index]`` was added or loaded; refresh what is derived from it."""

    def _claimed_by(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` would be claimed in ``group`` (a checked group, maybe not added yet)."""
        return False

    def _check_claimed_state(
        self, p: torch.Tensor, group: dict[str, Any], saved: dict[str, Any]
    ) -> None:
        """Raise ``ValueError`` unless ``saved`` is a state :meth:`_step_claimed` can take."""

    # ----------------------------------------------------------------- copies
    def __getstate__(self) -> dict[str, Any]:
        """Every attribute the optimiser steps with (torch's keeps only ``defaults``,
        ``state`` and ``param_groups``, and a copy could not step), except hooks: torch's are
        not copied, and the ``layerwise`` ones are registered again on the copy's parameters."""
        if getattr(self, "process_group", None) is not None:
            raise TypeError(
                "an optimiser with a process_group cannot be copied or pickled (a process group "
                "cannot); save its state_dict() instead"
            )
        torch_hooks = {name for name in self.__dict__ if name.startswith("_optimizer_")}
        skipped = torch_hooks | set(self._transient)
        return {name: value for name, value in self.__dict__.items() if name not in skipped}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, factory in self._transient.items():
            setattr(self, name, factory())
        if self.layerwise:
            for index in range(len(self.param_groups)):
                self._register_hooks(index)

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # a refused group leaves the optimiser as it was
            raise
        index = len(self.param_groups) - 1
        self._group_changed(index)
        if self.layerwise:
            self._register_hooks(index)

    def _register_hooks(self, index: int) -> None:
        for p in self.param_groups[index]["params"]:
            if p.requires_grad:
                self._group_of[p] = index
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def remove_hooks(self) -> None:
        """Detach the ``layerwise`` hooks; the optimiser then steps only when :meth:`step` is called."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.layerwise = False

    # ----------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient.

        Every gradient is checked before anything changes: NaN or Inf raises
        :class:`~secondorder.errors.NonFiniteError` and leaves weights and state as they were
        (``nonfinite="skip"``: the step returns, counted and warned about). With
        ``nonfinite="skip_on_device"`` the verdict stays on the device and every write of
        the step is masked by it, with no host synchronisation (but on the steps listed in
        :mod:`secondorder.optim._nonfinite`, decided on the host as ``"skip"`` decides).

        In ``layerwise`` mode the parameters are updated by hooks during ``backward()``
        (each on every ``accumulation_steps``-th backward pass that reached it, after which
        its ``.grad`` is set to ``None``); ``step()`` then only runs the closure. Call it
        anyway once per iteration so LR schedulers see a step. Between updates, gradients
        accumulate in ``.grad`` as usual: do not call ``zero_grad()`` in between. A
        parameter that was frozen when the optimiser was built and is unfrozen since has no
        hook yet: the next ``step()`` applies the gradient it has and hooks it, so that
        from then on it is updated as the others are.

        A NaN or Inf gradient in ``layerwise`` mode cannot leave every weight as it was:
        the parameters whose hooks ran earlier in the same backward pass are already
        updated. So that backward pass is abandoned: ``backward()`` raises
        :class:`~secondorder.errors.NonFiniteError` naming the parameters it had already
        updated; the parameter with the bad gradient and every one not reached yet are not
        updated; every ``.grad`` of the optimiser's parameters is cleared and the
        accumulation count starts again, so the next backward pass starts afresh.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            self._adopt_unfrozen()
            return loss
        work = [
            (p, group, index)
            for index, group in enumerate(self.param_groups)
            for p in group["params"]
            if p.grad is not None
        ]
        if not work:
            return loss
        on_device = self.nonfinite == "skip_on_device"
        if on_device:
            self._sync_schedule(work)
        # a parameter's first step creates its state: decided on the host under every policy
        host = not on_device or any("step" not in self.state[p] for p, _, _ in work)
        plain: dict[int, list[torch.Tensor]] = {}
        claimed, proxies, reads = [], {}, []
        for p, group, index in work:
            if self._claims(p, index):
                proxy, prepared = self._prepare_claimed(p, group, index)
                claimed.append((p, group, index, prepared))
                host = host or not self._masks_claimed_steps
                if proxy is not None:
                    proxies[p] = proxy
                if prepared is not None:
                    reads += prepared.reads
                    host = host or prepared.needs_host
            else:
                plain.setdefault(index, []).append(p)
        params = [p for p, _, _ in work]
        if host:
            try:
                values = check_gradients(params, proxies, reads)
            except NonFiniteError as error:
                self._cancel(claimed)
                if self.nonfinite == "raise":
                    raise
                skip_step(self, error)
                self._count_step()
                return loss
            except BaseException:
                self._cancel(claimed)
                raise
            for *_, prepared in claimed:
                if prepared is not None and prepared.reads:
                    prepared.values, values = (
                        values[: len(prepared.reads)],
                        values[len(prepared.reads) :],
                    )
        else:
            if any(p.grad.is_sparse for p in params):
                self._cancel(claimed)
                raise RuntimeError("this optimiser does not support sparse gradients")
            self._verdict = device_verdict(
                [proxies[p] if p in proxies else local(p.grad) for p in params],
                {shard.group for shard in map(row_shard, params) if shard is not None},
            )
        try:
            for position, (p, group, index, prepared) in enumerate(claimed):
                try:
                    self._finish_claimed(p, group, index, prepared)
                except BaseException:
                    self._cancel(claimed[position + 1 :])
                    raise
            for index, group_params in plain.items():
                self._adamw_steps(group_params, self.param_groups[index])
            if self._verdict is not None:
                count = device_skip_count(self, self.param_groups[0]["params"][0].device)
                count.add_(self._verdict.on(count.device))
        finally:
            self._verdict = None
        self._count_step()
        return loss

    @staticmethod
    def _cancel(claimed: list[tuple[Any, ...]]) -> None:
        """Undo what preparing began, in reverse order, for a refused step."""
        for *_, prepared in reversed(claimed):
            if prepared is not None:
                prepared.cancel()

    # ----------------------------------------------------------------- step counters
    def _new_counter(self, device: torch.device, *, scheduled: bool = False) -> int | torch.Tensor:
        """A step counter at zero: an int, or under ``nonfinite="skip_on_device"`` a 0-d int64
        tensor on ``device`` (``scheduled``: with a host copy, see :meth:`_count`)."""
        if self.nonfinite != "skip_on_device":
            return 0
        counter = torch.zeros((), dtype=torch.int64, device=device)
        if scheduled:
            self._mirrors[counter] = 0
        return counter

    def _count(self, counter: int | torch.Tensor) -> int:
        """A step counter's value on the host: the int, or the host copy of a device counter
        (exact where :meth:`_sync_schedule` read it for a step that may need the host)."""
        if not isinstance(counter, torch.Tensor):
            return counter
        if counter not in self._mirrors:
            self._read_counters([counter])
        return self._mirrors[counter]

    def _increment(self, holder: dict[str, Any], key: str) -> None:
        """``holder[key] += 1``: on the device unless the verdict found NaN or Inf."""
        value = holder[key]
        if not isinstance(value, torch.Tensor):
            holder[key] = value + 1
            return
        if self._verdict is None:
            value.add_(1)
        else:
            self._verdict.increment(value)
        self._advanced(value)

    def _advanced(self, counter: int | torch.Tensor) -> None:
        """A device ``counter`` was counted this step (maybe not, if skipped): its host copy
        goes up by one, exact or too high."""
        if isinstance(counter, torch.Tensor) and counter in self._mirrors:
            self._mirrors[counter] += 1

    def _reset_counter(self, holder: dict[str, Any], key: str, device: torch.device) -> None:
        """``holder[key] = 0`` (in place for a device counter, on a step decided on the host)."""
        value = holder.get(key)
        if isinstance(value, torch.Tensor):
            value.zero_()
            self._mirrors[value] = 0
        else:
            holder[key] = self._new_counter(device, scheduled=True)

    def _read_counters(self, counters: list[torch.Tensor]) -> None:
        """Read device counters into their host copies: one synchronisation per device."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for counter in counters:
            by_device.setdefault(counter.device, []).append(counter)
        for group in by_device.values():
            for counter, value in zip(group, torch.stack(group).tolist(), strict=True):
                self._mirrors[counter] = value

    def _sync_schedule(self, work: list[tuple[torch.Tensor, dict[str, Any], int]]) -> None:
        """Before a step under ``nonfinite="skip_on_device"``: if the host copy of a counter
        that schedules a refresh is unknown or says one may be due, read every such counter
        (one synchronisation), so that the refresh happens at the step count it would under
        ``"raise"``, on the host (which keeps the copy exact there).

        Why that is enough: a step masked on the device adds one to the copy whether or not
        it was taken, so the copy ``c`` is never below the counter ``t``; and no due value
        lies in ``[t, c)``. A read makes ``c = t``; a step decided on the host keeps it; a
        masked step starts from a ``c`` that is not due (else it would have been read), so
        a due value in ``[t', c + 1)`` would lie in ``[t, c)``. Hence when ``t`` is due,
        ``c = t`` is due too, and read."""
        schedules = [
            schedule
            for p, _, index in work
            if self._claims(p, index)
            for schedule in (self._schedule(p, index),)
            if schedule is not None and isinstance(schedule[0], torch.Tensor) and schedule[1] > 1
        ]
        if any(
            counter not in self._mirrors or self._mirrors[counter] % period == phase
            for counter, period, phase in schedules
        ):
            self._read_counters([counter for counter, _, _ in schedules])

    def _count_step(self) -> None:
        """Under ``nonfinite="skip_on_device"``, read and report the skip count every
        ``skip_report_every`` steps."""
        if self.nonfinite != "skip_on_device":
            return
        self._unreported_steps += 1
        if self._unreported_steps >= self.skip_report_every:
            self._reported_skips = report_skips(self, self._reported_skips, self.skip_report_every)
            self._unreported_steps = 0

    def _adopt_unfrozen(self) -> None:
        """``layerwise``: step the parameters unfrozen since their group's hooks were
        registered (they have none), then hook them."""
        for index, group in enumerate(self.param_groups):
            late = [p for p in group["params"] if p.requires_grad and p not in self._group_of]
            stepped = [p for p in late if p.grad is not None]
            check_gradients(stepped)
            for p in stepped:
                self._update(p, group, index)
                p.grad = None
            for p in late:
                self._group_of[p] = index
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _on_grad(self, p: torch.Tensor) -> None:
        task = _graph_task_id()
        if task != self._graph_task:
            self._graph_task, self._stepped = task, []
        count = self._backward_counts.get(p, 0) + 1
        self._backward_counts[p] = count % self.accumulation_steps
        if count < self.accumulation_steps:
            return
        index = self._group_of[p]
        with torch.no_grad():
            try:
                check_gradients([p])
            except NonFiniteError as error:
                self._abandon_backward(error)
            self._update(p, self.param_groups[index], index)
        p.grad = None
        self._stepped.append(p)

    def _abandon_backward(self, error: NonFiniteError) -> None:
        """Clear every gradient and accumulation count, and raise naming what was updated."""
        stepped = [self._describe(p) for p in self._stepped]
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        self._backward_counts.clear()
        self._graph_task, self._stepped = None, []
        done = (
            f"{len(stepped)} parameter(s) were already updated by it: {', '.join(stepped)}"
            if stepped
            else "no parameter was updated by it"
        )
        raise NonFiniteError(
            f"{error}; this backward pass is abandoned: {done}; the others were not, and every "
            "gradient was cleared, so the next backward pass starts afresh"
        ) from None

    def _describe(self, p: torch.Tensor) -> str:
        index = self._group_of[p]
        position = next(i for i, q in enumerate(self.param_groups[index]["params"]) if q is p)
        return f"group {index} #{position} {tuple(p.shape)}"

    def _update(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        if self._claims(p, index):
            self._step_claimed(p, group, index)
        else:
            self._adamw_step(p, group)

    def _adamw_steps(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """:meth:`_adamw_step` on several parameters of one group: on a GPU with
        ``torch._foreach_*`` kernels (the same operations in the same order, one launch per
        operation for all parameters of a dtype instead of one per parameter); on a CPU one
        parameter at a time, each kept in cache through all of its operations, which is 2x
        faster there than a foreach pass per operation over every parameter
        (docs/benchmarks.md, "One optimiser step"). Under ``nonfinite="skip_on_device"``
        one parameter at a time everywhere (the bias corrections of its device counter are
        tensors, which the foreach kernels take only from the host)."""
        batches: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:
            weight = real_view(local(p))
            batches.setdefault((weight.device, weight.dtype), []).append(p)
        for (device, weight_dtype), batch in batches.items():
            if not uses_foreach(device) or self.nonfinite == "skip_on_device":
                for p in batch:
                    self._adamw_step(p, group)
                continue
            dtype = statistics_dtype(weight_dtype)
            grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
            for p in batch:
                state = self.state[p]
                grad = real_view(local(grad_of(p))).to(dtype)
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        grad, memory_format=torch.preserve_format
                    )
                state["step"] += 1
                grads.append(grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            lr, eps = learning_rate(group), group["eps"]
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            if group["correct_bias"]:
                torch._foreach_div_(denoms, [(1 - beta2**step) ** 0.5 for step in steps])
                step_sizes = [-lr / (1 - beta1**step) for step in steps]
            else:
                step_sizes = [-lr] * len(steps)
            torch._foreach_add_(denoms, eps)
            weights = [real_view(local(p)) for p in batch]
            targets = weights if weight_dtype == dtype else [w.to(dtype) for w in weights]
            if group["weight_decay"]:
                torch._foreach_mul_(targets, 1 - lr * group["weight_decay"])
            torch._foreach_addcdiv_(targets, exp_avgs, denoms, step_sizes)
            if targets is not weights:  # low-precision weights: rounded once
                torch._foreach_copy_(weights, targets)

    def _adamw_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        weight = real_view(local(p))
        dtype = statistics_dtype(weight.dtype)
        grad = real_view(local(grad_of(p))).to(dtype)
        if "exp_avg" not in state:
            state["step"] = self._new_counter(grad.device)
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        step_size, denom = adam_moments(state, grad, group, self._verdict)
        with write_back(weight, dtype, self._verdict) as target:
            decoupled_decay(target, group)
            apply_adam(target, state["exp_avg"], denom, step_size)

    # ----------------------------------------------------------------- state
    def _shard_ranks(self, saved_groups: list[dict[str, Any]]) -> dict[Any, int]:
        """``{id: rank}`` for each FSDP2-sharded parameter, by its id in ``saved_groups``
        (an index, or the name ``torch.distributed.checkpoint`` gives it)."""
        ranks = {}
        for saved, group in zip(saved_groups, self.param_groups, strict=False):
            for key, p in zip(saved["params"], group["params"], strict=False):
                shard = row_shard(p)
                if shard is not None:
                    ranks[key] = torch.distributed.get_rank(shard.group)
        return ranks

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``; under FSDP2 the state of each sharded
        parameter (this rank's rows) is keyed by rank, e.g. ``"exp_avg@rank1"``, so that
        ``torch.distributed.checkpoint`` keeps every rank's (see
        :func:`~secondorder.optim._state.tag_rank_local`)."""
        saved = super().state_dict()
        ranks = self._shard_ranks(saved["param_groups"])
        return {**saved, "state": tag_rank_local(saved["state"], ranks)} if ranks else saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but checked first: a state dict
        that does not fit (another number of groups or parameters, a group setting the
        optimiser refuses, state of another shape) raises ``ValueError`` and changes
        nothing. Every state tensor keeps its saved dtype. Step counters saved under another
        ``nonfinite`` policy take this one's form (ints, or device tensors under
        ``"skip_on_device"``)."""
        ranks = self._shard_ranks(state_dict["param_groups"])
        state_dict = {**state_dict, "state": untag_rank_local(state_dict["state"], ranks)}
        self._check_loadable(state_dict)
        load_state_dict_exactly(self, state_dict)
        self._backward_counts.clear()
        self._mirrors.clear()
        for p, state in self.state.items():
            _convert_counters(state, p.device, self.nonfinite == "skip_on_device")
        self._reported_skips = read_skip_count(self) if self.param_groups[0]["params"] else 0
        self._unreported_steps = 0
        for index in range(len(self.param_groups)):
            self._group_changed(index)

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can take ``state_dict`` whole."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} parameter groups, the optimiser "
                f"{len(self.param_groups)}"
            )
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"parameter group {index} of the state dict has {len(saved['params'])} "
                    f"parameters, the optimiser's {len(group['params'])}"
                )
            candidate = {**saved, "params": group["params"]}
            try:
                self._validate_group(candidate)
            except KeyError as error:
                raise ValueError(
                    f"parameter group {index} of the state dict lacks {error}"
                ) from None
            for key, p in zip(saved["params"], group["params"], strict=True):
                if key in state_dict["state"]:
                    self._check_state(p, candidate, state_dict["state"][key])

    def _check_state(self, p: torch.Tensor, group: dict[str, Any], saved: Any) -> None:
        if not isinstance(saved, dict):
            raise ValueError(f"the saved state of a parameter is a {type(saved).__name__}")
        if self._claimed_by(p, group):
            self._check_claimed_state(p, group, saved)
        else:
            check_shapes(
                saved, dict.fromkeys(("exp_avg", "exp_avg_sq"), real_view(local(p)).shape), p
            )


def _convert_counters(state: dict[str, Any], device: torch.device, on_device: bool) -> None:
    """Put every step counter of ``state`` (nested dicts too, a Fisher window's aside) in the
    form of the policy: a 0-d int64 tensor on ``device``, or an int."""
    for key, value in state.items():
        if key in COUNTERS and isinstance(value, torch.Tensor):
            state[key] = value.to(device=device, dtype=torch.int64) if on_device else int(value)
        elif key in COUNTERS and isinstance(value, int):
            if on_device:
                state[key] = torch.full((), value, dtype=torch.int64, device=device)
        elif isinstance(value, dict) and key != "fisher":
            _convert_counters(value, device, on_device)


def check_shapes(saved: dict[str, Any], shapes: dict[str, Any], p: torch.Tensor) -> None:
    """Raise ``ValueError`` unless each of ``shapes`` present in ``saved`` is a tensor of
    that shape; ``p`` names the parameter in the message."""
    for key, shape in shapes.items():
        if key not in saved:
            continue
        value = saved[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"the saved {key} of a parameter of shape {tuple(p.shape)} is {found}, "
                f"expected {tuple(shape)}: is this the state of another model or optimiser?"
            )
