"""Input checks shared by the whole library, so every entry point fails the same clear way."""

from __future__ import annotations

import math
import os

import torch

from .errors import InsufficientMemoryError, NonFiniteError


def check_damping(damp: float, name: str = "damp") -> float:
    if not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {damp!r}")
    return float(damp)


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming how many entries of ``t`` are NaN or Inf."""
    if bool(torch.isfinite(t.sum())):
        return  # one reduction, no mask: a NaN or Inf anywhere makes the sum non-finite
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int(t.numel() - finite.sum())
        raise NonFiniteError(f"{what} has {bad} NaN or Inf entries out of {t.numel()}")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on ``device``, or ``None`` if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def ensure_fits(nbytes: int, device: torch.device, what: str, advice: str) -> None:
    """Raise :class:`InsufficientMemoryError` if ``nbytes`` cannot be allocated on ``device``."""
    free = free_bytes(device)
    if free is not None and nbytes > free:
        raise InsufficientMemoryError(
            f"{what} needs {format_bytes(nbytes)} but only {format_bytes(free)} is free on "
            f"{device}; {advice}"
        )
