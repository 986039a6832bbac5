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

``"skip_on_device"`` (the AdamW-core optimisers: GaLoreAdamW, NaturalGaLore, DCTAdamW, SST)
    the convention of ``torch.amp.GradScaler`` with a fused ``torch.optim.AdamW``: the same
    skip, decided on the device without a host synchronisation. The verdict ``found_inf``
    (a 0-d bool tensor: whether the 2-norm, accumulated in float64, of some gradient or of
    its projection is not finite) stays on the device, and every write of the step is
    ``torch.where(found_inf, old, new)``: weights, moments, step counters and bases are
    left bit for bit as they were when it is true. So that a skipped step can leave the
    step count alone, the step counters are 0-d int64 tensors on the parameter's device
    (``state[p]["step"]``; ints under the other policies; a state saved under one policy
    loads under another) and the bias corrections are computed on the device; on a CPU
    a step that is taken is bit-identical to the same step under ``"raise"`` (on a GPU it
    may differ in the last bit: the host's scalars are multiplied by their reciprocal
    there). The count of skipped steps is a 0-d int64 tensor in the same place as for
    ``"skip"``, incremented on the device; the host reads it every ``skip_report_every``
    steps (default 100, one synchronisation then) and issues a ``SkippedStepWarning`` if
    it grew since the last read: at most one warning per ``skip_report_every`` steps,
    never silent.

    Some steps need the host anyway, and take the verdict there, as ``"skip"`` does (the
    skip is then counted in the same tensor, and reported at the next read):

    - a parameter's first step (its state is created);
    - a refresh that comes every ``update_proj_gap > 1`` steps (GaLore's SVD, which
      synchronises inside torch anyway, a DCT refresh on a schedule) and SST's round
      boundaries (the re-SVD, and the sampling of pairs on the host). DCTAdamW's default,
      a refresh on every step, is a product and a top-k on the device: masked like the rest
      (the old columns and moments are kept if the step is skipped);
    - NaturalGaLore's every step: its Fisher windows read the host once per step
      (whether the updated factor passed its check, and the ring's bookkeeping), and
      the verdict rides in that read.

    So that refreshes happen at the same step counts as under ``"raise"``, an optimiser
    with a refresh schedule keeps a host copy of each scheduling counter, exact or (after
    steps that may have been skipped) too high: when the copy says a refresh may be due,
    the counters are read first (one more synchronisation: on refresh steps, and after a
    skip on the step where the copy says a refresh is due though the count is not).
    docs/benchmarks.md lists the synchronisations of steady and refresh steps apart. ``layerwise=True`` refuses ``"skip_on_device"`` as it
    refuses ``"skip"``. MFAC refuses it: inserting a gradient into its window advances the
    ring's bookkeeping on the host and updates the ``n × n`` factor with host decisions
    (refactor or not), which cannot be undone by a mask, and the step already makes one
    host synchronisation, where ``"skip"`` costs nothing more.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import NonFiniteError, SkippedStepWarning

__all__ = [
    "NONFINITE",
    "DeviceVerdict",
    "check_nonfinite_policy",
    "report_skips",
    "skip_step",
]

NONFINITE = ("raise", "skip", "skip_on_device")

#: the state keys that count steps: ints, or 0-d int64 tensors under "skip_on_device"
COUNTERS = ("step", "round_step", "skipped_steps")


def check_nonfinite_policy(nonfinite: str, supported: tuple[str, ...] = NONFINITE) -> str:
    if nonfinite not in NONFINITE:
        raise ValueError(
            f"nonfinite must be 'raise', 'skip' or 'skip_on_device', got {nonfinite!r}"
        )
    if nonfinite not in supported:
        raise ValueError(f"nonfinite={nonfinite!r} is not supported by this optimiser")
    return nonfinite


def _first_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return optimizer.state[optimizer.param_groups[0]["params"][0]]


def skip_step(optimizer: torch.optim.Optimizer, error: NonFiniteError) -> None:
    """Count a skipped step in the first parameter's state; under ``"skip"`` warn at every
    power of 10 (under ``"skip_on_device"`` the count is a device tensor, reported by
    :func:`report_skips`)."""
    state = _first_state(optimizer)
    if getattr(optimizer, "nonfinite", None) == "skip_on_device":
        first = optimizer.param_groups[0]["params"][0]
        device_skip_count(optimizer, first.device).add_(1)
        return
    count = int(state.get("skipped_steps", 0)) + 1
    state["skipped_steps"] = count
    if count == 10 ** (len(str(count)) - 1):  # 1, 10, 100, ...
        warnings.warn(
            f"{type(optimizer).__name__} has skipped {count} step(s) whose gradients held NaN "
            f"or Inf (the last: {error}); the count is in its state as 'skipped_steps'",
            SkippedStepWarning,
            stacklevel=3,
        )


def device_skip_count(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """The 0-d int64 count of skipped steps (created at zero, or from a saved int)."""
    state = _first_state(optimizer)
    count = state.get("skipped_steps", 0)
    if not isinstance(count, torch.Tensor):
        count = torch.full((), int(count), dtype=torch.int64, device=device)
        state["skipped_steps"] = count
    return count


def read_skip_count(optimizer: torch.optim.Optimizer) -> int:
    """The count of skipped steps on the host (a synchronisation for a device count)."""
    return int(_first_state(optimizer).get("skipped_steps", 0))


def report_skips(optimizer: torch.optim.Optimizer, reported: int, every: int) -> int:
    """Read the count of skipped steps (one synchronisation) and warn if it grew since
    ``reported``; return the count."""
    count = read_skip_count(optimizer)
    if count > reported:
        warnings.warn(
            f"{type(optimizer).__name__} has skipped {count} step(s) whose gradients held NaN "
            f"or Inf, {count - reported} of them in the last {every} steps (read every "
            f"{every} steps with nonfinite='skip_on_device'); the count is in its state as "
            "'skipped_steps'",
            SkippedStepWarning,
            stacklevel=3,
        )
    return count


class DeviceVerdict:
    """``found_inf`` of one step, a 0-d bool tensor on each device the step writes to (the
    same verdict on each), and the masked write every update of the step goes through."""

    def __init__(self, found: dict[torch.device, torch.Tensor]) -> None:
        self._found = found

    def on(self, device: torch.device) -> torch.Tensor:
        found = self._found.get(device)
        if found is None:  # a tensor on a device without gradients (not in practice)
            first = next(iter(self._found.values()))
            found = self._found[device] = first.to(device)
        return found

    def keep(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """``old ← new`` unless ``found_inf``: ``torch.where(found_inf, old, new)``, in place."""
        torch.where(self.on(old.device), old, new.to(old.dtype), out=old)

    def increment(self, counter: torch.Tensor) -> None:
        """``counter += 1`` unless ``found_inf`` (a 0-d int64 tensor)."""
        counter.add_(~self.on(counter.device))


def device_verdict(
    checked: Iterable[torch.Tensor],
    agree: Iterable[torch.distributed.ProcessGroup] = (),
) -> DeviceVerdict:
    """``found_inf`` for the tensors ``checked`` (gradients, or projections standing in for
    them), on the device: one reduction per device, no host synchronisation. The 2-norms
    accumulate in float64, which a finite float32 or bfloat16 tensor cannot overflow (a
    finite float64 gradient above about 1e154 counts as non-finite). Under FSDP2 the
    verdict is summed over ``agree``'s process groups (on the device), so every rank skips
    together."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in checked:  # a complex tensor as its real view (the dtype of a norm is real)
        by_device.setdefault(t.device, []).append(torch.view_as_real(t) if t.is_complex() else t)
    bad = {
        device: (~torch.isfinite(torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float64))))
        .any()
        .reshape(1)
        for device, ts in by_device.items()
    }
    if len(bad) > 1:  # one verdict for the step: every device's, summed on each
        total = {d: torch.stack([b.to(d) for b in bad.values()]).sum(0) for d in bad}
        bad = {d: t > 0 for d, t in total.items()}
    groups = list(agree)
    if groups:
        from .._distributed import all_reduce_sum

        for device, flag in bad.items():
            count = flag.to(torch.int64)
            for group in groups:
                all_reduce_sum(count, group)
            bad[device] = count > 0
    return DeviceVerdict({device: flag.reshape(()) for device, flag in bad.items()})
