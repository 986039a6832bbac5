"""Host synchronisations per MFAC step (``benchmarks/host_syncs.py`` counts them): a
steady-state step makes exactly one, the window's read of its finiteness verdict and its
factor's, whatever the window, grafting, momentum or damping, and so does a step that
refactors the small system. A step that gains one fails here."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from host_syncs import CONFIGS, counting_syncs, syncs_per_step


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
