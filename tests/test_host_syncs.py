"""Host synchronisations per optimiser step (``benchmarks/host_syncs.py`` counts them).

MFAC: a steady-state step makes exactly one, the window's read of its finiteness verdict
and its factor's, whatever the window, grafting, momentum or damping, and so does a step
that refactors the small system. The projected optimisers (GaLoreAdamW, DCTAdamW,
NaturalGaLore, SST): a steady step makes one under ``nonfinite="raise"`` (the gradients'
verdict, NaturalGaLore's windows' verdicts in the same read) and none under
``"skip_on_device"`` (NaturalGaLore: still its one), a skipped step too. A step that gains
one fails here."""

import pytest
import torch

from secondorder._workloads.host_syncs import (
    CONFIGS,
    GAP,
    PROJECTED,
    counting_syncs,
    projected_configs,
    projected_syncs_per_step,
    syncs_per_step,
)
from secondorder.errors import SkippedStepWarning

PROJECTED.update(projected_configs())


def test_the_counter_sees_reads_from_python_and_from_inside_torch():
    x = torch.ones(3)
    with counting_syncs() as syncs:
        float(x.sum())
        bool(x.all())
        x.tolist()
        torch.tensor([1.0], device="cpu")
        torch.linalg.cholesky(torch.eye(2))  # checks LAPACK's info on the host, in C++
        x.sum()  # no read
    kinds = [s.kind for s in syncs]
    assert kinds.count("read inside torch") == 1
    assert len(syncs) == 5, syncs


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("factor_update", ["refactor", "rank2"])
def test_a_steady_step_makes_one_host_sync(name, factor_update):
    steps = syncs_per_step(CONFIGS[name], factor_update)
    assert steps.steady and (factor_update == "refactor" or steps.refactor)
    # the first two steps copy the per-member constants (settings, which members have a
    # gradient) to the device, once; every later step, filling the window or full, reads
    # the host once
    later = {"filling": steps.filling[1:], "steady": steps.steady, "refactor": steps.refactor}
    for kind, counted in later.items():
        for syncs in counted:
            assert len(syncs) == 1, f"{kind} step: {syncs}"
            assert syncs[0].kind == "read: tolist" and "_read" in syncs[0].where


def _is_the_verdict(sync) -> bool:
    return sync.kind == "read: tolist" and "check_gradients" in sync.where


@pytest.mark.parametrize("name", list(PROJECTED))
def test_a_steady_projected_step_makes_one_sync_under_raise(name):
    steps = projected_syncs_per_step(name, "raise")
    assert steps.steady
    for syncs in steps.steady:
        assert len(syncs) == 1 and _is_the_verdict(syncs[0]), syncs


@pytest.mark.parametrize("name", list(PROJECTED))
def test_a_steady_projected_step_makes_none_on_the_device(name):
    """None under skip_on_device, but NaturalGaLore's one (its windows' factor verdicts, the
    gradients' riding along); a step that reads the skip count, one more (that read)."""
    steps = projected_syncs_per_step(name, "skip_on_device")
    expected = 1 if name == "NaturalGaLore" else 0
    assert steps.steady and steps.report
    for syncs in steps.steady:
        assert len(syncs) == expected, syncs
        assert all(_is_the_verdict(sync) for sync in syncs), syncs
    for syncs in steps.report:  # (nothing to read if no step was ever masked)
        assert expected <= len(syncs) <= expected + 1, syncs
        assert all("finish_step" in sync.where for sync in syncs[expected:]), syncs


@pytest.mark.parametrize("name", [n for n in PROJECTED if n != "NaturalGaLore"])
def test_a_step_skipped_on_the_device_makes_no_sync(name):
    """A NaN between refreshes is masked on the device: no sync on that step (the skips
    are reported by the next read of the count)."""
    with pytest.warns(SkippedStepWarning, match="skipped 1 step"):
        steps = projected_syncs_per_step(name, "skip_on_device", steps=3 * GAP, poison=(2, 7))
    assert len(steps.poisoned) == 2
    assert all(len(syncs) == 0 for syncs in steps.poisoned), steps.poisoned


@pytest.mark.parametrize("name", list(PROJECTED))
def test_a_refresh_step_on_the_device_adds_at_most_the_read_of_the_counters(name):
    """Refresh steps (SST: round boundaries) read the host: under skip_on_device one more
    time than under raise, to read the counters that say the refresh is due."""
    raising = projected_syncs_per_step(name, "raise").refresh
    on_device = projected_syncs_per_step(name, "skip_on_device").refresh
    for before, after in zip(raising, on_device, strict=True):
        assert len(after) <= len(before) + 1, after
