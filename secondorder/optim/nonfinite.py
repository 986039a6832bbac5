"""What an optimiser does with a gradient that holds NaN or Inf: raise, skip, or skip on the device.

Every optimiser takes ``nonfinite=``:

``"raise"`` (the default)
    raises :class:`~secondorder.errors.NonFiniteError` and changes nothing.

``"skip"``
    ``torch.amp.GradScaler``'s convention, for mixed-precision training where an overflow
    now and then is expected: the step changes nothing and returns, the count of skipped
    steps is kept in the state (``state[first parameter]["skipped_steps"]``, saved and
    restored like the rest) and a :class:`~secondorder.errors.SkippedStepWarning` is issued
    at the 1st, 10th, 100th... skip, so a run that skips every step is never silent.

Either way the verdict costs one reduction over the gradients and one host
synchronisation per step.

``"skip_on_device"`` (the AdamW family: GaLoreAdamW, NaturalGaLore, DCTAdamW, SST, SOAP)
    the convention of ``torch.amp.GradScaler`` with a fused ``torch.optim.AdamW``: the same
    skip, decided on the device without a host synchronisation. The verdict ``found_inf``
    (a 0-d bool tensor: whether the 2-norm, accumulated in float64, of some gradient or of
    its projection is not finite) stays on the device, and every write of the step is
    ``torch.where(found_inf, old, new)``: weights, moments, step counters and bases are
    left bit for bit as they were when it is true. So that a skipped step can leave the
    step count alone, the step counters are 0-d int64 tensors on the parameter's device
    (ints under the other policies; a state saved under one policy loads under another)
    and the bias corrections are computed on the device; on a CPU a step that is taken is
    bit-identical to the same step under ``"raise"``. The count of skipped steps is a 0-d
    int64 tensor in the same place as for ``"skip"``, incremented on the device; the host
    reads it every ``skip_report_every`` steps (one synchronisation then) and issues a
    ``SkippedStepWarning`` if it grew since the last read.

    Some steps need the host anyway, and take the verdict there, as ``"skip"`` does (the
    skip is then counted in the same tensor, and reported at the next read): a parameter's
    first step (its state is created); a refresh on a schedule (GaLore's SVD, SOAP's
    eigenbases, a DCT refresh every ``update_proj_gap > 1`` steps) and SST's round
    boundaries; NaturalGaLore's every step (its Fisher windows read the host once per step,
    and the verdict rides in that read).

    So that refreshes happen at the same step counts as under ``"raise"``, the policy keeps
    a host copy of each step counter that schedules a refresh: exact, or (after steps that
    may have been skipped) too high. When a copy says a refresh may be due, the counters
    are read first (:meth:`NonFinitePolicy.sync`). ``layerwise=True`` refuses both skip
    modes (the parameters updated by earlier hooks cannot be rolled back). MFAC refuses
    ``"skip_on_device"``: inserting a gradient into its window advances the ring on the host
    and updates the ``n × n`` factor with host decisions, which a mask cannot undo, and its
    step already reads the host once, where ``"skip"`` costs nothing more.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .._checks import check_finite
from .._distributed import all_reduce_sum, local, row_shard
from ..errors import NonFiniteError, SkippedStepWarning

__all__ = ["COUNTERS", "MODES", "NonFinitePolicy", "check_gradients"]

MODES = ("raise", "skip", "skip_on_device")

#: the state keys that count steps: ints, or 0-d int64 tensors under "skip_on_device"
COUNTERS = ("step", "round_step", "skipped_steps")

Counter = int | torch.Tensor


class NonFinitePolicy:
    """An optimiser's answer to NaN or Inf gradients, and the bookkeeping that answer needs.

    One object per optimiser. It decides a step (:func:`check_gradients` on the host, or
    :meth:`decide_on_device`), holds the step's ``found_inf`` while it runs (``None``: the
    step was decided on the host and every write is plain), skips or raises
    (:meth:`refuse`), and keeps the step counters: ints, or device tensors with host copies
    under ``"skip_on_device"``."""

    def __init__(self, mode: str, report_every: int, supported: Sequence[str] = MODES) -> None:
        if mode not in MODES:
            raise ValueError(f"nonfinite must be 'raise', 'skip' or 'skip_on_device', got {mode!r}")
        if mode not in supported:
            raise ValueError(f"nonfinite={mode!r} is not supported by this optimiser")
        self.mode = mode
        self.report_every = report_every
        self.found_inf: torch.Tensor | None = None
        self._host_counts: dict[torch.Tensor, int] = {}
        self._reported_skips = 0
        self._unreported_steps = 0

    @property
    def on_device(self) -> bool:
        return self.mode == "skip_on_device"

    # ----------------------------------------------------------------- deciding a step
    def decide_on_device(
        self, checked: Iterable[torch.Tensor], agree: Iterable[torch.distributed.ProcessGroup]
    ) -> None:
        """Set ``found_inf`` for the tensors ``checked`` (gradients, or projections standing
        in for them) without a host synchronisation: one float64 norm reduction per device,
        summed over the devices and over ``agree``'s process groups (FSDP2: every rank skips
        together)."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in checked:  # a complex tensor as its real view (the dtype of a norm is real)
            by_device.setdefault(t.device, []).append(
                torch.view_as_real(t) if t.is_complex() else t
            )
        bad = [
            (~torch.isfinite(torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float64)))).sum()
            for ts in by_device.values()
        ]
        device = next(iter(by_device))
        count = torch.stack([b.to(device) for b in bad]).sum()
        for group in agree:
            all_reduce_sum(count, group)
        self.found_inf = count > 0

    def refuse(self, optimizer: torch.optim.Optimizer, error: NonFiniteError) -> None:
        """A step decided on the host found NaN or Inf: raise under ``"raise"``, else count
        the skip (under ``"skip"`` warning at every power of 10)."""
        if self.mode == "raise":
            raise error
        state = _first_state(optimizer)
        if self.on_device:
            self.skip_count(optimizer).add_(1)
            return
        count = int(state.get("skipped_steps", 0)) + 1
        state["skipped_steps"] = count
        if count == 10 ** (len(str(count)) - 1):  # 1, 10, 100, ...
            warnings.warn(
                f"{type(optimizer).__name__} has skipped {count} step(s) whose gradients held "
                f"NaN or Inf (the last: {error}); the count is in its state as 'skipped_steps'",
                SkippedStepWarning,
                stacklevel=4,
            )

    def finish_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After a step: count a device skip, and every ``report_every`` steps read the count
        (one synchronisation) and warn if it grew."""
        if not self.on_device:
            return
        if self.found_inf is not None:
            skipped = self.skip_count(optimizer)
            skipped.add_(self.found_inf.to(skipped.device))
        self.found_inf = None
        self._unreported_steps += 1
        if self._unreported_steps < self.report_every:
            return
        count = int(_first_state(optimizer).get("skipped_steps", 0))
        if count > self._reported_skips:
            warnings.warn(
                f"{type(optimizer).__name__} has skipped {count} step(s) whose gradients held "
                f"NaN or Inf, {count - self._reported_skips} of them in the last "
                f"{self.report_every} steps (read every {self.report_every} steps with "
                "nonfinite='skip_on_device'); the count is in its state as 'skipped_steps'",
                SkippedStepWarning,
                stacklevel=4,
            )
        self._reported_skips, self._unreported_steps = count, 0

    def skip_count(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """The 0-d int64 count of skipped steps on the first parameter's device."""
        state = _first_state(optimizer)
        count = state.get("skipped_steps", 0)
        if not isinstance(count, torch.Tensor):
            device = optimizer.param_groups[0]["params"][0].device
            count = state["skipped_steps"] = torch.full((), int(count), device=device)
        return count

    def loaded(self, optimizer: torch.optim.Optimizer) -> None:
        """A state was loaded: counters take this policy's form, host copies are dropped."""
        self._host_counts.clear()
        for p, state in optimizer.state.items():
            if isinstance(p, torch.Tensor) and isinstance(state, dict):
                _convert_counters(state, p.device, self.on_device)
        first = optimizer.param_groups[0]["params"]
        self._reported_skips = int(_first_state(optimizer).get("skipped_steps", 0)) if first else 0
        self._unreported_steps = 0

    # ----------------------------------------------------------------- writes and counters
    def keep(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """``old ← new`` unless ``found_inf``."""
        if self.found_inf is None:
            old.copy_(new)
        else:
            torch.where(self.found_inf.to(old.device), old, new.to(old.dtype), out=old)

    def new_counter(self, device: torch.device, *, scheduled: bool = False) -> Counter:
        """A step counter at zero: an int, or a 0-d int64 tensor on ``device`` under
        ``"skip_on_device"`` (``scheduled``: with a host copy, for refresh schedules)."""
        if not self.on_device:
            return 0
        counter = torch.zeros((), dtype=torch.int64, device=device)
        if scheduled:
            self._host_counts[counter] = 0
        return counter

    def value(self, counter: Counter) -> int:
        """A counter's value on the host: the int, or the host copy of a device counter
        (exact where :meth:`sync` read it for a step that may need the host)."""
        if not isinstance(counter, torch.Tensor):
            return counter
        if counter not in self._host_counts:
            self.read([counter])
        return self._host_counts[counter]

    def increment(self, holder: dict[str, Any], key: str) -> None:
        """``holder[key] += 1``, unless ``found_inf`` (on the device)."""
        value = holder[key]
        if not isinstance(value, torch.Tensor):
            holder[key] = value + 1
            return
        value.add_(1 if self.found_inf is None else ~self.found_inf.to(value.device))
        if value in self._host_counts:  # the copy goes up by one: exact, or too high
            self._host_counts[value] += 1

    def reset(self, holder: dict[str, Any], key: str, device: torch.device) -> None:
        """``holder[key] = 0`` (a device counter in place, on a step decided on the host)."""
        value = holder.get(key)
        if isinstance(value, torch.Tensor):
            value.zero_()
            self._host_counts[value] = 0
        else:
            holder[key] = self.new_counter(device, scheduled=True)

    def read(self, counters: list[torch.Tensor]) -> None:
        """Read device counters into their host copies: one synchronisation per device."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for counter in counters:
            by_device.setdefault(counter.device, []).append(counter)
        for group in by_device.values():
            for counter, value in zip(group, torch.stack(group).tolist(), strict=True):
                self._host_counts[counter] = value

    def sync(self, schedules: list[tuple[torch.Tensor, int, int]]) -> None:
        """Before a step under ``"skip_on_device"``, for refreshes due when ``counter % period
        == phase``: if a host copy is unknown or says one may be due, read every scheduling
        counter (one synchronisation), so that the refresh happens at the step count it
        would under ``"raise"``, decided on the host (which keeps the copy exact there).

        Why that is enough: a step masked on the device adds one to the copy whether or not
        it was taken, so the copy ``c`` is never below the counter ``t``, and no due value
        lies in ``[t, c)``: a read makes ``c = t``; a step decided on the host keeps it; a
        masked step starts from a ``c`` that is not due (else it would have been read).
        Hence when ``t`` is due, ``c = t`` is due too, and read."""
        schedules = [s for s in schedules if isinstance(s[0], torch.Tensor) and s[1] > 1]
        if any(
            counter not in self._host_counts or self._host_counts[counter] % period == phase
            for counter, period, phase in schedules
        ):
            self.read([counter for counter, _, _ in schedules])

    def __getstate__(self) -> dict[str, Any]:
        """Copies start without host copies of counters (they are read again when needed)."""
        return {**self.__dict__, "_host_counts": {}, "found_inf": None}


def _first_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return optimizer.state[optimizer.param_groups[0]["params"][0]]


def _convert_counters(state: dict[str, Any], device: torch.device, on_device: bool) -> None:
    """Put every step counter of ``state`` (nested dicts too) in the form of the policy: a 0-d
    int64 tensor on ``device``, or an int."""
    for key, value in state.items():
        if key in COUNTERS and isinstance(value, torch.Tensor):
            state[key] = value.to(device=device, dtype=torch.int64) if on_device else int(value)
        elif key in COUNTERS and isinstance(value, int) and on_device:
            state[key] = torch.full((), value, dtype=torch.int64, device=device)
        elif isinstance(value, dict):
            _convert_counters(value, device, on_device)


def check_gradients(
    params: list[torch.Tensor],
    proxies: dict[torch.Tensor, torch.Tensor] | None = None,
    reads: Sequence[torch.Tensor] = (),
) -> list[float]:
    """Raise :class:`NonFiniteError` before anything changes if a gradient holds NaN or Inf.

    One reduction over all gradients of a device and one host synchronisation: their
    2-norms, which NaN and Inf propagate through. A finite gradient whose squares overflow
    also gives an infinite norm; only then are the suspects checked entry by entry.
    ``proxies`` stand in for the gradients of some parameters: a tensor computed from the
    gradient (``G P``, a projection) that NaN or Inf in it would make non-finite, smaller to
    reduce; a proxy that overflowed from a finite gradient is refused too. For FSDP2
    gradients the verdict is agreed over their group.

    ``reads`` are 0-d tensors the caller needs on the host this step (a Fisher window's
    verdict on its factor): they come back in the same synchronisation, in order."""
    proxies = proxies or {}
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        by_device.setdefault(p.grad.device, []).append(p)  # type: ignore[union-attr]
    values: list[float] = [0.0] * len(reads)
    devices = list(by_device)
    devices += [r.device for r in reads if r.device not in devices]
    for device in dict.fromkeys(devices):
        group = by_device.get(device, [])
        wanted = [i for i, r in enumerate(reads) if r.device == device]
        numbers = [reads[i].reshape(1).to(torch.float64) for i in wanted]
        if group:
            checked = [proxies[p] if p in proxies else local(p.grad) for p in group]  # type: ignore[arg-type]
            suspects = ~torch.isfinite(torch.stack(torch._foreach_norm(checked, 2)))
            numbers.insert(0, suspects.any().reshape(1).to(torch.float64))
        read = torch.cat(numbers).tolist()  # the one synchronisation of this device
        for i, value in zip(wanted, read[len(read) - len(wanted) :], strict=True):
            values[i] = value
        if group:
            _raise_for(group, checked, suspects if read[0] else None)
    return values


def _raise_for(
    group: list[torch.Tensor], checked: list[torch.Tensor], suspects: torch.Tensor | None
) -> None:
    """Raise for the first non-finite tensor among the ``suspects`` (agreed over FSDP2
    groups, so that a NaN in one rank's rows stops every rank)."""
    bad = None
    if suspects is not None:
        flagged = ((group[i], checked[i]) for i in suspects.nonzero()[:, 0].tolist())
        bad = next((p for p, t in flagged if not bool(torch.isfinite(t).all())), None)
    shards = {shard.group for shard in map(row_shard, group) if shard is not None}
    for process_group in shards:
        count = torch.tensor([int(bad is not None)], device=group[0].device)
        if all_reduce_sum(count, process_group).item() and bad is None:
            raise NonFiniteError("a gradient holds NaN or Inf in the rows of another rank")
    if bad is not None:
        what = f"the gradient of a parameter of shape {tuple(bad.shape)}"
        check_finite(local(bad.grad), what)
        raise NonFiniteError(f"{what} overflows (to Inf) once projected; nothing was changed")
