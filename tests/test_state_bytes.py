"""The optimiser-state bytes the demo and the benchmarks report: every buffer once."""

import pytest
import torch

from secondorder._workloads.training import optimizer_state_bytes
from secondorder.optim import MFAC


def _stepped(optimizer_factory, steps: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    optimizer = optimizer_factory(model.parameters())
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(8, 10)), torch.arange(8) % 3).backward()
        optimizer.step()
    d = sum(p.numel() for p in model.parameters())
    return optimizer, d


def test_adamw_state_is_its_two_moments_and_step_counts():
    optimizer, d = _stepped(torch.optim.AdamW)
    assert optimizer_state_bytes(optimizer) == 2 * 4 * d + 4 * 4  # 4 tensors' float32 steps


@pytest.mark.parametrize(
    ("settings", "vectors"),
    [
        ({"graft": None, "damp": 0.1}, 0),
        ({"graft": None, "damp": 0.1, "momentum": 0.9}, 1),
        ({}, 2),  # Adam grafting's two moments
        ({"density": 0.25}, 2),
    ],
)
def test_mfac_state_is_its_window_once_plus_its_vectors(settings, vectors):
    """The window's rows live in the optimiser's state: counted once, not twice."""
    optimizer, d = _stepped(lambda p: MFAC(p, prior=None, num_grads=4, **settings))
    steps = 4 * 4  # one float32 step count per parameter tensor
    assert optimizer_state_bytes(optimizer) == optimizer.window.nbytes + vectors * 4 * d + steps


def test_mfac_state_refers_to_the_live_sparse_error_buffer_between_saves():
    """A new error buffer each step would leave the state holding the previous one alive
    (d numbers more than the window's nbytes) until the next state_dict()."""
    optimizer, _ = _stepped(lambda p: MFAC(p, prior=None, num_grads=4, density=0.25), steps=5)
    record = next(iter(optimizer.state.values()))
    held = next(v for v in record.values() if isinstance(v, dict))["window"]["error"]
    assert held.data_ptr() == optimizer.window._error.data_ptr()
