"""Random probe vectors ``z`` with ``E[z zᵀ] = I``, for the stochastic estimators."""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["Distribution", "probes"]

Distribution = Literal["rademacher", "gaussian"]


def probes(
    dim: int,
    count: int,
    distribution: Distribution,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[dim, count]`` random vectors with ``E[z zᵀ] = I``, drawn on the CPU for reproducibility."""
    if distribution == "rademacher":
        # drawn in floating point (the same stream as integers) to save conversion passes
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        z = torch.randint(0, 2, (dim, count), generator=generator, dtype=wide).mul_(2).sub_(1)
    elif distribution == "gaussian":
        z = torch.randn(dim, count, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    return z.to(dtype=dtype, device=device)
