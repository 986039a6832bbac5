"""What an optimiser does with a gradient that holds NaN or Inf: raise, or skip the step.

``"raise"`` (the default) raises :class:`~secondorder.errors.NonFiniteError` and changes
nothing. ``"skip"`` is ``torch.amp.GradScaler``'s convention, for mixed-precision training
where an overflow now and then is expected: the step changes nothing and returns, the
count of skipped steps is kept in the state (``state[first parameter]["skipped_steps"]``,
saved and restored like the rest) and a :class:`~secondorder.errors.SkippedStepWarning`
is issued at the 1st, 10th, 100th... skip, so a run that skips every step is never silent.
Either way the verdict costs one reduction over the gradients and one host synchronisation
per step.
"""

from __future__ import annotations

import warnings

import torch

from ..errors import NonFiniteError, SkippedStepWarning

__all__ = ["NONFINITE", "check_nonfinite_policy", "skip_step"]

NONFINITE = ("raise", "skip")


def check_nonfinite_policy(nonfinite: str) -> str:
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    return nonfinite


def skip_step(optimizer: torch.optim.Optimizer, error: NonFiniteError) -> None:
    """Count a skipped step in the first parameter's state, and warn at every power of 10."""
    first = optimizer.param_groups[0]["params"][0]
    state = optimizer.state[first]
    count = int(state.get("skipped_steps", 0)) + 1
    state["skipped_steps"] = count
    if count == 10 ** (len(str(count)) - 1):  # 1, 10, 100, ...
        warnings.warn(
            f"{type(optimizer).__name__} has skipped {count} step(s) whose gradients held NaN "
            f"or Inf (the last: {error}); the count is in its state as 'skipped_steps'",
            SkippedStepWarning,
            stacklevel=3,
        )
