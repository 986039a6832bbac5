"""MFACPruner(update="joint"): exact OBS for the weights removed from each block together.

Held out from the rest of the pruning tests: a convolution and a linear layer whose
blocks cross rows and are padded at the end of each tensor, against a float64
oracle that restricts the Fisher to the weights still alive instead of down-dating
its inverse.
"""

import pytest
import torch
from _oracles import empirical_fisher
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secondorder import _checks
from secondorder.errors import InsufficientMemoryError
from secondorder.prune import MFACPruner, count_to_prune, prune_lowest, prune_n_m
from secondorder.prune.block_obs import remove_jointly, to_blocks

f64 = torch.float64


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(2, 10),
    num_grads=st.integers(1, 12),
    log_damp=st.floats(-3, 0),
    seed=st.integers(0, 2**16),
)
def test_joint_removal_is_the_exact_obs_step_for_the_set(size, num_grads, log_damp, seed):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(num_grads, size, generator=gen, dtype=f64)
    F = empirical_fisher(G, 10**log_damp)
    w = torch.randn(size, generator=gen, dtype=f64)
    removed = torch.rand(size, generator=gen) < 0.5
    removed[int(torch.randint(size, (1,), generator=gen))] = True
    kept = ~removed
    H = torch.linalg.inv(F)[None].clone()
    new = w[None].clone()

    remove_jointly(new, H, removed[None])

    dw = new[0] - w
    assert (new[0][removed] == 0).all()
    # the kept weights re-optimised: δw_K = F_KK⁻¹ F_KQ w_Q (derived from F, not F⁻¹)
    expected = torch.linalg.solve(F[kept][:, kept], F[kept][:, removed] @ w[removed])
    torch.testing.assert_close(dw[kept], expected, rtol=1e-8, atol=1e-10)
    # the cost is the saliency of the set, ρ_Q = ½ w_Qᵀ ([F⁻¹]_QQ)⁻¹ w_Q = ½ δwᵀ F δw
    H_QQ = torch.linalg.inv(F)[removed][:, removed]
    rho = 0.5 * w[removed] @ torch.linalg.solve(H_QQ, w[removed])
    torch.testing.assert_close(rho, 0.5 * dw @ F @ dw, rtol=1e-8, atol=1e-12)
    # the inverse left is that of F restricted to the kept weights, the removed decoupled
    if kept.any():
        torch.testing.assert_close(
            H[0][kept][:, kept], torch.linalg.inv(F[kept][:, kept]), rtol=1e-7, atol=1e-9
        )
    scale = float(torch.linalg.inv(F).abs().max())
    assert (H[0][removed][:, kept].abs() <= 1e-12 * scale).all()
    eye = torch.eye(int(removed.sum()), dtype=f64)
    torch.testing.assert_close(H[0][removed][:, removed], eye, rtol=0, atol=1e-12 * scale)


def conv_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv1d(2, 3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 5)).double()


def conv_data(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [
        (torch.randn(4, 2, 7, generator=gen, dtype=f64), torch.randint(0, 5, (4,), generator=gen))
        for _ in range(count)
    ]


def weights_of(model: nn.Module) -> list[torch.Tensor]:
    return [model[i].weight.detach() for i in (0, 3)]


def joint_oracle(model, batches, damp, block, goals, scope):
    """Sequential exact OBS on each tensor's blocks, every round from F restricted to the alive weights."""
    params = [model[i].weight for i in (0, 3)]
    rows = [p.shape[0] for p in params]
    grads = []
    for inputs, targets in batches:
        parts = torch.autograd.grad(nn.functional.cross_entropy(model(inputs), targets), params)
        grads.append(torch.cat([g.flatten() for g in parts]))
    G = torch.stack(grads)
    sizes = [p.numel() for p in params]
    # blocks: (start, stop) in the flat vector, never across two tensors
    blocks, offset = [], 0
    for size in sizes:
        blocks += [(offset + s, offset + min(s + block, size)) for s in range(0, size, block)]
        offset += size
    F = {b: empirical_fisher(G[:, b[0] : b[1]], damp) for b in blocks}
    w = torch.cat([p.detach().flatten() for p in params]).clone()
    alive = torch.ones_like(w, dtype=torch.bool)
    for goal in goals:
        scores = torch.full_like(w, float("inf"))
        for (start, stop), fisher in F.items():
            a = alive[start:stop]
            inverse_diag = torch.linalg.inv(fisher[a][:, a]).diagonal()
            scores[start:stop][a] = w[start:stop][a].square() / (2 * inverse_diag)
        removed = []
        for s, a, size, r in zip(scores.split(sizes), alive.split(sizes), sizes, rows, strict=True):
            if isinstance(goal, tuple):
                removed.append(prune_n_m(s.reshape(r, -1), a.reshape(r, -1), *goal).flatten())
            else:
                removed.append(prune_lowest(s, a, count_to_prune(goal, size, int((~a).sum()))))
        if scope == "global":
            count = count_to_prune(goal, w.numel(), int((~alive).sum()))
            removed = [prune_lowest(scores, alive, count)]
        removed = torch.cat(removed)
        for (start, stop), fisher in F.items():
            q, k = removed[start:stop], (alive & ~removed)[start:stop]
            block_w = w[start:stop]
            block_w[k] += torch.linalg.solve(fisher[k][:, k], fisher[k][:, q] @ block_w[q])
            block_w[q] = 0
        alive &= ~removed
    return [part.reshape(p.shape) for part, p in zip(w.split(sizes), params, strict=True)]


@pytest.mark.parametrize(
    ("scope", "prune_args", "rounds", "goals"),
    [
        ("layer", {"sparsity": 0.5}, 2, [1 - 0.5**0.5, 0.5]),
        ("global", {"sparsity": 0.6}, 3, [1 - 0.4 ** (1 / 3), 1 - 0.4 ** (2 / 3), 0.6]),
        ("layer", {"n_m": (2, 4)}, 8, [(3, 4), (2, 4)]),  # a round per weight of each group
    ],
)
def test_joint_pruner_matches_the_float64_oracle(scope, prune_args, rounds, goals):
    model, batches = conv_model(), conv_data(6)
    damp, block = 1e-2, 5  # blocks cross rows; 24 and 60 weights: the last block padded
    expected = joint_oracle(model, batches, damp, block, goals, scope)
    pruner = MFACPruner(
        model, nn.functional.cross_entropy, batches, num_grads=6, block_size=block, damp=damp,
        relative_damp=0.0, scope=scope, progress=False, update="joint", rounds=rounds,
    )  # fmt: skip
    pruner.prune(**prune_args)
    for actual, wanted in zip(weights_of(model), expected, strict=True):
        assert torch.equal(actual == 0, wanted == 0)  # the same masks
        torch.testing.assert_close(actual, wanted, rtol=1e-9, atol=1e-12)
    if "n_m" in prune_args:
        for weight in weights_of(model):
            groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
            assert (groups <= 2).all()


def test_joint_keeps_weights_pruned_before_and_counts_them():
    model, batches = conv_model(), conv_data(4)
    pruner = MFACPruner(
        model, nn.functional.cross_entropy, batches, num_grads=4, block_size=8,
        progress=False, update="joint", scope="layer",
    )  # fmt: skip
    pruner.prune(0.3)
    zeros = [w == 0 for w in weights_of(model)]
    assert pruner.prune(0.6) == pytest.approx(0.6, abs=0.01)
    for before, weight in zip(zeros, weights_of(model), strict=True):
        assert (weight[before] == 0).all()


def test_memory_guard_counts_the_explicit_blocks(monkeypatch):
    model, batches = conv_model(), conv_data(2)
    ce = nn.functional.cross_entropy
    pruner = MFACPruner(
        model, ce, batches, num_grads=2, block_size=8, progress=False, update="joint",
        scope="layer",
    )  # fmt: skip
    # 2 gradients of 84 float64 weights, and twice the largest tensor's 60 x 8 block rows
    needed = 2 * 84 * 8 + 2 * 60 * 8 * 8
    monkeypatch.setattr(_checks, "free_bytes", lambda device: needed - 1)
    with pytest.raises(InsufficientMemoryError):
        pruner.prune(0.5)
    assert not hasattr(model[0], "weight_mask")
    monkeypatch.setattr(_checks, "free_bytes", lambda device: needed + 10**6)
    assert pruner.prune(0.5) == pytest.approx(0.5, abs=0.01)


def test_to_blocks_pads_the_last_block():
    blocks = to_blocks(torch.arange(5.0), 2, fill=-1)
    assert blocks.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, -1.0]]


def test_joint_argument_errors():
    model, batches = conv_model(), conv_data(2)
    ce = nn.functional.cross_entropy
    with pytest.raises(ValueError, match="update must be"):
        MFACPruner(model, ce, batches, update="exact")
    with pytest.raises(ValueError, match="needs a block_size"):
        MFACPruner(model, ce, batches, update="joint", block_size=None)
    with pytest.raises(ValueError, match="rounds"):
        MFACPruner(model, ce, batches, update="joint", rounds=0)
