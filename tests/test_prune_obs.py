"""The OBS maths and the mask selection, against explicit float64 matrices."""

import pytest
import torch
from _oracles import block_diagonal_inverse, empirical_fisher
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.curvature import DenseMFAC
from secondorder.prune import (
    count_to_prune,
    obs_saliency,
    obs_update,
    prune_lowest,
    prune_n_m,
    relative_damping,
)

f64 = torch.float64


@settings(max_examples=40, deadline=None)
@given(
    dim=st.integers(2, 12),
    num_grads=st.integers(1, 8),
    log_damp=st.floats(-3, 1),
    seed=st.integers(0, 2**16),
)
def test_single_weight_obs_zeroes_the_weight_at_the_cost_of_its_saliency(
    dim, num_grads, log_damp, seed
):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(num_grads, dim, generator=gen, dtype=f64)
    F = empirical_fisher(G, 10**log_damp)
    F_inv = torch.linalg.inv(F)
    w = torch.randn(dim, generator=gen, dtype=f64)
    q = int(torch.randint(dim, (1,), generator=gen))
    pruned = torch.zeros(dim, dtype=torch.bool)
    pruned[q] = True

    dw = obs_update(w, pruned, F_inv.diagonal(), lambda x: F_inv @ x)
    saliency = obs_saliency(w, F_inv.diagonal())[q]

    assert abs(float(w[q] + dw[q])) <= 1e-12 * float(w.abs().max())
    torch.testing.assert_close(saliency, 0.5 * dw @ F @ dw, rtol=1e-9, atol=0)
    # Independently: the cheapest change with w_q forced to zero re-optimises the
    # other weights, δw_rest = −F_rest,rest⁻¹ F_rest,q δw_q.
    rest = ~pruned
    expected_rest = -torch.linalg.solve(F[rest][:, rest], F[rest][:, q] * -w[q])
    torch.testing.assert_close(dw[rest], expected_rest, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    ("num_grads", "dim", "block"),
    [(6, 23, 4), (6, 23, 8), (3, 20, 5), (5, 17, None)],  # explicit, Woodbury, both, full
)
def test_blockwise_diagonal_and_update_match_the_explicit_block_diagonal_inverse(
    num_grads, dim, block
):
    gen = torch.Generator().manual_seed(dim * 31 + num_grads)
    G = torch.randn(num_grads, dim, generator=gen)
    damp = 1e-2
    inverse = DenseMFAC(G, damp, block)
    expected = block_diagonal_inverse(G, damp, block or dim)
    torch.testing.assert_close(inverse.diag().to(f64), expected.diagonal(), rtol=1e-5, atol=0)

    w = torch.randn(dim, generator=gen)
    pruned = torch.rand(dim, generator=gen) < 0.4
    dw = obs_update(w, pruned, inverse.diag(), inverse.solve)
    v = torch.zeros(dim, dtype=f64)
    v[pruned] = -w[pruned].to(f64) / expected.diagonal()[pruned]
    torch.testing.assert_close(dw.to(f64), expected @ v, rtol=1e-4, atol=1e-6)


def test_relative_damping_is_a_fraction_of_the_mean_fisher_diagonal():
    G = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    # (1/n) GᵀG has diagonal (1 + 9) / 2 and (4 + 0) / 2: mean 3.5.
    assert relative_damping(G, 0.1) == pytest.approx(0.35)


def test_prune_lowest_picks_the_lowest_alive_scores_only():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 2.0, 4.0])
    alive = torch.tensor([True, True, True, False, True, True])
    removed = prune_lowest(scores, alive, 2)
    assert removed.tolist() == [False, True, False, False, True, False]
    assert not prune_lowest(scores, alive, 0).any()
    with pytest.raises(ValueError, match="cannot remove 6 weights: 5 are left"):
        prune_lowest(scores, alive, 6)


def test_count_to_prune_rounds_to_the_nearest_count():
    assert count_to_prune(0.9, 9472, 0) == 8525  # 8524.8
    assert count_to_prune(0.5, 10, 3) == 2
    assert count_to_prune(0.2, 10, 5) == 0


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 6),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)]),
    seed=st.integers(0, 2**16),
)
def test_n_m_leaves_exactly_n_weights_in_every_group_of_m(rows, groups, nm, seed):
    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, groups * m, generator=gen)
    alive = torch.ones(rows, groups * m, dtype=torch.bool)
    removed = prune_n_m(scores, alive, n, m)
    kept = (alive & ~removed).reshape(rows, groups, m)
    assert (kept.sum(-1) == n).all()
    # the kept ones are the best of their group
    grouped = scores.reshape(rows, groups, m)
    assert (
        grouped.masked_fill(~kept, float("inf")).amin(-1)
        >= grouped.masked_fill(kept, -float("inf")).amax(-1)
    ).all()


def test_n_m_counts_already_pruned_weights_first():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    alive = torch.tensor([[False, True, True, True]])
    # 2:4 needs one more zero: the lowest alive score, not a second one.
    assert prune_n_m(scores, alive, 2, 4).tolist() == [[False, False, False, True]]
    with pytest.raises(ValueError, match="groups of 4"):
        prune_n_m(torch.zeros(2, 6), torch.ones(2, 6, dtype=torch.bool), 2, 4)
