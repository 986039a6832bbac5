"""Plain-torch twins of the Triton kernels: the oracle in tests and the CPU path.

All three work on a gradient window ``G`` of shape ``[m, d]`` of which only the
first ``n`` rows are in use. ``G`` may be stored in a narrower dtype than the
vectors; products are always accumulated in :func:`accumulation_dtype`.
"""

from __future__ import annotations

import torch

# Upcasting a low-precision window for a matmul needs a wider copy; it is made
# in column chunks of at most this many elements so the copy stays small.
_UPCAST_CHUNK_ELEMENTS = 1 << 24


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any operand is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _column_chunks(G: torch.Tensor, acc: torch.dtype):
    """``(columns, G[:, columns] in acc)`` pieces covering ``G``; one piece if no cast is needed."""
    if G.dtype == acc:
        yield slice(None), G
        return
    step = max(1, _UPCAST_CHUNK_ELEMENTS // max(1, G.shape[0]))
    for start in range(0, G.shape[1], step):
        columns = slice(start, start + step)
        yield columns, G[:, columns].to(acc)


def row_dots(G: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """``t = G[:n] @ x`` in the accumulation dtype."""
    acc = accumulation_dtype(G.dtype, x.dtype)
    x = x.to(acc)
    t = torch.zeros(n, dtype=acc, device=G.device)
    for columns, piece in _column_chunks(G[:n], acc):
        t += piece @ x[columns]
    return t


def write_row_and_dot(G: torch.Tensor, row: int, x: torch.Tensor, n: int) -> torch.Tensor:
    """Store ``x`` into ``G[row]`` (rounded to the storage dtype), then return ``G[:n] @ G[row]``:
    the new row and column of the Gram matrix ``G Gᵀ``."""
    G[row].copy_(x)
    return row_dots(G, G[row], n)


def combine(
    G: torch.Tensor, c: torch.Tensor, n: int, x: torch.Tensor | None = None, scale: float = 0.0
) -> torch.Tensor:
    """``scale * x + G[:n]ᵀ c`` in the accumulation dtype (``G[:n]ᵀ c`` when ``x`` is None)."""
    acc = accumulation_dtype(G.dtype, c.dtype, *(() if x is None else (x.dtype,)))
    c = c.to(acc)
    pieces = [piece.T @ c for _, piece in _column_chunks(G[:n], acc)]
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    if x is not None:
        out.add_(x.to(acc), alpha=scale)
    return out
