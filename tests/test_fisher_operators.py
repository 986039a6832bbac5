"""The M-FAC inverses are linear operators: the estimators run on F⁻¹ and on F itself."""

import pytest
import torch
from _oracles import empirical_fisher

from secondorder.curvature import (
    DenseMFAC,
    SlidingWindowMFAC,
    SparseSlidingWindowMFAC,
    hutchinson_trace,
    top_eigenvalues,
)

f64 = torch.float64


def gradients(n=6, d=40, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=f64)


@pytest.mark.parametrize("block_size", [None, 16, 7])
def test_dense_inverse_eigenvalues_against_eigvalsh(block_size):
    G, damp = gradients(), 0.1
    inverse = DenseMFAC(G, damp, block_size=block_size)
    F = empirical_fisher(G, damp)
    if block_size is not None:  # the block-diagonal part, as the blockwise inverse uses
        mask = torch.zeros_like(F, dtype=torch.bool)
        for start in range(0, F.shape[0], block_size):
            mask[start : start + block_size, start : start + block_size] = True
        F = torch.where(mask, F, 0.0)
    expected = torch.linalg.eigvalsh(torch.linalg.inv(F))
    smallest = top_eigenvalues(inverse, 3, which="smallest", tol=1e-10, progress=False)
    # the largest, 1/damp, repeats d - n times: Lanczos from one start finds it once
    largest = top_eigenvalues(inverse, 1, tol=1e-10, progress=False)
    torch.testing.assert_close(smallest.eigenvalues, expected[:3], rtol=1e-8, atol=0)
    torch.testing.assert_close(largest.eigenvalues, expected[-1:], rtol=1e-8, atol=0)
    V = torch.randn(40, 5, dtype=f64)
    torch.testing.assert_close(inverse.fisher() @ V, F @ V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inverse @ V, torch.linalg.solve(F, V), rtol=1e-9, atol=1e-12)
    assert inverse.shape == (40, 40) and inverse.dtype == f64


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_window_operators_against_the_explicit_matrices(kind):
    G, damp = gradients(n=9), 0.05
    if kind == "dense":
        window = SlidingWindowMFAC(40, 5, damp, dtype=f64)
    else:
        window = SparseSlidingWindowMFAC(40, 5, damp, 0.3, dtype=f64)
    for g in G:
        window.update(g)
    held = window.gradients()
    F = empirical_fisher(held, damp)
    V = torch.randn(40, 3, dtype=f64)
    torch.testing.assert_close(window @ V, torch.linalg.solve(F, V), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(window.fisher() @ V[:, 0], F @ V[:, 0], rtol=1e-12, atol=1e-12)
    trace = hutchinson_trace(window.fisher(), 40, method="hutchinson")
    assert abs(trace.value - float(torch.trace(F))) < 4 * trace.std_error + 1e-9
    top = top_eigenvalues(window.fisher(), 1, tol=1e-10, progress=False)
    torch.testing.assert_close(top.eigenvalues[0], torch.linalg.eigvalsh(F)[-1], rtol=1e-8, atol=0)


def test_an_empty_window_is_a_scaled_identity_both_ways():
    window = SlidingWindowMFAC(4, 2, 0.5, dtype=f64)
    x = torch.arange(4.0, dtype=f64)
    torch.testing.assert_close(window @ x, x / 0.5)
    torch.testing.assert_close(window.fisher() @ x, 0.5 * x)


def test_shapes_are_checked():
    window = SlidingWindowMFAC(4, 2, 0.5)
    with pytest.raises(ValueError, match=r"vector of length 4 or a \[4, K\] matrix"):
        window @ torch.zeros(3)
    with pytest.raises(ValueError, match=r"vector of length 4 or a \[4, K\] matrix"):
        window.fisher() @ torch.zeros(3, 2)
