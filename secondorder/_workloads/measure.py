"""Wall time and peak memory of one call, for the comparisons of the demo and the benchmarks."""

from __future__ import annotations

import ctypes
import gc
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


@dataclass
class Measurement:
    """``seconds`` of wall time; ``peak_bytes`` above the memory held at the start, or ``None`` if unknown."""

    seconds: float = float("nan")
    peak_bytes: int | None = None


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), flags=re.MULTILINE)
    if match is None:
        raise OSError(f"no {field} in {_STATUS}")
    return int(match.group(1))


def _release_freed_memory() -> None:
    """Return memory freed earlier to the system, so that the next peak starts from what is held."""
    gc.collect(1)  # the young generations: a full collection takes ~0.5 s after transformers loads
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def measured(device: torch.device) -> Iterator[Measurement]:
    """Time the block and measure its peak memory on ``device``.

    CUDA: the allocator's peak above what was allocated at the start. CPU (Linux):
    the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``)
    above the resident size at the start; it counts every allocation of the process,
    the model's own activations included, and in a long-lived process memory kept by
    the allocator from earlier calls can hide part of the peak: the benchmark
    measures each call in a fresh process. Elsewhere ``peak_bytes`` stays ``None``.
    """
    result = Measurement()
    _release_freed_memory()
    before: int | None = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current size
            before = _status_kib("VmRSS") * 1024
        except OSError:
            before = None
    start = time.perf_counter()
    yield result
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - start
    if before is not None:
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = _status_kib("VmHWM") * 1024
        result.peak_bytes = max(0, peak - before)
