"""Sparsity schedules for gradual pruning during training."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SparsitySchedule", "cubic_sparsity_schedule"]


@dataclass(frozen=True)
class SparsitySchedule:
    r"""The cubic schedule of Zhu and Gupta (2017), "To prune, or not to prune".

    At the pruning steps ``t = start_step, start_step + frequency, …`` and
    ``end_step`` itself (always a pruning step, so the schedule ends exactly on
    ``final``), the target sparsity is

    .. math:: s_t = s_f + (s_i - s_f) \left(1 - \frac{t - t_0}{t_1 - t_0}\right)^3,

    pruning fast while many redundant weights remain and slowly near the end.
    Between pruning steps it holds the last value; before ``start_step`` it is
    ``initial`` and from ``end_step`` on ``final``.
    """

    initial: float
    final: float
    start_step: int
    end_step: int
    frequency: int

    def __post_init__(self) -> None:
        for name in ("initial", "final"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"{name} sparsity must be in [0, 1), got {value!r}")
        if self.final < self.initial:
            raise ValueError(f"final sparsity {self.final} is below initial {self.initial}")
        if not 0 <= self.start_step <= self.end_step:
            raise ValueError(
                f"need 0 <= start_step <= end_step, got {self.start_step} and {self.end_step}"
            )
        if (
            isinstance(self.frequency, bool)
            or not isinstance(self.frequency, int)
            or self.frequency < 1
        ):
            raise ValueError(f"frequency must be a positive integer, got {self.frequency!r}")

    @property
    def pruning_steps(self) -> list[int]:
        """The steps at which the target changes: every ``frequency`` from the start, and the end."""
        steps = list(range(self.start_step, self.end_step, self.frequency))
        return [*steps, self.end_step]

    def is_pruning_step(self, step: int) -> bool:
        """Whether the target sparsity is (re)set at ``step``."""
        if self.start_step <= step < self.end_step:
            return (step - self.start_step) % self.frequency == 0
        return step == self.end_step

    def __call__(self, step: int) -> float:
        """The target sparsity at ``step``."""
        if step >= self.end_step:
            return self.final
        if step < self.start_step:
            return self.initial
        last = self.start_step + (step - self.start_step) // self.frequency * self.frequency
        remaining = 1 - (last - self.start_step) / (self.end_step - self.start_step)
        return self.initial + (self.final - self.initial) * (1 - remaining**3)


def cubic_sparsity_schedule(
    initial: float, final: float, start_step: int, end_step: int, frequency: int
) -> SparsitySchedule:
    """The cubic sparsity schedule (Zhu and Gupta, 2017); see :class:`SparsitySchedule`.

    Example, pruning every 10 steps from step 100 to step 1000 during training::

        schedule = cubic_sparsity_schedule(0.0, 0.9, 100, 1000, 10)
        for step in range(num_steps):
            train_one_step()
            if schedule.is_pruning_step(step):
                pruner.prune(schedule(step))
    """
    return SparsitySchedule(initial, final, start_step, end_step, frequency)
