"""The torch twins (the CPU path and the kernels' oracle) against float64 products.

A half-precision window is upcast tile by tile; with tiles of a few elements every
pass below crosses several row and column tiles, including ragged last ones.
"""

import pytest
import torch

from secondorder.kernels import reference


@pytest.mark.parametrize("tile_elements", [5, 40, 1 << 21])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_tiled_passes_equal_float64(monkeypatch, tile_elements, storage):
    monkeypatch.setattr(reference, "_UPCAST_TILE_ELEMENTS", tile_elements)
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(9, 23, generator=gen).to(storage)
    G[7:] = float("nan")  # rows not in use must not be read
    x, c = torch.randn(23, generator=gen), torch.randn(7, generator=gen)
    exact = G[:7].double()

    t = reference.row_dots(G, x, 7)
    torch.testing.assert_close(t.double(), exact @ x.double(), rtol=1e-6, atol=1e-6)
    out = reference.combine(G, c, 7, x, 0.5)
    torch.testing.assert_close(
        out.double(), 0.5 * x.double() + exact.T @ c.double(), rtol=1e-6, atol=1e-6
    )
    assert t.dtype == out.dtype == torch.float32


def test_write_row_and_dot_rounds_to_storage(monkeypatch):
    monkeypatch.setattr(reference, "_UPCAST_TILE_ELEMENTS", 6)
    G = torch.zeros(4, 11, dtype=torch.bfloat16)
    G[:2] = torch.randn(2, 11).to(torch.bfloat16)
    x = torch.randn(11)
    t = reference.write_row_and_dot(G, 2, x, 3)
    stored = x.to(torch.bfloat16)
    assert torch.equal(G[2], stored)
    torch.testing.assert_close(t.double(), G[:3].double() @ stored.double(), rtol=1e-6, atol=1e-6)


def sparse_rows(rows, k, dim, storage, seed=0):
    """``rows`` compressed rows: ``k`` distinct sorted int32 coordinates each."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack(
        [torch.randperm(dim, generator=gen)[:k].sort().values for _ in range(rows)]
    )
    return torch.randn(rows, k, generator=gen).to(storage), indices.to(torch.int32)


def densify(values, indices, dim):
    dense = torch.zeros(values.shape[0], dim, dtype=torch.float64)
    return dense.scatter_(1, indices.long(), values.double())


@pytest.mark.parametrize("tile_entries", [3, 50, 1 << 17])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float64])
def test_sparse_passes_equal_float64(monkeypatch, tile_entries, storage):
    monkeypatch.setattr(reference, "_SPARSE_TILE_ENTRIES", tile_entries)
    values, indices = sparse_rows(9, 6, 31, storage)
    values[7:] = float("nan")  # rows not in use must not be read
    vector = torch.float64 if storage == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(1)
    x, c = torch.randn(31, generator=gen, dtype=vector), torch.randn(7, generator=gen)
    exact = densify(values[:7], indices[:7], 31)

    t = reference.gather_dots(values, indices, x, 7)
    torch.testing.assert_close(t.double(), exact @ x.double(), rtol=1e-6, atol=1e-6)
    out = reference.scatter_combine(values, indices, c, 7, 31, x, 0.5)
    torch.testing.assert_close(
        out.double(), 0.5 * x.double() + exact.T @ c.double(), rtol=1e-6, atol=1e-6
    )
    assert t.dtype == out.dtype == vector
    alone = reference.scatter_combine(values, indices, c, 7, 31)
    torch.testing.assert_close(alone.double(), exact.T @ c.double(), rtol=1e-6, atol=1e-6)


def test_scatter_combine_is_bit_reproducible_across_thread_counts():
    values, indices = sparse_rows(40, 300, 1000, torch.float32, seed=2)
    c = torch.randn(40)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(reference.scatter_combine(values, indices, c, 40, 1000))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
