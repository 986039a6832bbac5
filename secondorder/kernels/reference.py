"""Plain-torch twins of the Triton kernels: the oracle in tests and the CPU path.

The dense ones work on a gradient window ``G`` of shape ``[m, d]`` of which only the
first ``n`` rows are in use; the sparse ones on a window of ``m`` compressed rows, each
``k`` values and the ``k`` int32 coordinates they sit at. Rows may be stored in a
narrower dtype than the vectors; products are always accumulated in
:func:`accumulation_dtype`.
"""

from __future__ import annotations

import torch

# Upcasting a low-precision window for a matmul needs a wider copy. It is made in
# tiles of whole rows (contiguous) of at most this many elements, so that the copy
# stays in cache between being written and being read: with 2^24-element tiles
# (64 MiB in float32) a bf16 pass over a 256 x 1e6 window took 500 ms on the
# development CPU, with 2^21 it took 115 ms (float32 storage: 95 ms).
_UPCAST_TILE_ELEMENTS = 1 << 21


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any operand is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _tiles(G: torch.Tensor, acc: torch.dtype):
    """``(rows, columns, G[rows, columns] in acc)`` tiles covering ``G``, row block by row
    block."""
    n, d = G.shape
    width = min(d, _UPCAST_TILE_ELEMENTS)
    height = max(1, _UPCAST_TILE_ELEMENTS // width)
    for top in range(0, n, height):
        for left in range(0, d, width):
            rows, columns = slice(top, top + height), slice(left, left + width)
            yield rows, columns, G[rows, columns].to(acc)


def row_dots(G: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """``t = G[:n] @ x`` in the accumulation dtype."""
    acc = accumulation_dtype(G.dtype, x.dtype)
    if x.dtype != acc:
        x = x.to(acc)
    if G.dtype == acc:
        return (G if n == G.shape[0] else G[:n]) @ x
    t = torch.zeros(n, dtype=acc, device=G.device)
    for rows, columns, tile in _tiles(G[:n], acc):
        t[rows].addmv_(tile, x[columns])
    return t


def write_row_and_dot(G: torch.Tensor, row: int, x: torch.Tensor, n: int) -> torch.Tensor:
    """Store ``x`` into ``G[row]`` (rounded to the storage dtype), then return ``G[:n] @ G[row]``:
    the new row and column of the Gram matrix ``G Gᵀ``."""
    G[row].copy_(x)
    return row_dots(G, G[row], n)


def row_dots_as_written(G: torch.Tensor, row: int, x: torch.Tensor, n: int) -> torch.Tensor:
    """The dot products :func:`write_row_and_dot` returns, ``G[:n] @ x`` with ``G[row]`` read as
    ``x``, but without writing ``x`` (already rounded to ``G``'s dtype) into ``G``: whoever
    calls it writes the row once the step is accepted, and has nothing to put back if not."""
    acc = accumulation_dtype(G.dtype, x.dtype)
    if x.dtype != acc:
        x = x.to(acc)
    t = row_dots(G, x, n)
    torch.dot(x, x, out=t[row])
    return t


def combine(
    G: torch.Tensor, c: torch.Tensor, n: int, x: torch.Tensor | None = None, scale: float = 0.0
) -> torch.Tensor:
    """``scale * x + G[:n]ᵀ c`` in the accumulation dtype (``G[:n]ᵀ c`` when ``x`` is None)."""
    acc = accumulation_dtype(G.dtype, c.dtype, *(() if x is None else (x.dtype,)))
    if c.dtype != acc:
        c = c.to(acc)
    if G.dtype == acc:
        out = c @ (G if n == G.shape[0] else G[:n])  # Gᵀ c, without a transposed view
    else:
        out = torch.zeros(G.shape[1], dtype=acc, device=G.device)
        for rows, columns, tile in _tiles(G[:n], acc):
            out[columns].addmv_(tile.T, c[rows])
    if x is not None:
        out.add_(x.to(acc), alpha=scale)
    return out


# Rows of a sparse window are gathered and scattered this many entries at a time, so that
# the float32 temporaries (gathered values, scaled values) stay in cache: at n = 1024,
# k = 1e4, d = 1e6 on the development CPU, 2^14 entries took 33 / 35 ms (gather / scatter),
# 2^16 to 2^18 took 16-18 / 22-24 ms, 2^20 took 24 / 35 ms.
_SPARSE_TILE_ENTRIES = 1 << 17


def _row_blocks(n: int, k: int):
    height = max(1, _SPARSE_TILE_ENTRIES // max(k, 1))
    for top in range(0, n, height):
        yield slice(top, min(top + height, n))


def gather_dots(
    values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, n: int
) -> torch.Tensor:
    """``t_i = Σ_j values[i, j] · x[indices[i, j]]`` for the first ``n`` rows of a sparse window
    (``values`` and ``indices`` of shape ``[m, k]``), in the accumulation dtype."""
    acc = accumulation_dtype(values.dtype, x.dtype)
    x = x.to(acc)
    k = values.shape[1]
    t = torch.empty(n, dtype=acc, device=values.device)
    for rows in _row_blocks(n, k):
        gathered = torch.index_select(x, 0, indices[rows].reshape(-1)).view(-1, k)
        t[rows] = torch.linalg.vecdot(gathered, values[rows].to(acc))
    return t


def scatter_combine(
    values: torch.Tensor,
    indices: torch.Tensor,
    c: torch.Tensor,
    n: int,
    dim: int,
    x: torch.Tensor | None = None,
    scale: float = 0.0,
) -> torch.Tensor:
    """``scale * x + Σ_{i<n} c_i · scatter(values[i], indices[i])``: a dense vector of length
    ``dim``, in the accumulation dtype. Each output entry sums its contributions in row
    order, one after another (``index_add_`` on CPU), so the result is bit-reproducible;
    on CUDA it is so only under ``torch.use_deterministic_algorithms(True)``."""
    acc = accumulation_dtype(values.dtype, c.dtype, *(() if x is None else (x.dtype,)))
    c = c.to(acc)
    out = torch.zeros(dim, dtype=acc, device=values.device) if x is None else x.to(acc) * scale
    for rows in _row_blocks(n, values.shape[1]):
        scaled = values[rows].to(acc) * c[rows, None]
        out.index_add_(0, indices[rows].reshape(-1), scaled.reshape(-1))
    return out
