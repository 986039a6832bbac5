import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.prune import cubic_sparsity_schedule


@settings(max_examples=60, deadline=None)
@given(
    initial=st.floats(0, 0.5),
    extra=st.floats(0, 0.49),
    start=st.integers(0, 50),
    length=st.integers(0, 300),
    frequency=st.integers(1, 40),
)
def test_cubic_schedule_hits_its_end_points_and_only_rises(
    initial, extra, start, length, frequency
):
    final = initial + extra
    schedule = cubic_sparsity_schedule(initial, final, start, start + length, frequency)
    assert schedule(0) == (initial if start > 0 or length > 0 else final)
    assert schedule(start) == (initial if length > 0 else final)
    assert schedule(start + length) == final  # exactly, even when frequency does not divide
    assert schedule(start + length + 17) == final
    values = [schedule(t) for t in range(start + length + 2)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    steps = schedule.pruning_steps
    assert steps[-1] == start + length and steps[0] == start
    # the target changes at pruning steps only
    for t in range(1, start + length + 2):
        if values[t] != values[t - 1]:
            assert schedule.is_pruning_step(t) and t in steps


def test_cubic_schedule_follows_zhu_and_gupta():
    schedule = cubic_sparsity_schedule(0.0, 0.8, 100, 200, 10)
    # halfway: s_f + (s_i - s_f)(1 - 1/2)^3 = 0.8 - 0.8/8
    assert schedule(150) == pytest.approx(0.7)
    assert schedule(159) == schedule(150)  # held between pruning steps
    assert schedule.pruning_steps == list(range(100, 201, 10))
    assert not schedule.is_pruning_step(155) and schedule.is_pruning_step(200)
    odd = cubic_sparsity_schedule(0.1, 0.5, 0, 25, 10)
    assert odd.pruning_steps == [0, 10, 20, 25] and odd(24) < 0.5 == odd(25)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.5, 0.2, 0, 10, 1), "below initial"),
        ((0.0, 1.0, 0, 10, 1), r"final sparsity must be in \[0, 1\)"),
        ((-0.1, 0.5, 0, 10, 1), "initial sparsity"),
        ((0.0, 0.5, 10, 5, 1), "start_step <= end_step"),
        ((0.0, 0.5, 0, 10, 0), "frequency must be a positive integer"),
    ],
)
def test_bad_schedules_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        cubic_sparsity_schedule(*args)
