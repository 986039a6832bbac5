"""Triton kernels against their torch twins (in the Triton interpreter on CPU).

Sizes are chosen not to be multiples of the block sizes, and every buffer a
kernel writes starts poisoned with NaN, as do the window rows it must not read.
"""

import os

import pytest
import torch

from secondorder import kernels
from secondorder.errors import NonFiniteError
from secondorder.kernels import reference

triton_kernels = pytest.importorskip("secondorder.kernels.dense_window")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)

SMALL_BLOCKS = {"block_n": 4, "block_d": 32}
SHAPES = [(1, 1, 1), (3, 2, 37), (7, 5, 97), (13, 13, 301)]  # (rows allocated, rows in use, dim)
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
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


def window(rows, used, dim, storage, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(rows, dim, generator=gen).to(storage)
    G[used:] = float("nan")  # rows not in use must never be read
    return G


@pytest.mark.parametrize(("rows", "used", "dim"), SHAPES)
@pytest.mark.parametrize(("storage", "vector"), DTYPES)
@pytest.mark.parametrize("chunks", [1, 3])
def test_row_dots(rows, used, dim, storage, vector, chunks):
    G = window(rows, used, dim, storage)
    x = torch.randn(dim, dtype=vector)
    expected = reference.row_dots(G, x, used)
    actual = triton_kernels.row_dots(G, x, used, chunks=chunks, **SMALL_BLOCKS)
    torch.testing.assert_close(actual, expected, **tolerance(vector))


@pytest.mark.parametrize(("rows", "used", "dim"), SHAPES)
@pytest.mark.parametrize(("storage", "vector"), DTYPES)
def test_write_row_and_dot(rows, used, dim, storage, vector):
    slot = used // 2
    G_triton = window(rows, used, dim, storage, seed=1)
    G_triton[slot] = float("nan")  # the slot being overwritten may hold anything
    G_torch = G_triton.clone()
    x = torch.randn(dim, dtype=vector)
    expected = reference.write_row_and_dot(G_torch, slot, x, used)
    actual = triton_kernels.write_row_and_dot(G_triton, slot, x, used, chunks=2, **SMALL_BLOCKS)
    torch.testing.assert_close(actual, expected, **tolerance(vector))
    assert torch.equal(G_triton[slot], x.to(storage))  # every column written, rounded like torch
    assert torch.equal(G_triton[:used].isnan(), G_torch[:used].isnan())


@pytest.mark.parametrize(("rows", "used", "dim"), SHAPES)
@pytest.mark.parametrize(("storage", "vector"), DTYPES)
@pytest.mark.parametrize("with_x", [True, False])
def test_combine(rows, used, dim, storage, vector, with_x):
    G = window(rows, used, dim, storage, seed=2)
    c = torch.randn(used, dtype=vector)
    x = torch.randn(dim, dtype=vector) if with_x else None
    expected = reference.combine(G, c, used, x, -0.75)
    out = torch.full((dim,), float("nan"), dtype=vector)
    actual = triton_kernels.combine(G, c, used, x, -0.75, out=out, **SMALL_BLOCKS)
    assert actual.data_ptr() == out.data_ptr()
    torch.testing.assert_close(actual, expected, **tolerance(vector))


def test_zero_rows_in_use():
    G = window(4, 0, 50, torch.float32)
    assert triton_kernels.row_dots(G, torch.ones(50), 0).shape == (0,)
    x = torch.randn(50)
    torch.testing.assert_close(triton_kernels.combine(G, torch.zeros(0), 0, x, 2.0), 2 * x)


def test_default_block_sizes_on_a_longer_vector():
    G = window(6, 6, 5000, torch.bfloat16, seed=3)
    x = torch.randn(5000)
    torch.testing.assert_close(
        triton_kernels.row_dots(G, x, 6), reference.row_dots(G, x, 6), rtol=2e-5, atol=2e-4
    )
    c = torch.randn(6)
    torch.testing.assert_close(
        triton_kernels.combine(G, c, 6, x, 0.5),
        reference.combine(G, c, 6, x, 0.5),
        rtol=2e-5,
        atol=2e-5,
    )


def test_kernel_argument_errors():
    G = torch.zeros(3, 10)
    with pytest.raises(ValueError, match="outside the 2 rows in use"):
        triton_kernels.write_row_and_dot(G, 2, torch.zeros(10), 2)
    with pytest.raises(ValueError, match="vector of length 10"):
        triton_kernels.row_dots(G, torch.zeros(9), 2)
    with pytest.raises(ValueError, match="n=4 rows requested from a window of 3"):
        triton_kernels.row_dots(G, torch.zeros(10), 4)
    with pytest.raises(ValueError, match="contiguous rows"):
        triton_kernels.row_dots(G.T.contiguous().T, torch.zeros(3), 2)
    with pytest.raises(ValueError, match=r"out must be a contiguous torch\.float32 vector"):
        triton_kernels.combine(G, torch.zeros(2), 2, out=torch.zeros(10, dtype=torch.float64))


def test_dispatch(monkeypatch):
    x = torch.zeros(3)
    monkeypatch.setenv("SECONDORDER_KERNELS", "auto")
    assert kernels.backend(x) == "torch"  # CPU tensors take the twin
    monkeypatch.setenv("SECONDORDER_KERNELS", "triton")
    assert kernels.backend(x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        kernels.backend(x)
    monkeypatch.setenv("SECONDORDER_KERNELS", "cuda")
    with pytest.raises(ValueError, match="expected one of auto, torch, triton"):
        kernels.backend(x)


def test_sliding_window_is_the_same_on_both_backends(monkeypatch):
    """The estimator end to end: warm-up, wrap-around, solve, bf16 storage."""
    from secondorder.curvature import SlidingWindowMFAC

    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(9, 700, generator=gen)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SECONDORDER_KERNELS", backend)
        window = SlidingWindowMFAC(700, 4, 1e-3, storage_dtype=torch.bfloat16)
        results[backend] = [window.update_solve(g) for g in grads] + [window.solve(grads[0])]
    for a, b in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_window_runs_the_kernels_over_rows_padded_to_16(monkeypatch):
    """dim = 37: every launch gets a width and row stride divisible by 16 and a vector of that
    width at a 16-byte address (what Triton's launcher specialises its vector loads on); the
    padding stays zero through warm-up, wrap-around, a refused step and transform_, and the
    results are the torch twins' (which run over the unpadded view)."""
    from secondorder.curvature import SlidingWindowMFAC

    launches = []

    def recording(name):
        real = getattr(triton_kernels, name)

        def launch(G, *args, **kwargs):
            position = {"row_dots": 0, "write_row_and_dot": 1, "combine": 2}[name]
            x = args[position] if len(args) > position else None
            launches.append((name, G.shape[1], G.stride(0), x))
            if x is not None:
                assert x.shape == (G.shape[1],) and x.data_ptr() % 16 == 0
            return real(G, *args, **kwargs)

        return launch

    for name in ("row_dots", "write_row_and_dot", "combine"):
        monkeypatch.setattr(triton_kernels, name, recording(name))
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(8, 37, generator=gen)
    x = torch.randn(37, generator=gen)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SECONDORDER_KERNELS", backend)
        window = SlidingWindowMFAC(37, 3, 1e-2)
        out = [window.update_solve(g) for g in grads] + [window.solve(x)]
        with pytest.raises(NonFiniteError):
            window.update(torch.full((37,), float("nan")))
        window.transform_(lambda rows: 2 * rows)
        out += [window.solve(x), window.update_solve(grads[0])]
        results[backend] = out
        assert window._rows.shape == (3, 48) and not window._rows[:, 37:].any()
        assert window.gradients().shape == (3, 37)
        assert window.state_dict()["grads"].shape == (3, 37)
    assert {name for name, *_ in launches} == {"row_dots", "write_row_and_dot", "combine"}
    assert all(width == stride == 48 for _, width, stride, _ in launches)
    for a, b in zip(results["torch"], results["triton"], strict=True):
        assert a.shape == b.shape == (37,)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("storage", "vector"), DTYPES)
def test_padded_rows_and_vectors_give_the_unpadded_products(storage, vector):
    """The kernels over a window padded with zero columns (the width a multiple of 16, the
    default block sizes) against the twins over the real width; outputs poisoned."""
    rows, used, dim = 11, 9, 200
    G = torch.zeros(rows, 208, dtype=storage)
    G[:, :dim] = window(rows, used, dim, storage, seed=6)
    x, c = torch.randn(dim, dtype=vector), torch.randn(used, dtype=vector)
    padded = torch.nn.functional.pad(x, (0, 8))
    torch.testing.assert_close(
        triton_kernels.row_dots(G, padded, used),
        reference.row_dots(G[:, :dim], x, used),
        **tolerance(vector),
    )
    out = torch.full((208,), float("nan"), dtype=vector)
    combined = triton_kernels.combine(G, c, used, padded, 0.5, out=out)
    torch.testing.assert_close(
        combined[:dim], reference.combine(G[:, :dim], c, used, x, 0.5), **tolerance(vector)
    )
    assert not combined[dim:].any()
    slot = used - 1
    G_torch = G[:, :dim].clone()
    t = triton_kernels.write_row_and_dot(G, slot, padded, used)
    torch.testing.assert_close(
        t, reference.write_row_and_dot(G_torch, slot, x, used), **tolerance(vector)
    )
    assert torch.equal(G[:used, :dim], G_torch[:used]) and not G[:, dim:].any()
