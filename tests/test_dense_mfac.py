import pytest
import torch
from _oracles import block_diagonal_inverse, empirical_fisher, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.curvature import DenseMFAC
from secondorder.errors import (
    InsufficientMemoryError,
    NonFiniteError,
    NotPositiveDefiniteError,
)

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


@pytest.mark.parametrize("block", [None, 2])
def test_a_system_that_cannot_be_factored_is_refused(block):
    """Three nearly equal large gradients and damp = 1e-30: G Gᵀ is singular to rounding,
    for the Woodbury factor and for the explicit 2 x 2 blocks alike."""
    g = torch.randn(1, 20, generator=torch.Generator().manual_seed(0), dtype=f64) * 1e6
    G = torch.cat([g, g, g * (1 + 1e-16)])
    with pytest.raises(NotPositiveDefiniteError, match="raise damp"):
        DenseMFAC(G, 1e-30, block_size=block)


def test_estimated_memory_is_checked_before_building():
    huge = torch.empty(2, 1).expand(2, 10**13)  # no memory behind it
    with pytest.raises(InsufficientMemoryError, match="lower num_grads or block_size"):
        DenseMFAC(huge, 1e-3, block_size=64)


def test_diagonal_is_computed_on_first_use_and_refused_before_allocating(monkeypatch):
    """diag() checks its own working memory; a refused call leaves the inverse as it was."""
    from secondorder import _checks

    G = torch.randn(6, 50, dtype=f64)
    inverse = DenseMFAC(G, 1e-2)
    monkeypatch.setattr(_checks, "free_bytes", lambda device: 1000)
    with pytest.raises(InsufficientMemoryError, match="the diagonal of the M-FAC inverse"):
        inverse.diag()
    monkeypatch.undo()
    expected = torch.linalg.inv(empirical_fisher(G, 1e-2)).diagonal()
    assert relative_error(inverse.diag(), expected) < 1e-10
    inverse.diag()[0] = -1.0  # the caller's copy, not the kept diagonal
    assert relative_error(inverse.diag(), expected) < 1e-10


def test_gradients_are_read_in_place_even_when_strided():
    """A strided view of gradients is used as it is (no copy), blockwise or not."""
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(5, 61, generator=gen, dtype=f64)
    G = wide[:, ::2]  # [5, 31], row stride 61, column stride 2
    x = torch.randn(2, 31, generator=gen, dtype=f64)
    for block in (None, 7):
        inverse = DenseMFAC(G, 1e-2, block_size=block)
        expected = (
            torch.linalg.inv(empirical_fisher(G, 1e-2))
            if block is None
            else block_diagonal_inverse(G, 1e-2, block)
        )
        assert relative_error(inverse.solve(x), x @ expected) < 1e-10
        assert relative_error(inverse.solve(x[0]), expected @ x[0]) < 1e-10
        assert relative_error(inverse.diag(), expected.diagonal()) < 1e-10
        assert relative_error(inverse.solve(x), x @ expected) < 1e-10  # after diag() too


def _peak_allocated_bytes(fn) -> int:
    """High-water mark of torch's CPU allocations during ``fn``, above what it found, from the
    profiler's memory events (the legacy profiler: it starts in milliseconds, kineto in
    seconds). tracemalloc does not see these allocations. An op's own net allocation counts
    from its start when positive, from its end when negative (the temporaries it freed)."""
    with torch.autograd.profiler.profile(profile_memory=True, use_kineto=False) as prof:
        fn()
    changes = []
    for event in prof.function_events:
        if event.name == "[memory]":  # a free (negative) or an allocation outside any op
            changes.append((event.time_range.start, event.cpu_memory_usage))
        elif event.self_cpu_memory_usage > 0:
            changes.append((event.time_range.start, event.self_cpu_memory_usage))
        elif event.self_cpu_memory_usage < 0:
            changes.append((event.time_range.end, event.self_cpu_memory_usage))
    current = peak = 0
    for _, change in sorted(changes, key=lambda c: c[0]):
        current += change
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize(
    ("block", "dtype", "with_diag"),
    [
        (None, torch.float32, False),  # solve-only: the factor and one float64 piece
        (None, torch.float32, True),
        (None, torch.float64, True),
        (None, torch.float16, True),  # kept as a float32 copy
        (3000, torch.float32, True),  # Woodbury blocks, and a short last block of 1000
        (16, torch.float32, True),  # explicit 16 x 16 inverses (16 < 32 gradients)
    ],
)
def test_estimated_bytes_bound_the_measured_peak(block, dtype, with_diag):
    """estimate_bytes is at least the measured peak and at most 1.25 times it, on 32
    gradients of length 100,000: the float64 working buffers are counted (issue 11, item 13)."""
    G = torch.randn(32, 100_000, generator=torch.Generator().manual_seed(0)).to(dtype)

    def build():
        inverse = DenseMFAC(G, 1e-3, block_size=block)
        if with_diag:
            inverse.diag()

    measured = _peak_allocated_bytes(build)
    estimate = DenseMFAC.estimate_bytes(32, 100_000, block, dtype, with_diag=with_diag)
    assert measured <= estimate <= 1.25 * measured, (measured, estimate)
    if block is None and not with_diag:  # nothing of size n x d beyond G itself
        assert measured < G.numel() * G.element_size() / 4
