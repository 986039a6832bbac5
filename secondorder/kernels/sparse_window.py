"""Triton kernels for the two passes over a compressed (sparse) M-FAC window.

The window holds ``m`` rows of ``k`` entries each: ``values`` (``[m, k]``, the storage
dtype) and ``indices`` (``[m, k]``, int32 coordinates into vectors of length ``d``), of
which the first ``n`` rows are in use. One step reads them twice:

1. :func:`gather_dots`: ``t_i = Σ_j values[i, j] · x[indices[i, j]]``. Each program owns a
   range of the ``k`` entry columns and leaves one partial sum per row; torch adds the
   partials in a fixed order, so the result is bit-reproducible (no atomics).
2. :func:`scatter_combine`: ``out = scale · x + Σ_i c_i · scatter(values[i], indices[i])``.
   Rows of different programs may hit the same coordinate, so the kernel adds with
   ``tl.atomic_add``: the sum is exact to float32 rounding, but the order in which the
   contributions to one coordinate arrive varies between runs, and so may the last bits.
   :mod:`secondorder.kernels` uses the deterministic torch twin instead when
   ``torch.use_deterministic_algorithms(True)`` is set (PyTorch's own convention).

Both read the rows in their storage dtype and accumulate in float32 (float64 for
float64 vectors). Block sizes follow a fixed rule (no autotuner), as for the dense kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dense_window import _TL_ACC, _workspace
from .reference import accumulation_dtype


@triton.jit
def _gather_dot_kernel(
    values,
    indices,
    x,
    partial,
    n,
    k,
    stride_row,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0)
    first = pid * (BLOCK_K * CHUNKS)
    for r0 in range(0, n, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        row_offsets = rows.to(tl.int64) * stride_row
        acc = tl.zeros([BLOCK_N], dtype=ACC)
        for c in tl.static_range(CHUNKS):
            cols = first + c * BLOCK_K + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (cols < k)[None, :]
            offsets = row_offsets[:, None] + cols[None, :]
            where = tl.load(indices + offsets, mask=mask, other=0)
            value = tl.load(values + offsets, mask=mask, other=0.0).to(ACC)
            gathered = tl.load(x + where, mask=mask, other=0.0).to(ACC)
            acc += tl.sum(value * gathered, axis=1)
        tl.store(partial + pid * n + rows, acc, mask=row_mask)


@triton.jit
def _scatter_kernel(
    values,
    indices,
    c,
    out,
    n,
    k,
    stride_row,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < k
    for r0 in range(0, n, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
        where = tl.load(indices + offsets, mask=mask, other=0)
        value = tl.load(values + offsets, mask=mask, other=0.0).to(ACC)
        coef = tl.load(c + rows, mask=row_mask, other=0.0)
        tl.atomic_add(out + where, value * coef[:, None], mask=mask)


def _check(values: torch.Tensor, indices: torch.Tensor, n: int) -> None:
    if values.dim() != 2 or values.shape != indices.shape:
        raise ValueError(
            f"values and indices must be [m, k] tensors of one shape, got "
            f"{tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if values.stride(1) != 1 or indices.stride() != values.stride():
        raise ValueError("values and indices must have contiguous rows and the same strides")
    if indices.dtype != torch.int32:
        raise ValueError(f"indices must be int32, got {indices.dtype}")
    if not 0 <= n <= values.shape[0]:
        raise ValueError(f"n={n} rows requested from a window of {values.shape[0]}")


def gather_dots(
    values: torch.Tensor,
    indices: torch.Tensor,
    x: torch.Tensor,
    n: int,
    *,
    block_n: int = 8,
    block_k: int = 256,
    chunks: int = 4,
) -> torch.Tensor:
    """``t_i = Σ_j values[i, j] · x[indices[i, j]]`` for ``i < n``; see
    :func:`secondorder.kernels.reference.gather_dots`."""
    _check(values, indices, n)
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous vector, got shape {tuple(x.shape)}")
    acc = accumulation_dtype(values.dtype, x.dtype)
    k = values.shape[1]
    programs = max(1, triton.cdiv(k, block_k * chunks))
    partial = _workspace((programs, n), acc, values.device)
    _gather_dot_kernel[(programs,)](
        values, indices, x, partial, n, k, values.stride(0),
        ACC=_TL_ACC[acc], BLOCK_N=block_n, BLOCK_K=block_k, CHUNKS=chunks,
    )  # fmt: skip
    return partial.sum(0)


def scatter_combine(
    values: torch.Tensor,
    indices: torch.Tensor,
    c: torch.Tensor,
    n: int,
    dim: int,
    x: torch.Tensor | None = None,
    scale: float = 0.0,
    *,
    block_n: int = 8,
    block_k: int = 256,
) -> torch.Tensor:
    """``scale · x + Σ_{i<n} c_i · scatter(values[i], indices[i])``, a dense vector of length
    ``dim``; see :func:`secondorder.kernels.reference.scatter_combine`."""
    _check(values, indices, n)
    if x is not None and (x.dim() != 1 or x.shape[0] != dim):
        raise ValueError(f"x must be a vector of length {dim}, got shape {tuple(x.shape)}")
    acc = accumulation_dtype(values.dtype, c.dtype, *(() if x is None else (x.dtype,)))
    out = torch.zeros(dim, dtype=acc, device=values.device) if x is None else x.to(acc) * scale
    k = values.shape[1]
    if n and k:
        c = c.to(acc).contiguous()
        _scatter_kernel[(triton.cdiv(k, block_k),)](
            values, indices, c, out, n, k, values.stride(0),
            ACC=_TL_ACC[acc], BLOCK_N=block_n, BLOCK_K=block_k,
        )  # fmt: skip
    return out
