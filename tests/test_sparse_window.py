"""The compressed (EFCP) window against a plain float64 transcription of the algorithm."""

import io

import pytest
import torch
from _oracles import efcp_steps, explicit_solve, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.curvature import SlidingWindowMFAC, SparseSlidingWindowMFAC
from secondorder.curvature.sparse_window import kept_entries, top_k_indices
from secondorder.errors import InsufficientMemoryError, NonFiniteError, NotPositiveDefiniteError

f64 = torch.float64


def snapshot(window):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in window.state_dict().items()}


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for key, value in before.items():
        same = torch.equal(after[key], value) if torch.is_tensor(value) else after[key] == value
        assert same, key


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("error_feedback", [True, False])
def test_update_solve_matches_the_float64_algorithm_through_wraparound(density, error_feedback):
    dim, num_grads, damp, steps = 40, 4, 1e-2, 11
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(steps, dim, generator=gen, dtype=f64)
    window = SparseSlidingWindowMFAC(
        dim, num_grads, damp, density, error_feedback=error_feedback, dtype=f64
    )
    expected = efcp_steps(grads, num_grads, damp, window.k, error_feedback=error_feedback)
    held = []
    for g, (c, e, u) in zip(grads, expected, strict=True):
        assert relative_error(window.update_solve(g), u) < 1e-10
        held = [*held, c][-num_grads:]
        assert torch.equal(window.gradients(), torch.stack(held))  # same entries, exactly
        torch.testing.assert_close(window.error, e, rtol=0, atol=1e-12)
        if not error_feedback:
            assert not window.error.any()
    x = torch.randn(dim, generator=gen, dtype=f64)
    assert relative_error(window.solve(x), explicit_solve(torch.stack(held), damp, x)) < 1e-10


@settings(max_examples=25, deadline=None)
@given(
    dim=st.integers(1, 30),
    num_grads=st.integers(1, 6),
    density=st.floats(0.01, 1.0),
    steps=st.integers(1, 14),
    error_feedback=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_against_the_oracle(dim, num_grads, density, steps, error_feedback, seed):
    damp = 0.1
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(steps, dim, generator=gen, dtype=f64)
    window = SparseSlidingWindowMFAC(
        dim, num_grads, damp, density, error_feedback=error_feedback, dtype=f64
    )
    assert window.k == kept_entries(dim, density)
    oracle = efcp_steps(grads, num_grads, damp, window.k, error_feedback=error_feedback)
    for g, (_, e, u) in zip(grads, oracle, strict=True):
        assert relative_error(window.update_solve(g), u) < 1e-9
        torch.testing.assert_close(window.error, e, rtol=0, atol=1e-12)
    assert window.num_stored == min(steps, num_grads)


@pytest.mark.parametrize("storage", [f64, torch.float32, torch.bfloat16])
def test_error_feedback_loses_nothing(storage):
    """Σ_t c_t + e_T = Σ_t g_t, with c_t as stored (rounding included)."""
    dim, steps = 50, 9
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(steps, dim, generator=gen, dtype=f64)
    window = SparseSlidingWindowMFAC(dim, steps, 0.1, 0.1, dtype=f64, storage_dtype=storage)
    for g in grads:
        window.update(g)
    stored = window.gradients()  # every c_t: the window never wrapped
    assert stored.shape == (steps, dim)
    if storage != f64:  # the values really were rounded, and e carries the difference
        assert torch.equal(stored, stored.to(storage).to(f64))
    torch.testing.assert_close(stored.sum(0) + window.error, grads.sum(0), rtol=0, atol=1e-12)


def test_each_row_keeps_exactly_k_entries_at_the_largest_magnitudes():
    dim, density = 200, 0.05
    gen = torch.Generator().manual_seed(2)
    window = SparseSlidingWindowMFAC(dim, 3, 1e-2, density)
    for _ in range(5):
        accumulator = window.error + (g := torch.randn(dim, generator=gen))
        window.update(g)
        newest = window.gradients()[-1]
        kept = newest.nonzero().squeeze(1)
        assert kept.numel() == window.k == 10
        assert torch.equal(kept, accumulator.abs().topk(window.k).indices.sort().values)
        assert torch.equal(newest[kept], accumulator[kept])


def test_ties_go_to_the_lowest_coordinates_and_zeros_fill_up():
    a = torch.tensor([1.0, -3.0, 3.0, 0.0, 2.0, -3.0, 0.0, 0.0])
    assert top_k_indices(a, 2).tolist() == [1, 2]  # three tied at |3|: the lowest two
    assert top_k_indices(a, 3).tolist() == [1, 2, 5]
    assert top_k_indices(a, 6).tolist() == [0, 1, 2, 3, 4, 5]  # zeros, lowest first
    assert top_k_indices(a, 8).tolist() == list(range(8))
    assert top_k_indices(torch.zeros(5), 2).tolist() == [0, 1]


def test_a_parameter_without_gradient_enters_as_zeros():
    """Zero coordinates are chosen when fewer than k are nonzero; nothing breaks."""
    window = SparseSlidingWindowMFAC(10, 2, 0.1, 0.5, dtype=f64)
    g = torch.zeros(10, dtype=f64)
    g[7] = 2.0
    u = window.update_solve(g)
    torch.testing.assert_close(u, explicit_solve(g[None], 0.1, g))
    assert window.gradients()[0].nonzero().tolist() == [[7]]


@pytest.mark.parametrize("error_feedback", [True, False])
def test_density_one_is_the_dense_window(error_feedback):
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(12, 60, generator=gen)
    dense = SlidingWindowMFAC(60, 5, 1e-3)
    sparse = SparseSlidingWindowMFAC(60, 5, 1e-3, 1.0, error_feedback=error_feedback)
    for g in grads:
        torch.testing.assert_close(sparse.update_solve(g), dense.update_solve(g))
    x = torch.randn(60, generator=gen)
    torch.testing.assert_close(sparse.solve(x), dense.solve(x), rtol=1e-4, atol=1e-4)
    assert not sparse.error.any()


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_low_precision_values_and_float32_vectors(storage):
    """Against the oracle run on the same rounding: the float32 arithmetic of the passes
    costs about 1e-6 relative (float32 values) and 1e-5 (bfloat16 values, whose products
    are exact in float32 but summed in float32)."""
    dim, num_grads, damp = 300, 6, 1e-2
    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(15, dim, generator=gen)
    window = SparseSlidingWindowMFAC(dim, num_grads, damp, 0.1, storage_dtype=storage)
    oracle = efcp_steps(grads, num_grads, damp, window.k, storage=storage)
    worst = max(
        relative_error(window.update_solve(g), u)
        for g, (_, _, u) in zip(grads, oracle, strict=True)
    )
    assert worst < 2e-5
    assert window._values.dtype == storage and window._indices.dtype == torch.int32


def test_kept_entries_reads_density_as_written():
    assert kept_entries(100, 0.07) == 7  # 0.07 * 100 is 7.000000000000001 in binary
    assert kept_entries(10, 0.01) == 1
    assert kept_entries(1001, 0.01) == 11
    assert kept_entries(5, 1.0) == 5


def test_state_dict_round_trip_continues_bit_identically():
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(20, 80, generator=gen)
    reference = SparseSlidingWindowMFAC(80, 6, 1e-3, 0.1, storage_dtype=torch.bfloat16)
    interrupted = SparseSlidingWindowMFAC(80, 6, 1e-3, 0.1, storage_dtype=torch.bfloat16)
    for g in grads[:9]:
        reference.update_solve(g)
        interrupted.update_solve(g)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = SparseSlidingWindowMFAC(80, 6, 1e-3, 0.1, storage_dtype=torch.bfloat16)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(resumed.error, reference.error) and resumed.error.any()
    for g in grads[9:]:
        assert torch.equal(reference.update_solve(g), resumed.update_solve(g))


def test_refused_loads_change_nothing():
    gen = torch.Generator().manual_seed(6)
    window = SparseSlidingWindowMFAC(30, 3, 1e-2, 0.2)
    for _ in range(4):
        window.update(torch.randn(30, generator=gen))
    before = snapshot(window)
    others = {
        "density": SparseSlidingWindowMFAC(30, 3, 1e-2, 0.3),
        "error_feedback": SparseSlidingWindowMFAC(30, 3, 1e-2, 0.2, error_feedback=False),
        "num_grads": SparseSlidingWindowMFAC(30, 4, 1e-2, 0.2),
        "damp": SparseSlidingWindowMFAC(30, 3, 1e-3, 0.2),
    }
    for key, other in others.items():
        with pytest.raises(ValueError, match=key):
            window.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="cannot load the state of a dense window into a sparse"):
        window.load_state_dict(SlidingWindowMFAC(30, 3, 1e-2).state_dict())
    with pytest.raises(ValueError, match="of a sparse window into a dense"):
        SlidingWindowMFAC(30, 3, 1e-2).load_state_dict(window.state_dict())
    broken = window.state_dict() | {"error": torch.zeros(29)}
    with pytest.raises(ValueError, match="saved error is"):
        SparseSlidingWindowMFAC(30, 3, 1e-2, 0.2).load_state_dict(broken)
    assert_same_state(before, snapshot(window))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_changes_nothing(bad):
    gen = torch.Generator().manual_seed(7)
    window = SparseSlidingWindowMFAC(20, 3, 1e-2, 0.25)
    for _ in range(4):
        window.update(torch.randn(20, generator=gen))
    before = snapshot(window)
    g = torch.randn(20, generator=gen)
    g[5] = bad
    with pytest.raises(NonFiniteError, match="1 NaN or Inf entries out of 20"):
        window.update_solve(g)
    assert_same_state(before, snapshot(window))


def test_a_singular_system_raises_and_changes_nothing():
    """The same compressed row twice at a damping lost in rounding: K = [[25, 25], [25, 25]]."""
    g = torch.zeros(40)
    g[:2] = torch.tensor([3.0, 4.0])
    window = SparseSlidingWindowMFAC(40, 2, 1e-30, 0.05, error_feedback=False)
    window.update(g)
    before = snapshot(window)
    with pytest.raises(NotPositiveDefiniteError, match="the window is unchanged"):
        window.update(g)
    assert_same_state(before, snapshot(window))
    other = torch.zeros(40)
    other[9] = 1.0
    window.update(other)
    assert window.num_stored == 2


def test_memory_is_per_kept_entry_and_checked_before_allocating():
    dim, num_grads, density = 10**4, 16, 0.01
    window = SparseSlidingWindowMFAC(dim, num_grads, 1e-3, density)
    gen = torch.Generator().manual_seed(8)
    for _ in range(num_grads):  # full: the factor is num_grads × num_grads too
        window.update(torch.randn(dim, generator=gen))
    k, padded = 100, 112  # rows are padded to a multiple of 16 entries; the spare one is not
    entries = num_grads * padded + k
    expected = entries * (4 + 4) + dim * 4 + (2 * num_grads + 1) * num_grads * 8
    assert window.nbytes == expected
    assert SparseSlidingWindowMFAC.estimate_bytes(dim, num_grads, density) == expected
    bf16 = SparseSlidingWindowMFAC.estimate_bytes(dim, num_grads, density, torch.bfloat16)
    assert bf16 == expected - entries * 2
    # the paper's setting, 1% of a million coordinates and 1024 gradients: 40x smaller (the
    # n × n float64 system is a sixth of the sparse window there)
    ratio = SlidingWindowMFAC.estimate_bytes(10**6, 1024) / SparseSlidingWindowMFAC.estimate_bytes(
        10**6, 1024, 0.01
    )
    assert 39 < ratio < 41
    with pytest.raises(InsufficientMemoryError, match="lower num_grads or density"):
        SparseSlidingWindowMFAC(2 * 10**9, 10**6, 1e-3, 0.5)


def test_bad_arguments_are_refused():
    for density in (0, -0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
            SparseSlidingWindowMFAC(10, 3, 1e-3, density)
    with pytest.raises(ValueError, match="int32 coordinates"):
        SparseSlidingWindowMFAC(2**31, 3, 1e-3, 1e-9)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        SparseSlidingWindowMFAC(0, 3, 1e-3)
    window = SparseSlidingWindowMFAC(10, 3, 1e-3, 0.2)
    with pytest.raises(ValueError, match=r"shape \(9,\)"):
        window.update(torch.zeros(9))
    with pytest.raises(TypeError, match="floating point"):
        window.solve(torch.zeros(10, dtype=torch.long))


def test_reset_forgets_the_rows_and_the_error():
    window = SparseSlidingWindowMFAC(6, 2, 0.25, 0.5)
    window.update(torch.arange(6.0))
    window.reset()
    assert window.num_stored == 0 and not window.error.any()
    torch.testing.assert_close(window.solve(torch.ones(6)), torch.full((6,), 4.0))


def test_reading_the_error_changes_nothing():
    window = SparseSlidingWindowMFAC(6, 2, 0.25, 0.5)
    window.update(torch.arange(6.0))
    window.error.zero_()
    assert window.error.any()


def test_padded_rows_keep_the_public_shapes_and_load_unpadded_states():
    """k = 7 entries per row are padded to 16 (value 0 at coordinate 0); the state holds the
    [num_grads, k] views, and a state saved before padding loads and continues
    bit-identically."""
    gen = torch.Generator().manual_seed(16)
    grads = torch.randn(12, 61, generator=gen)
    window = SparseSlidingWindowMFAC(61, 4, 1e-3, 0.1)
    for g in grads[:6]:
        window.update(g)
    state = window.state_dict()
    assert state["values"].shape == state["indices"].shape == (4, 7)
    old_format = state | {key: state[key].contiguous().clone() for key in ("values", "indices")}
    resumed = SparseSlidingWindowMFAC(61, 4, 1e-3, 0.1)
    resumed._value_rows.fill_(float("nan"))  # loading must not rely on anything already there
    resumed._index_rows.fill_(12345)
    resumed.load_state_dict(old_format)
    assert not resumed._value_rows[:, 7:].any() and not resumed._index_rows[:, 7:].any()
    for g in grads[6:]:
        assert torch.equal(window.update_solve(g), resumed.update_solve(g))
    assert torch.equal(window.gradients(), resumed.gradients())
