"""The hot loops of the library, each with a plain-torch twin.

Dispatch: Triton for CUDA tensors when Triton is installed, the twin in
:mod:`secondorder.kernels.reference` otherwise. The environment variable
``SECONDORDER_KERNELS`` overrides the choice:

- ``auto`` (default) as above;
- ``torch`` always the twin;
- ``triton`` always Triton (on CPU tensors this needs ``TRITON_INTERPRET=1``,
  which is how the kernels are tested without a GPU).

Padding: the windows allocate their rows with a length rounded up to a multiple of
:data:`ROW_ALIGNMENT` elements (zeros beyond the real ones) and run the Triton kernels over
that padded width, with vectors padded alike (:func:`padded_vector`). Triton's launcher
then sees a row length, a row stride and pointers divisible by 16, and compiles the loads
of the rows as 128-bit vector loads; with the real length, the mask ``cols < d`` splits
every vector into scalar loads (``benchmarks/kernel_aot.py`` compiles every variant ahead
of time and counts them).

This package imports nothing else of ``secondorder``.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

from . import reference

__all__ = [
    "ROW_ALIGNMENT",
    "backend",
    "combine",
    "gather_dots",
    "padded_vector",
    "padded_width",
    "pads_rows",
    "row_dots",
    "scatter_combine",
    "write_row_and_dot",
]

_ENV = "SECONDORDER_KERNELS"

ROW_ALIGNMENT = 16
"""Rows are padded to a multiple of this many elements (and vectors to the same length)."""
_CHOICES = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend(tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: which implementation runs for ``tensor``.

    Read at every call from ``SECONDORDER_KERNELS`` (see the module's description).

    Raises:
        ValueError: ``SECONDORDER_KERNELS`` is not ``auto``, ``torch`` or ``triton``.
        RuntimeError: ``SECONDORDER_KERNELS=triton`` but Triton is not installed, or
            ``tensor`` is not on a GPU and ``TRITON_INTERPRET=1`` is not set.
    """
    choice = os.environ.get(_ENV, "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"{_ENV}={choice!r}; expected one of {', '.join(_CHOICES)}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{_ENV}=triton but Triton is not installed")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{_ENV}=triton on a {tensor.device.type} tensor needs TRITON_INTERPRET=1 "
                "(Triton compiles for GPUs only)"
            )
        return "triton"
    return "triton" if tensor.is_cuda and triton_available() else "torch"


def padded_width(length: int) -> int:
    """``length`` rounded up to a multiple of :data:`ROW_ALIGNMENT`."""
    return -(-length // ROW_ALIGNMENT) * ROW_ALIGNMENT


def pads_rows(tensor: torch.Tensor) -> bool:
    """Whether the passes over rows on ``tensor``'s device run over the padded width: the
    Triton kernels do (their loads are vectorised only then); the torch twins run over the
    real width, a strided view, and so never pay for padding a vector."""
    return backend(tensor) == "triton"


def padded_vector(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` (contiguous, of length at most ``width``) followed by zeros up to ``width``, at
    an address divisible by 16 bytes: ``x`` itself when it already is."""
    if x.shape[0] == width and x.data_ptr() % 16 == 0:
        return x
    out = x.new_zeros(width)
    out[: x.shape[0]] = x
    return out


def _implementation(tensor: torch.Tensor, rows: str = "dense") -> ModuleType:
    """The module whose kernels run for ``tensor``; ``rows`` is ``"dense"`` or ``"sparse"``."""
    if backend(tensor) == "torch":
        return reference
    # imports triton; deferred so CPU-only use never pays for it
    if rows == "dense":
        from . import dense_window

        return dense_window
    from . import sparse_window

    return sparse_window


def row_dots(G: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """``G[:n] @ x``, accumulated in float32 (float64 for float64 vectors).

    Args:
        G: the window, ``[m, d]`` (padded rows allowed), in its storage dtype.
        x: a vector of length ``d``.
        n: how many rows are in use.

    Returns:
        The ``n`` dot products, in the accumulation dtype.
    """
    return _implementation(G).row_dots(G, x, n)


def write_row_and_dot(G: torch.Tensor, row: int, x: torch.Tensor, n: int) -> torch.Tensor:
    """Store ``x`` in ``G[row]`` (in G's dtype); return ``G[:n] @ G[row]`` from the same pass.

    Args:
        G: the window, ``[m, d]``; row ``row`` is overwritten.
        row: the slot to write, below ``n``.
        x: the new row, of length ``d``.
        n: how many rows are in use, the new one included.

    Returns:
        The ``n`` dot products of the rows with the stored (rounded) new row.
    """
    return _implementation(G).write_row_and_dot(G, row, x, n)


def combine(
    G: torch.Tensor, c: torch.Tensor, n: int, x: torch.Tensor | None = None, scale: float = 0.0
) -> torch.Tensor:
    """``scale * x + G[:n]ᵀ c`` from one pass over ``G`` (``G[:n]ᵀ c`` without ``x``).

    Args:
        G: the window, ``[m, d]``.
        c: the ``n`` coefficients of the rows.
        n: how many rows are in use.
        x: a vector of length ``d`` to add, or ``None``.
        scale: the factor of ``x``.

    Returns:
        A new vector of length ``d``, in the accumulation dtype.
    """
    return _implementation(G).combine(G, c, n, x, scale)


def gather_dots(
    values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, n: int
) -> torch.Tensor:
    """``t_i = Σ_j values[i, j] · x[indices[i, j]]`` over the first ``n`` rows of a sparse window.

    Args:
        values: the kept entries of each row, ``[m, k]``, in the storage dtype.
        indices: their coordinates, ``[m, k]``, int32.
        x: a dense vector.
        n: how many rows are in use.

    Returns:
        The ``n`` dot products ``t``, in the accumulation dtype.
    """
    return _implementation(values, "sparse").gather_dots(values, indices, x, n)


def scatter_combine(
    values: torch.Tensor,
    indices: torch.Tensor,
    c: torch.Tensor,
    n: int,
    dim: int,
    x: torch.Tensor | None = None,
    scale: float = 0.0,
) -> torch.Tensor:
    """``scale * x + Σ_{i<n} c_i · scatter(values[i], indices[i])``, dense, of length ``dim``.

    The Triton kernel adds with atomics, whose order varies on a GPU; under
    ``torch.use_deterministic_algorithms(True)`` the torch twin runs instead, which then
    adds in a fixed order (bit-reproducible, slower).

    Args:
        values: the kept entries of each row, ``[m, k]``.
        indices: their coordinates, ``[m, k]``, int32, each below ``dim``.
        c: the ``n`` coefficients of the rows.
        n: how many rows are in use.
        dim: the length of the dense result.
        x: a dense vector of length ``dim`` to add, or ``None``.
        scale: the factor of ``x``.

    Returns:
        A new dense vector of length ``dim``, in the accumulation dtype.
    """
    if torch.are_deterministic_algorithms_enabled():
        return reference.scatter_combine(values, indices, c, n, dim, x, scale)
    return _implementation(values, "sparse").scatter_combine(values, indices, c, n, dim, x, scale)
