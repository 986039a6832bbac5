"""The library's own exceptions; each says what went wrong and that nothing was changed.

They subclass the built-in exception a caller would otherwise expect, so code that
catches ``ValueError`` or ``MemoryError`` keeps working::

    from secondorder.errors import NonFiniteError

    try:
        optimizer.step()
    except NonFiniteError:
        optimizer.zero_grad()  # skip this batch; the window and the weights are untouched
"""

from __future__ import annotations

__all__ = [
    "InsufficientMemoryError",
    "NonFiniteError",
    "NondeterminismError",
    "NotPositiveDefiniteError",
    "SkippedStepWarning",
]


class NonFiniteError(ValueError):
    """A gradient or vector holds NaN or Inf; nothing was changed."""


class NotPositiveDefiniteError(ValueError):
    """A system that is positive definite in exact arithmetic is not in floating point
    (damping below the rounding of the products that built it); nothing was changed."""


class InsufficientMemoryError(MemoryError):
    """A buffer would not fit on its device; raised before anything is allocated."""


class NondeterminismError(RuntimeError):
    """Two passes over the data gave different losses or gradients."""


class SkippedStepWarning(UserWarning):
    """An optimiser built with ``nonfinite="skip"`` skipped steps whose gradients held NaN or
    Inf (issued at the 1st, 10th, 100th... skip: counted, never silent); with
    ``nonfinite="skip_on_device"``, the count read every ``skip_report_every`` steps grew."""
