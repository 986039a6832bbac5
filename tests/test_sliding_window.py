import io

import pytest
import torch
from _oracles import explicit_solve, relative_error, woodbury_solve
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.curvature import SlidingWindowMFAC
from secondorder.curvature.gram_system import rank2_is_faster
from secondorder.curvature.ldl import ldl_factor
from secondorder.errors import (
    InsufficientMemoryError,
    NonFiniteError,
    NotPositiveDefiniteError,
)

f64 = torch.float64


def feed(window: SlidingWindowMFAC, grads: torch.Tensor) -> None:
    for g in grads:
        window.update(g)


@settings(max_examples=30, deadline=None)
@given(
    dim=st.integers(1, 40),
    num_grads=st.integers(1, 9),
    steps=st.integers(1, 40),
    log_damp=st.floats(-4, 1),
    seed=st.integers(0, 2**16),
    factor_update=st.sampled_from(["rank2", "refactor"]),
)
def test_solve_matches_explicit_and_woodbury_through_warmup_and_wraparound(
    dim, num_grads, steps, log_damp, seed, factor_update
):
    """Both ways of keeping the factor current; "auto" would pick refactoring for every
    num_grads ≤ 9 and never run the rank-2 update."""
    damp = 10.0**log_damp
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(steps, dim, generator=gen, dtype=f64)
    window = SlidingWindowMFAC(dim, num_grads, damp, dtype=f64, factor_update=factor_update)
    for step in range(steps):
        x = torch.randn(dim, generator=gen, dtype=f64)
        returned = window.update_solve(grads[step])
        held = grads[max(0, step + 1 - num_grads) : step + 1]  # only the last num_grads count
        assert window.num_stored == len(held)
        assert relative_error(returned, explicit_solve(held, damp, grads[step])) < 1e-9
        assert relative_error(window.solve(x), explicit_solve(held, damp, x)) < 1e-9
        assert relative_error(window.solve(x), woodbury_solve(held, damp, x)) < 1e-9
    # from the first replacement on, every update but each num_grads-th is a rank-2 one
    rank2_updates = max(0, steps - num_grads) - max(0, steps - num_grads) // num_grads
    if factor_update == "rank2":
        assert window.num_refactors == steps - rank2_updates + window.num_failed_checks


def test_empty_window_is_scaled_identity():
    window = SlidingWindowMFAC(5, 3, damp=0.5, dtype=f64)
    x = torch.arange(5, dtype=f64)
    assert torch.allclose(window.solve(x), x / 0.5)


def test_update_solve_equals_update_then_solve():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(12, 30, generator=gen, dtype=f64)
    fused = SlidingWindowMFAC(30, 5, 1e-3, dtype=f64)
    separate = SlidingWindowMFAC(30, 5, 1e-3, dtype=f64)
    for g in grads:
        a = fused.update_solve(g)
        separate.update(g)
        torch.testing.assert_close(a, separate.solve(g), rtol=1e-9, atol=0)


def test_update_solve_keeps_float32_accuracy_at_tiny_damping():
    """F⁻¹g for a g in the window, via n Gᵀ K⁻¹ e_s: nothing cancels, even at damp = 1e-7
    (the subtracting form (g − Gᵀc)/λ loses all float32 digits there)."""
    dim, num_grads, damp = 500, 16, 1e-7
    gen = torch.Generator().manual_seed(8)
    grads = torch.randn(40, dim, generator=gen)
    window = SlidingWindowMFAC(dim, num_grads, damp)
    for step, g in enumerate(grads):
        out = window.update_solve(g)
        held = grads[max(0, step + 1 - num_grads) : step + 1]
        assert relative_error(out, explicit_solve(held, damp, g)) < 1e-5


def test_result_depends_only_on_the_last_num_grads_gradients():
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(23, 17, generator=gen, dtype=f64)
    long_run, fresh = (
        SlidingWindowMFAC(17, 4, 1e-2, dtype=f64),
        SlidingWindowMFAC(17, 4, 1e-2, dtype=f64),
    )
    feed(long_run, grads)
    feed(fresh, grads[-4:])
    x = torch.randn(17, generator=gen, dtype=f64)
    torch.testing.assert_close(long_run.solve(x), fresh.solve(x), rtol=1e-10, atol=0)


def test_updated_factor_stays_within_1e_8_of_a_fresh_factorisation():
    """10 · num_grads replacements by the O(n²) up/down-date alone (no periodic refactor)."""
    dim, num_grads, damp = 400, 32, 1e-6
    gen = torch.Generator().manual_seed(2)
    window = SlidingWindowMFAC(
        dim, num_grads, damp, dtype=f64, refactor_every=None, factor_update="rank2"
    )
    feed(window, torch.randn(11 * num_grads, dim, generator=gen, dtype=f64))
    assert (
        window.num_refactors == num_grads
    )  # the warm-up only: every later step was an up/down-date
    assert window.num_failed_checks == 0
    system = window._system
    fresh_factor, fresh_pivots = ldl_factor(system.matrix())
    assert relative_error(system.factor, fresh_factor) < 1e-8
    assert relative_error(system.pivots, fresh_pivots) < 1e-8


def test_safeguards_keep_an_ill_conditioned_window_accurate():
    """Rank-deficient Gram (dim < num_grads) and tiny damping: cond(K) ~ 1e8."""
    dim, num_grads, damp = 24, 48, 1e-6
    gen = torch.Generator().manual_seed(3)
    grads = 5 * torch.randn(10 * num_grads, dim, generator=gen, dtype=f64)
    window = SlidingWindowMFAC(dim, num_grads, damp, dtype=f64, factor_update="rank2")
    x = torch.randn(dim, generator=gen, dtype=f64)
    worst = 0.0
    for step, g in enumerate(grads):
        window.update(g)
        if step % 37 == 0 or step == len(grads) - 1:
            held = grads[max(0, step + 1 - num_grads) : step + 1]
            worst = max(worst, relative_error(window.solve(x), explicit_solve(held, damp, x)))
    assert worst < 1e-6
    assert window.num_failed_checks == 0  # accurate by the rank-2 updates, not by refactoring
    assert window.num_refactors == num_grads + 9  # the fill, then one every num_grads updates


@pytest.mark.parametrize("factor_update", ["rank2", "refactor"])
def test_update_solve_stays_accurate_on_an_ill_conditioned_window(factor_update):
    """cond(K) ~ 1e8 (dim < num_grads, tiny damping), through 5 wrap-arounds with no periodic
    refactorisation. A fresh Cholesky factor needs no refinement (2e-8 either way); a factor
    carried by O(n²) updates does: 7e-9 with it, 7e-6 without."""
    dim, num_grads, damp = 24, 48, 1e-6
    gen = torch.Generator().manual_seed(3)
    grads = 5 * torch.randn(6 * num_grads, dim, generator=gen, dtype=f64)
    window = SlidingWindowMFAC(
        dim, num_grads, damp, dtype=f64, factor_update=factor_update, refactor_every=None
    )
    worst = 0.0
    for step, g in enumerate(grads):
        out = window.update_solve(g)
        held = grads[max(0, step + 1 - num_grads) : step + 1]
        worst = max(worst, relative_error(out, explicit_solve(held, damp, g)))
    assert worst < 1e-7
    assert window.num_failed_checks == 0


def test_a_failed_check_triggers_a_refactorisation():
    gen = torch.Generator().manual_seed(4)
    window = SlidingWindowMFAC(
        20, 4, 1e-3, dtype=f64, refactor_every=None, check_tol=0.0, factor_update="rank2"
    )
    feed(window, torch.randn(9, 20, generator=gen, dtype=f64))
    assert window.num_failed_checks == 5  # every post-warm-up update fails a zero tolerance
    assert window.num_refactors == 4 + 5


def test_factor_update_policy():
    assert rank2_is_faster(256, torch.device("cuda"))
    assert not rank2_is_faster(255, torch.device("cuda"))
    assert rank2_is_faster(512, torch.device("cpu"))
    assert not rank2_is_faster(511, torch.device("cpu"))
    assert not rank2_is_faster(10**4, torch.device("mps"))
    assert SlidingWindowMFAC(10, 4).factor_update == "refactor"
    refactoring = SlidingWindowMFAC(10, 2, factor_update="refactor")
    feed(refactoring, torch.randn(5, 10))
    assert refactoring.num_refactors == 5
    with pytest.raises(ValueError, match="factor_update must be"):
        SlidingWindowMFAC(10, 4, factor_update="sometimes")


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_half_precision_storage(storage):
    """Exact for the window as stored; the rounding itself costs what the dtype costs."""
    dim, num_grads, damp = 300, 8, 1e-3
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(13, dim, generator=gen)
    window = SlidingWindowMFAC(dim, num_grads, damp, storage_dtype=storage)
    for g in grads:
        out = window.update_solve(g)
    held = grads[-num_grads:]
    assert relative_error(out, explicit_solve(held.to(storage), damp, grads[-1].to(storage))) < 1e-6
    error = relative_error(out, explicit_solve(held, damp, grads[-1]))
    assert error < (4e-3 if storage == torch.bfloat16 else 5e-4)
    assert window._grads.dtype == storage and window._system.gram.dtype == f64


def test_state_dict_round_trip_continues_bit_identically():
    gen = torch.Generator().manual_seed(6)
    grads = torch.randn(30, 50, generator=gen)
    reference = SlidingWindowMFAC(50, 7, 1e-4)
    interrupted = SlidingWindowMFAC(50, 7, 1e-4)
    for g in grads[:11]:
        reference.update_solve(g)
        interrupted.update_solve(g)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = SlidingWindowMFAC(50, 7, 1e-4)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for g in grads[11:]:
        assert torch.equal(reference.update_solve(g), resumed.update_solve(g))


def test_load_state_dict_rejects_a_different_window():
    saved = SlidingWindowMFAC(10, 3, 1e-4).state_dict()
    with pytest.raises(ValueError, match="num_grads=3"):
        SlidingWindowMFAC(10, 4, 1e-4).load_state_dict(saved)
    with pytest.raises(ValueError, match="damp"):
        SlidingWindowMFAC(10, 3, 1e-3).load_state_dict(saved)


@pytest.mark.parametrize("damp", [0.0, -1e-3, float("nan"), float("inf")])
def test_bad_damping_is_refused(damp):
    with pytest.raises(ValueError, match="damp must be a finite number > 0"):
        SlidingWindowMFAC(10, 3, damp)


@pytest.mark.parametrize("factor_update", ["refactor", "rank2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_is_rejected_and_the_window_is_unchanged(bad, factor_update):
    """The insertion checks the gradient with the factor's verdict, after writing it: the
    row, the Gram matrix, the factor and the counters are put back (full window, both
    ways of keeping the factor current)."""
    gen = torch.Generator().manual_seed(7)
    window = SlidingWindowMFAC(10, 3, 1e-3, factor_update=factor_update)
    feed(window, torch.randn(4, 10, generator=gen))
    before = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in window.state_dict().items()
    }
    g = torch.randn(10, generator=gen)
    g[3] = bad
    with pytest.raises(NonFiniteError, match="1 NaN or Inf entries out of 10"):
        window.update_solve(g)
    for key, value in window.state_dict().items():
        assert (
            torch.equal(value, before[key])
            if isinstance(value, torch.Tensor)
            else value == before[key]
        )


def test_shape_device_and_type_errors():
    window = SlidingWindowMFAC(10, 3, 1e-3)
    with pytest.raises(
        ValueError, match=r"shape \(9,\); this window holds vectors of shape \(10,\)"
    ):
        window.update(torch.zeros(9))
    with pytest.raises(ValueError, match="shape"):
        window.solve(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="is on meta but the window is on cpu"):
        window.update(torch.zeros(10, device="meta"))
    with pytest.raises(TypeError, match="floating point"):
        window.update(torch.zeros(10, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        window.update([0.0] * 10)
    with pytest.raises(ValueError, match="num_grads must be a positive integer"):
        SlidingWindowMFAC(10, 0)


def test_a_window_too_large_for_memory_is_refused_before_allocating():
    with pytest.raises(
        InsufficientMemoryError, match=r"1024 x 1000000000000 .* needs 3\.6 PiB|needs .* but only"
    ):
        SlidingWindowMFAC(10**12, 1024)
    # ten rows padded to 1008 numbers (a multiple of 16), the spare row of 1000
    assert (
        SlidingWindowMFAC.estimate_bytes(1000, 10, torch.bfloat16)
        == (10 * 1008 + 1000) * 2 + (2 * 10 + 1) * 10 * 8
    )
    window = SlidingWindowMFAC(1000, 10, storage_dtype=torch.bfloat16)
    assert window.nbytes == SlidingWindowMFAC.estimate_bytes(1000, 10, torch.bfloat16)


def test_reset_forgets_everything():
    window = SlidingWindowMFAC(6, 2, 0.25)
    feed(window, torch.ones(3, 6))
    window.reset()
    assert window.num_stored == 0
    torch.testing.assert_close(window.solve(torch.ones(6)), torch.full((6,), 4.0))


def test_finite_gradients_whose_sum_overflows_are_accepted():
    window = SlidingWindowMFAC(4, 2, 1e-3)
    window.update(torch.full((4,), 3e38))  # the float32 sum is inf, every entry is finite
    assert window.num_stored == 1


@pytest.mark.parametrize("rank2", [False, True])
@pytest.mark.parametrize("warm", [False, True])
def test_a_singular_system_raises_and_leaves_the_window_unchanged(rank2, warm):
    """With ``n·damp`` lost in the rounding of ``‖g‖² = 25``, a repeated gradient makes
    ``K = [[25, 25], [25, 25]]`` exactly (integers: no rounding anywhere), so a fresh
    Cholesky must fail. The rank-2 path may instead produce a factor with a pivot at
    rounding level; with ``check_tol=0`` its check rejects every update, so it too ends
    in that Cholesky, and the window is restored from inside the update."""
    g0, g1, g2 = torch.zeros(3, 40)
    g0[:2] = torch.tensor([3.0, 4.0])
    g1[2] = 5.0
    g2[3] = 1.0
    window = SlidingWindowMFAC(
        40,
        2,
        damp=1e-30,
        factor_update="rank2" if rank2 else "refactor",
        **({"check_tol": 0.0, "refactor_every": None} if rank2 else {}),
    )
    feed(window, torch.stack([g0, g1]) if warm else g0[None])
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in window.state_dict().items()}
    with pytest.raises(NotPositiveDefiniteError, match="the window is unchanged"):
        window.update(g1 if warm else g0)  # the window would hold it twice
    after = window.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value) if torch.is_tensor(value) else after[key] == value
    window.update(g2)  # a new direction still goes in
    assert window.num_stored == 2


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_relative_damping_is_the_mean_squared_entry_times_rho(kind):
    """Refactoring every step, λ = ρ · mean(g²) over the gradients held, at every step."""
    from secondorder.curvature import SparseSlidingWindowMFAC

    dim, num_grads, rho = 30, 4, 0.05
    gen = torch.Generator().manual_seed(11)
    grads = 3 * torch.randn(9, dim, generator=gen, dtype=f64)
    options = {"dtype": f64, "relative_damp": rho, "factor_update": "refactor"}
    window = (
        SlidingWindowMFAC(dim, num_grads, **options)
        if kind == "dense"
        else SparseSlidingWindowMFAC(dim, num_grads, 1e-6, 1.0, **options)
    )
    for step, g in enumerate(grads):
        out = window.update_solve(g)
        held = grads[max(0, step + 1 - num_grads) : step + 1]
        damp = rho * float(held.square().mean())
        assert window.damp == pytest.approx(damp, rel=1e-12)
        assert relative_error(out, explicit_solve(held, damp, g)) < 1e-10


def test_relative_damping_makes_the_step_scale_free():
    """F(cG) = c² F(G) when λ scales with the gradients, so F⁻¹(c g) = F⁻¹(g) / c."""
    gen = torch.Generator().manual_seed(12)
    grads = torch.randn(20, 50, generator=gen, dtype=f64)
    small = SlidingWindowMFAC(50, 6, dtype=f64, relative_damp=0.01, factor_update="rank2")
    large = SlidingWindowMFAC(50, 6, dtype=f64, relative_damp=0.01, factor_update="rank2")
    for g in grads:
        torch.testing.assert_close(large.update_solve(1e3 * g), small.update_solve(g) / 1e3)
    assert large.damp == pytest.approx(1e6 * small.damp)


def test_relative_damping_is_frozen_between_refactorisations():
    """Once full, λ changes only when the factor is refactored (every refactor_every updates)."""
    gen = torch.Generator().manual_seed(13)
    window = SlidingWindowMFAC(
        40, 4, dtype=f64, relative_damp=0.1, factor_update="rank2", refactor_every=3
    )
    damps = []
    for step in range(12):
        window.update(torch.randn(40, generator=gen, dtype=f64) * (1 + step))
        damps.append(window.damp)
    # refactors at steps 0-3 (filling), then every 3rd update: steps 6, 9
    changes = [i for i in range(1, 12) if damps[i] != damps[i - 1]]
    assert changes == [1, 2, 3, 6, 9]
    assert window.num_failed_checks == 0
    held = window.gradients()
    x = torch.randn(40, generator=gen, dtype=f64)
    assert relative_error(window.solve(x), explicit_solve(held, window.damp, x)) < 1e-9


def test_relative_damping_resumes_and_refuses_a_mismatch():
    gen = torch.Generator().manual_seed(14)
    grads = torch.randn(10, 20, generator=gen)
    reference = SlidingWindowMFAC(20, 4, relative_damp=0.1)
    for g in grads[:6]:
        reference.update(g)
    resumed = SlidingWindowMFAC(20, 4, relative_damp=0.1)
    resumed.load_state_dict(reference.state_dict())
    assert resumed.damp == reference.damp
    for g in grads[6:]:
        assert torch.equal(resumed.update_solve(g), reference.update_solve(g))
    with pytest.raises(ValueError, match="relative_damp"):
        SlidingWindowMFAC(20, 4, relative_damp=0.2).load_state_dict(reference.state_dict())
    with pytest.raises(ValueError, match="relative_damp"):
        SlidingWindowMFAC(20, 4).load_state_dict(reference.state_dict())


def test_padded_rows_keep_the_public_shapes_and_load_unpadded_states():
    """The rows are padded to 48 numbers for dim = 37; ``state_dict()["grads"]`` is the
    [num_grads, dim] view, and a state saved before padding (a contiguous [num_grads, dim]
    tensor) loads and continues bit-identically, the padding staying zero."""
    gen = torch.Generator().manual_seed(15)
    grads = torch.randn(12, 37, generator=gen)
    window = SlidingWindowMFAC(37, 4, 1e-3)
    for g in grads[:6]:
        window.update(g)
    state = window.state_dict()
    assert state["grads"].shape == (4, 37) and window._rows.shape == (4, 48)
    old_format = state | {"grads": state["grads"].contiguous().clone()}
    buffer = io.BytesIO()
    torch.save(old_format, buffer)
    buffer.seek(0)
    resumed = SlidingWindowMFAC(37, 4, 1e-3)
    resumed._rows.fill_(float("nan"))  # loading must not rely on anything already there
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert not resumed._rows[:, 37:].any()
    for g in grads[6:]:
        assert torch.equal(window.update_solve(g), resumed.update_solve(g))
    assert not window._rows[:, 37:].any()
    assert torch.equal(window.gradients(), resumed.gradients())
