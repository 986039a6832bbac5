import pytest
import torch
from _oracles import block_diagonal_inverse, empirical_fisher, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.curvature import DenseMFAC
from secondorder.errors import InsufficientMemoryError, NonFiniteError

f64 = torch.float64


@settings(max_examples=40, deadline=None)
@given(
    num_grads=st.integers(1, 12),
    dim=st.integers(1, 30),
    block=st.one_of(st.none(), st.integers(1, 35)),
    log_damp=st.floats(-5, 1),
    seed=st.integers(0, 2**16),
)
def test_solve_and_diag_match_the_explicit_inverse(num_grads, dim, block, log_damp, seed):
    damp = 10.0**log_damp
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(num_grads, dim, generator=gen, dtype=f64)
    inverse = DenseMFAC(G, damp, block_size=block)
    expected = (
        torch.linalg.inv(empirical_fisher(G, damp))
        if block is None
        else block_diagonal_inverse(G, damp, block)
    )
    X = torch.randn(3, dim, generator=gen, dtype=f64)
    assert relative_error(inverse.solve(X), X @ expected) < 1e-8
    assert relative_error(inverse.solve(X[0]), expected @ X[0]) < 1e-8
    assert relative_error(inverse.diag(), expected.diagonal()) < 1e-8


@pytest.mark.parametrize("block", [None, 13, 5])
def test_chunked_precomputation_matches_the_explicit_inverse(monkeypatch, block):
    """Column chunks, row blocks of the lower Gram matrix and of the column norms, all
    ragged at these sizes, give the same inverse as one piece."""
    from secondorder.curvature import mfac

    monkeypatch.setattr(mfac, "_CHUNK_ELEMENTS", 50)
    monkeypatch.setattr(mfac, "_GRAM_ROWS", 5)
    monkeypatch.setattr(mfac, "_NORM_ROWS", 4)
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(12, 41, generator=gen, dtype=f64)
    inverse = DenseMFAC(G, 1e-2, block_size=block)
    expected = (
        torch.linalg.inv(empirical_fisher(G, 1e-2))
        if block is None
        else block_diagonal_inverse(G, 1e-2, block)
    )
    X = torch.randn(2, 41, generator=gen, dtype=f64)
    assert relative_error(inverse.solve(X), X @ expected) < 1e-10
    assert relative_error(inverse.diag(), expected.diagonal()) < 1e-10


@pytest.mark.parametrize(
    ("block", "methods"),
    [
        (None, ["woodbury"]),
        (4, ["explicit"]),
        (6, ["woodbury", "explicit"]),
        (13, ["woodbury", "explicit"]),
        (14, ["woodbury"]),
    ],
)
def test_each_block_uses_the_cheaper_representation(block, methods):
    """Explicit b × b inverse when b < n, Woodbury when b ≥ n; a short last block chooses for itself."""
    G = torch.randn(6, 28, dtype=f64)
    inverse = DenseMFAC(G, 1e-2, block_size=block)
    assert inverse.methods == methods


def test_diagonal_keeps_its_accuracy_where_the_woodbury_form_cancels():
    """[F⁻¹]_kk = (1 − ‖W_k‖²)/λ for a coordinate the gradients pin down: ‖W_k‖² ≈ 1 − 1e-9."""
    G = torch.zeros(4, 3, dtype=torch.float32)
    G[:, 0] = 1e3
    G[:, 1:] = torch.randn(4, 2)
    damp = 1e-3
    diagonal = DenseMFAC(G, damp).diag()
    exact = torch.linalg.inv(empirical_fisher(G, damp)).diagonal()
    assert relative_error(diagonal[:1], exact[:1]) < 1e-5
    assert bool((diagonal > 0).all())


def test_float32_gradients_give_float32_results_close_to_float64():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(16, 200, generator=gen)
    inverse = DenseMFAC(G, 1e-2, block_size=50)
    x = torch.randn(200, generator=gen)
    assert inverse.solve(x).dtype == torch.float32 and inverse.diag().dtype == torch.float32
    expected = block_diagonal_inverse(G, 1e-2, 50)
    assert relative_error(inverse.solve(x), expected @ x.double()) < 1e-5
    assert relative_error(inverse.diag(), expected.diagonal()) < 1e-6


def test_bad_inputs():
    G = torch.randn(4, 10)
    with pytest.raises(ValueError, match="damp must be a finite number > 0"):
        DenseMFAC(G, 0.0)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        DenseMFAC(G, 1e-3, block_size=0)
    with pytest.raises(ValueError, match=r"\[num_grads, dim\]"):
        DenseMFAC(torch.randn(10), 1e-3)
    bad = G.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="grads has 1 NaN"):
        DenseMFAC(bad, 1e-3)
    inverse = DenseMFAC(G, 1e-3)
    with pytest.raises(ValueError, match=r"x must have shape \(10,\) or \(k, 10\)"):
        inverse.solve(torch.randn(9))
    with pytest.raises(NonFiniteError):
        inverse.solve(torch.full((10,), float("inf")))


def test_estimated_memory_is_checked_before_building():
    assert DenseMFAC.estimate_bytes(8, 100, block_size=4) == 100 * 4 * 4 + 100 * 8
    assert DenseMFAC.estimate_bytes(8, 100) == 100 * 8 * 4 + 100 * 8
    huge = torch.empty(2, 1).expand(2, 10**13)  # no memory behind it
    with pytest.raises(InsufficientMemoryError, match="lower num_grads or block_size"):
        DenseMFAC(huge, 1e-3, block_size=64)
