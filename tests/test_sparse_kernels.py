"""Triton kernels of the sparse window against their torch twins (in the interpreter on CPU).

Sizes are not multiples of the blocks; the partial-sum workspace starts poisoned with
NaN, as do the values of rows not in use, which must never be read."""

import os

import pytest
import torch

from secondorder.kernels import reference

triton_kernels = pytest.importorskip("secondorder.kernels.sparse_window")
dense_kernels = pytest.importorskip("secondorder.kernels.dense_window")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)

SMALL_BLOCKS = {"block_n": 4, "block_k": 16}
SHAPES = [(1, 1, 1, 1), (3, 2, 5, 37), (7, 5, 19, 97), (13, 13, 61, 301)]  # m, n, k, dim
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float64, torch.float64),
]


def tolerance(dtype):
    return (
        {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    )


@pytest.fixture(autouse=True)
def poisoned_workspace(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_kernels, "_workspace", poisoned)


def window(rows, used, k, dim, storage, seed=0):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(dim, generator=gen)[:k] for _ in range(rows)])
    values = torch.randn(rows, k, generator=gen).to(storage)
    values[used:] = float("nan")
    indices[used:] = 2**30  # far outside every vector
    return values, indices.to(torch.int32)


@pytest.mark.parametrize(("rows", "used", "k", "dim"), SHAPES)
@pytest.mark.parametrize(("storage", "vector"), DTYPES)
@pytest.mark.parametrize("chunks", [1, 3])
def test_gather_dots(rows, used, k, dim, storage, vector, chunks):
    values, indices = window(rows, used, k, dim, storage)
    x = torch.randn(dim, dtype=vector)
    expected = reference.gather_dots(values, indices, x, used)
    actual = triton_kernels.gather_dots(values, indices, x, used, chunks=chunks, **SMALL_BLOCKS)
    torch.testing.assert_close(actual, expected, **tolerance(vector))


@pytest.mark.parametrize(("rows", "used", "k", "dim"), SHAPES)
@pytest.mark.parametrize(("storage", "vector"), DTYPES)
@pytest.mark.parametrize("with_x", [True, False])
def test_scatter_combine(rows, used, k, dim, storage, vector, with_x):
    values, indices = window(rows, used, k, dim, storage, seed=1)
    c = torch.randn(used, dtype=vector)
    x = torch.randn(dim, dtype=vector) if with_x else None
    expected = reference.scatter_combine(values, indices, c, used, dim, x, -0.75)
    actual = triton_kernels.scatter_combine(values, indices, c, used, dim, x, -0.75, **SMALL_BLOCKS)
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **tolerance(vector))


def test_default_block_sizes_on_a_longer_row():
    values, indices = window(5, 5, 2000, 9000, torch.bfloat16, seed=3)
    x, c = torch.randn(9000), torch.randn(5)
    torch.testing.assert_close(
        triton_kernels.gather_dots(values, indices, x, 5),
        reference.gather_dots(values, indices, x, 5),
        rtol=2e-5,
        atol=2e-4,
    )
    torch.testing.assert_close(
        triton_kernels.scatter_combine(values, indices, c, 5, 9000, x, 0.5),
        reference.scatter_combine(values, indices, c, 5, 9000, x, 0.5),
        rtol=2e-5,
        atol=2e-5,
    )


def test_kernel_argument_errors():
    values, indices = torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        triton_kernels.gather_dots(values, indices.long(), torch.zeros(10), 2)
    with pytest.raises(ValueError, match="one shape"):
        triton_kernels.gather_dots(values, indices[:, :3], torch.zeros(10), 2)
    with pytest.raises(ValueError, match="n=4 rows requested from a window of 3"):
        triton_kernels.scatter_combine(values, indices, torch.zeros(4), 4, 10)
    with pytest.raises(ValueError, match="vector of length 10"):
        triton_kernels.scatter_combine(values, indices, torch.zeros(2), 2, 10, torch.zeros(9))


def test_the_sparse_window_is_the_same_on_both_backends(monkeypatch):
    """The estimator end to end: warm-up, wrap-around, solve, bf16 values."""
    from secondorder.curvature import SparseSlidingWindowMFAC

    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(9, 700, generator=gen)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SECONDORDER_KERNELS", backend)
        window = SparseSlidingWindowMFAC(700, 4, 1e-3, 0.05, storage_dtype=torch.bfloat16)
        results[backend] = [window.update_solve(g) for g in grads] + [window.solve(grads[0])]
    for a, b in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_deterministic_mode_takes_the_ordered_twin(monkeypatch):
    from secondorder import kernels

    monkeypatch.setenv("SECONDORDER_KERNELS", "triton")
    called = []
    monkeypatch.setattr(triton_kernels, "scatter_combine", lambda *a: called.append(a))
    values, indices = window(3, 3, 4, 10, torch.float32)
    torch.use_deterministic_algorithms(True)
    try:
        out = kernels.scatter_combine(values, indices, torch.ones(3), 3, 10)
    finally:
        torch.use_deterministic_algorithms(False)
    assert not called and out.shape == (10,)
    kernels.scatter_combine(values, indices, torch.ones(3), 3, 10)
    assert called


def test_the_sparse_window_runs_the_kernels_over_rows_padded_to_16(monkeypatch):
    """k = 7 kept entries per row: every launch gets rows of 16 entries (value 0 at
    coordinate 0 beyond the 7), whose contributions are exactly zero; the public rows and
    the state stay [num_grads, 7]; the results are the torch twins' over the same rows."""
    from secondorder.curvature import SparseSlidingWindowMFAC

    launches = []

    def recording(name):
        real = getattr(triton_kernels, name)

        def launch(values, indices, *args, **kwargs):
            launches.append((name, values.shape[1], values.stride(0), indices.stride(0)))
            return real(values, indices, *args, **kwargs)

        return launch

    for name in ("gather_dots", "scatter_combine"):
        monkeypatch.setattr(triton_kernels, name, recording(name))
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(8, 61, generator=gen)
    x = torch.randn(61, generator=gen)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SECONDORDER_KERNELS", backend)
        window = SparseSlidingWindowMFAC(61, 3, 1e-2, 0.1)
        results[backend] = [window.update_solve(g) for g in grads] + [window.solve(x)]
        assert window.k == 7 and window._value_rows.shape == window._index_rows.shape == (3, 16)
        assert not window._value_rows[:, 7:].any() and not window._index_rows[:, 7:].any()
        state = window.state_dict()
        assert state["values"].shape == state["indices"].shape == window._values.shape == (3, 7)
    assert {name for name, *_ in launches} == {"gather_dots", "scatter_combine"}
    assert all(entry[1:] == (16, 16, 16) for entry in launches)
    for a, b in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("storage", "vector"), DTYPES)
def test_padding_entries_contribute_exactly_nothing(storage, vector):
    """Rows padded from k = 19 to 32 entries with value 0 at coordinate 0 give the products
    of the unpadded rows, in both kernels and both twins; the workspace is poisoned."""
    rows, used, k, dim = 7, 5, 19, 97
    values, indices = window(rows, used, k, dim, storage)
    padded_values = torch.zeros(rows, 32, dtype=storage)
    padded_indices = torch.zeros(rows, 32, dtype=torch.int32)
    padded_values[:, :k], padded_indices[:, :k] = values, indices
    x, c = torch.randn(dim, dtype=vector), torch.randn(used, dtype=vector)
    expected = reference.gather_dots(values, indices, x, used)
    for implementation in (reference, triton_kernels):
        torch.testing.assert_close(
            implementation.gather_dots(padded_values, padded_indices, x, used),
            expected,
            **tolerance(vector),
        )
    expected = reference.scatter_combine(values, indices, c, used, dim, x, 0.5)
    for implementation in (reference, triton_kernels):
        torch.testing.assert_close(
            implementation.scatter_combine(padded_values, padded_indices, c, used, dim, x, 0.5),
            expected,
            **tolerance(vector),
        )
