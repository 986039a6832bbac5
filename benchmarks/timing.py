"""The one way the benchmarks time things: contenders in turn, round after round, best of each.

On a shared machine other jobs only ever add time, so the best of several calls is the
figure that moves least between runs (as ``timeit`` reports); calling the contenders in
turn makes a slow spell hit all of them alike, so their ratios hold even when the
absolute times do not. On CUDA every call is timed to the end of its kernels, and
:func:`peak_bytes` reads the allocator's high-water mark.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_side_by_side(
    fns: dict[str, Callable[[], object]],
    *,
    budget: float = 4.0,
    max_rounds: int = 50,
    warmup: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Best wall time of each function, calling them in turn, round after round, for
    ``budget`` seconds (at least ``min(3, max_rounds)`` rounds), after one untimed round
    if ``warmup``."""
    if warmup:
        for fn in fns.values():
            fn()
        synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min(3, max_rounds) or (
        time.perf_counter() - start < budget and rounds < max_rounds
    ):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: min(values) for name, values in times.items()}


def timed(
    fn: Callable[[], object],
    *,
    budget: float = 2.0,
    max_repeats: int = 50,
    warmup: bool = True,
    device: torch.device | str | None = None,
) -> float:
    """Best wall time of ``fn`` alone: :func:`timed_side_by_side` of one function."""
    return timed_side_by_side(
        {"fn": fn}, budget=budget, max_rounds=max_repeats, warmup=warmup, device=device
    )["fn"]


def peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """The allocator's peak during ``fn`` on a CUDA ``device`` (``None`` elsewhere: CPU
    allocations are not tracked by torch; measure a subprocess's peak RSS instead)."""
    device = torch.device(device)
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)
