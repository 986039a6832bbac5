"""Small models for the demo, the examples and the tests."""

from __future__ import annotations

from torch import nn


def digits_cnn() -> nn.Module:
    """A 38k-parameter CNN for 8x8 digits: two 3x3 convolutions, a pool, two linear layers."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def digits_mlp(hidden: int = 128) -> nn.Module:
    """The 64-``hidden``-10 MLP of the pruning benchmarks."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
