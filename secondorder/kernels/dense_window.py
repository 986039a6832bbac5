"""Triton kernels for the two passes over a dense M-FAC gradient window.

One step of the sliding-window algorithm reads the window ``G`` (``[m, d]``,
of which ``n`` rows are in use) exactly twice:

1. :func:`write_row_and_dot`: store the new gradient into its ring slot and
   compute its dot products with every row, ``t = G[:n] @ g``, in the same pass;
2. :func:`combine`: ``out = scale * x + G[:n]ᵀ c``.

Both read ``G`` in its storage dtype and accumulate in float32 (float64 when
the vectors are float64). Each program owns a contiguous range of columns, so
no two programs touch the same element of ``G`` and nothing needs atomics: the
dot products leave one partial sum per program, which torch reduces in a fixed
order, so every step is bit-reproducible.

Block sizes follow a fixed rule rather than an autotuner: an autotuner may pick
different configurations in two runs, which changes the order of summation
and breaks bit-identical resumption. The rule (:func:`dot_blocks`) halves the
columns of the dot pass when it accumulates in float64: compiled ahead of time
for sm_90 (``benchmarks/kernel_aot.py``), 512 columns of a float64 window took 160
to 168 registers and the ``WRITE`` variant spilled.

The windows pad their rows to a multiple of 16 elements and pass the padded width
as ``d`` (:mod:`secondorder.kernels`), so that the loads of ``G`` compile to
128-bit vector loads; any ``d`` works, at the price of scalar loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import accumulation_dtype

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _to_storage(value, DTYPE: tl.constexpr):
    """Round to the window's dtype, to nearest even, exactly as torch does.

    bfloat16 is done by hand on the float32 bits: Triton's interpreter truncates
    in ``.to(tl.bfloat16)``, and a kernel must write the same bits everywhere.
    """
    if tl.bfloat16 == DTYPE:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return value.to(DTYPE)


@triton.jit
def _dot_kernel(
    G,
    x,
    partial,
    n,
    d,
    stride_row,
    write_row,
    WRITE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0)
    first_col = pid * (BLOCK_D * CHUNKS)
    for r0 in range(0, n, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        row_offsets = rows.to(tl.int64) * stride_row
        acc = tl.zeros([BLOCK_N], dtype=ACC)
        for k in tl.static_range(CHUNKS):
            cols = first_col + k * BLOCK_D + tl.arange(0, BLOCK_D)
            col_mask = cols < d
            vector = tl.load(x + cols, mask=col_mask, other=0.0)
            if WRITE:
                # The dot products are with the new row as stored, rounded to G's dtype.
                vector = _to_storage(vector, G.dtype.element_ty)
            vector = vector.to(ACC)
            tile = tl.load(
                G + row_offsets[:, None] + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(ACC)
            if WRITE:
                # The slot being overwritten already counts as holding the new row.
                tile = tl.where(rows[:, None] == write_row, vector[None, :], tile)
            acc += tl.sum(tile * vector[None, :], axis=1)
        tl.store(partial + pid * n + rows, acc, mask=row_mask)
    if WRITE:
        for k in tl.static_range(CHUNKS):
            cols = first_col + k * BLOCK_D + tl.arange(0, BLOCK_D)
            col_mask = cols < d
            value = tl.load(x + cols, mask=col_mask, other=0.0)
            target = G + write_row.to(tl.int64) * stride_row + cols
            tl.store(target, _to_storage(value, G.dtype.element_ty), mask=col_mask)


@triton.jit
def _combine_kernel(
    G,
    c,
    x,
    scale,
    out,
    n,
    d,
    stride_row,
    HAS_X: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for r0 in range(0, n, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        coef = tl.load(c + rows, mask=row_mask, other=0.0)
        tile = tl.load(
            G + rows.to(tl.int64)[:, None] * stride_row + cols[None, :],
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(ACC)
        acc += tl.sum(tile * coef[:, None], axis=0)
    if HAS_X:
        acc += tl.load(scale) * tl.load(x + cols, mask=col_mask, other=0.0).to(ACC)
    tl.store(out + cols, acc.to(out.dtype.element_ty), mask=col_mask)


def _workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised scratch memory; tests replace this to poison it."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check(G: torch.Tensor, x: torch.Tensor | None, n: int) -> None:
    if G.dim() != 2 or G.stride(1) != 1:
        raise ValueError("the window must be a 2-D tensor with contiguous rows")
    if not 0 <= n <= G.shape[0]:
        raise ValueError(f"n={n} rows requested from a window of {G.shape[0]}")
    if x is not None and (x.dim() != 1 or x.shape[0] != G.shape[1] or not x.is_contiguous()):
        raise ValueError(
            f"expected a contiguous vector of length {G.shape[1]}, got {tuple(x.shape)}"
        )


def dot_blocks(acc: torch.dtype) -> dict[str, int]:
    """``block_n``, ``block_d`` and ``chunks`` of the dot pass for accumulation dtype ``acc``:
    each program reads ``chunks`` tiles of ``block_n`` rows by ``block_d`` columns."""
    return {"block_n": 8, "block_d": 512 if acc == torch.float32 else 256, "chunks": 4}


def _dot(G, x, n, row, block_n, block_d, chunks):
    _check(G, x, n)
    acc = accumulation_dtype(G.dtype, x.dtype)
    rule = dot_blocks(acc)
    block_n = block_n or rule["block_n"]
    block_d = block_d or rule["block_d"]
    chunks = chunks or rule["chunks"]
    programs = triton.cdiv(G.shape[1], block_d * chunks)
    partial = _workspace((programs, n), acc, G.device)
    _dot_kernel[(programs,)](
        G, x, partial, n, G.shape[1], G.stride(0), 0 if row is None else row,
        WRITE=row is not None, ACC=_TL_ACC[acc], BLOCK_N=block_n, BLOCK_D=block_d, CHUNKS=chunks,
    )  # fmt: skip
    return partial.sum(0)


def row_dots(
    G: torch.Tensor,
    x: torch.Tensor,
    n: int,
    *,
    block_n: int | None = None,
    block_d: int | None = None,
    chunks: int | None = None,
) -> torch.Tensor:
    """``G[:n] @ x``; see :func:`secondorder.kernels.reference.row_dots`. Block sizes not
    given follow :func:`dot_blocks`."""
    return _dot(G, x, n, None, block_n, block_d, chunks)


def write_row_and_dot(
    G: torch.Tensor,
    row: int,
    x: torch.Tensor,
    n: int,
    *,
    block_n: int | None = None,
    block_d: int | None = None,
    chunks: int | None = None,
) -> torch.Tensor:
    """Store ``x`` in ``G[row]`` and return ``G[:n] @ G[row]``, in one pass (block sizes as
    for :func:`row_dots`)."""
    if not 0 <= row < n:
        raise ValueError(f"row {row} is outside the {n} rows in use")
    return _dot(G, x, n, row, block_n, block_d, chunks)


def combine(
    G: torch.Tensor,
    c: torch.Tensor,
    n: int,
    x: torch.Tensor | None = None,
    scale: float = 0.0,
    *,
    block_n: int = 16,
    block_d: int = 512,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale * x + G[:n]ᵀ c`` in one pass over ``G``, written into ``out`` if given."""
    _check(G, x, n)
    acc = accumulation_dtype(G.dtype, c.dtype, *(() if x is None else (x.dtype,)))
    d = G.shape[1]
    if out is None:
        out = _workspace((d,), acc, G.device)
    elif out.shape != (d,) or out.dtype != acc or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {acc} vector of length {d}")
    c = c.to(acc).contiguous()
    factor = torch.tensor([scale], dtype=acc, device=G.device)
    _combine_kernel[(triton.cdiv(d, block_d),)](
        G, c, c if x is None else x, factor, out, n, d, G.stride(0),
        HAS_X=x is not None, ACC=_TL_ACC[acc], BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return out
