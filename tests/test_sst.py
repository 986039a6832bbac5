"""Sparse Spectral Training: the factors, the enhanced gradients, both modes, the state."""

import copy
import io
import itertools

import pytest
import torch
from torch import nn

from secondorder.nn import SpectralLinear, refactor, spectral_factors, to_spectral
from secondorder.optim import SST
from secondorder.optim.sst import _round_generator, sample_pairs

f64 = torch.float64


def mlp(dtype=f64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype)


def data(steps, dtype=f64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(32, 12, generator=gen, dtype=dtype),
            torch.randn(32, 5, generator=gen, dtype=dtype),
        )
    ] * steps


def train(model, optimizer, batches):
    for inputs, targets in batches:
        optimizer.zero_grad()
        loss = (model(inputs) - targets).square().mean()
        loss.backward()
        optimizer.step()
    return loss


def drop_in(model, rank=3, gap=4, **kwargs):
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "rank": rank, "update_proj_gap": gap}, {"params": others}]
    return SST(groups, lr=1e-2, **kwargs)


def product(U, s, V):
    return (U * s) @ V.T


# ------------------------------------------------------------------ factors


def test_factors_reconstruct_the_weight_and_refactor_keeps_the_product():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(9, 6, generator=gen, dtype=f64)
    U, s, V = spectral_factors(W)
    torch.testing.assert_close(product(U, s, V), W, rtol=1e-12, atol=1e-12)
    # drifted factors, as after some SST steps: no longer orthonormal, s unsorted
    U2 = U + 0.1 * torch.randn(9, 6, generator=gen, dtype=f64)
    V2 = V + 0.1 * torch.randn(6, 6, generator=gen, dtype=f64)
    s2 = s.flip(0) * 1.3
    U3, s3, V3 = refactor(U2, s2, V2)
    torch.testing.assert_close(product(U3, s3, V3), product(U2, s2, V2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U3.T @ U3, torch.eye(6, dtype=f64), rtol=0, atol=1e-12)
    torch.testing.assert_close(V3.T @ V3, torch.eye(6, dtype=f64), rtol=0, atol=1e-12)
    assert torch.all(s3[:-1] >= s3[1:]) and torch.all(s3 >= 0)


def test_to_spectral_keeps_the_function_and_drops_the_dense_weights():
    model = mlp()
    spectral = to_spectral(copy.deepcopy(model), rank=3)
    x = torch.randn(7, 12, dtype=f64)
    torch.testing.assert_close(spectral(x), model(x), rtol=1e-12, atol=1e-12)
    assert isinstance(spectral[0], SpectralLinear) and isinstance(spectral[2], SpectralLinear)
    torch.testing.assert_close(spectral[0].dense_weight(), model[0].weight, rtol=1e-12, atol=1e-12)
    shapes = {tuple(p.shape) for p in spectral.parameters()}
    assert (16, 12) not in shapes and (5, 16) not in shapes  # no dense weight, and no dense grad
    assert spectral[0].bias is not None and spectral[0].bias.shape == (16,)


def test_spectral_layer_gradients_are_the_enhanced_ones():
    """s gets ∂L/∂s_i = u_iᵀ G v_i; u, v get G v_i and Gᵀ u_i (no factor s_i); x its own."""
    torch.manual_seed(2)
    layer = SpectralLinear.from_linear(nn.Linear(7, 5).to(f64), rank=3)
    layer.select(torch.tensor([0, 2, 4]))
    x = torch.randn(4, 3, 7, dtype=f64, requires_grad=True)  # extra batch dimension
    target = torch.randn(4, 3, 5, dtype=f64)
    (layer(x) - target).square().sum().backward()

    W = layer.dense_weight().clone().requires_grad_(True)
    x_dense = x.detach().clone().requires_grad_(True)
    (nn.functional.linear(x_dense, W, layer.bias) - target).square().sum().backward()
    G = W.grad
    U, V = layer.U.clone(), layer.V.clone()
    U[:, layer.indices], V[:, layer.indices] = layer.u.detach(), layer.v.detach()
    torch.testing.assert_close(layer.s.grad, torch.diag(U.T @ G @ V), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.u.grad, G @ layer.v.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.v.grad, G.T @ layer.u.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_dense.grad, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_pair_is_drawn_with_probability_proportional_to_its_singular_value(seed):
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])
    draws = 4000
    counts = torch.zeros(5)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        counts[sample_pairs(s, 1, 0.0, gen)] += 1
    expected = s / s.sum()
    spread = (expected * (1 - expected) / draws).sqrt()
    assert torch.all((counts / draws - expected).abs() <= 4 * spread + 1e-12)
    assert counts[4] == 0  # a zero singular value is never drawn without the uniform share


def test_uniform_share_and_distinct_sorted_pairs():
    gen = torch.Generator().manual_seed(3)
    s = torch.tensor([100.0, 0.0, 0.0, 0.0])
    drawn = torch.stack([sample_pairs(s, 1, 1.0, gen) for _ in range(2000)]).flatten()
    assert drawn.bincount(minlength=4).min() > 400  # uniform: each near 500
    pairs = sample_pairs(torch.rand(10), 6, 0.5, gen)
    assert pairs.tolist() == sorted(set(pairs.tolist())) and len(pairs) == 6
    s = torch.rand(50)
    again = [sample_pairs(s, 4, 0.5, _round_generator(0, 1, 2)) for _ in range(2)]
    assert torch.equal(*again)  # a round's sample depends on (seed, weight, round) only
    others = [sample_pairs(s, 4, 0.5, _round_generator(0, 1, t)) for t in range(3, 8)]
    assert any(not torch.equal(again[0], other) for other in others)


# ------------------------------------------------------------------ the two modes


def test_drop_in_and_spectral_modes_follow_the_same_trajectory():
    """Same SVD, same pairs, same arithmetic: across three rounds, the models agree."""
    dense, spectral = mlp(), to_spectral(mlp(), rank=3)
    dense_optimizer = drop_in(dense, rank=3, gap=4, weight_decay=0.1, uniform_mix=0.5)
    spectral_optimizer = SST(
        spectral, lr=1e-2, update_proj_gap=4, weight_decay=0.1, uniform_mix=0.5
    )
    batches = data(11)
    x = batches[0][0]
    for batch in batches:
        train(dense, dense_optimizer, [batch])
        train(spectral, spectral_optimizer, [batch])
        torch.testing.assert_close(spectral(x), dense(x), rtol=1e-9, atol=1e-11)
    assert spectral_optimizer.state[spectral[0].s]["rounds"] == 3


def test_drop_in_state_reconstructs_the_weight_after_every_step_and_round():
    model = mlp()
    optimizer = drop_in(model, rank=3, gap=2)
    for step, batch in enumerate(data(5)):
        train(model, optimizer, [batch])
        for p in (model[0].weight, model[2].weight):
            state = optimizer.state[p]
            torch.testing.assert_close(
                product(state["U"], state["s"], state["V"]), p, rtol=0, atol=1e-12
            )
            assert torch.all(state["s"] >= 0)
            sampled_norms = state["U"][:, state["indices"]].norm(dim=0)
            torch.testing.assert_close(sampled_norms, torch.ones(3, dtype=f64), rtol=0, atol=1e-12)
            assert state["moments"]["s"]["step"] == step % 2 + 1  # Adam restarts each round


def test_singular_values_are_clamped_at_zero_and_sampled_vectors_stay_unit():
    model = to_spectral(mlp(), rank=2)
    optimizer = SST(model, lr=5.0, update_proj_gap=100)  # steps far larger than s
    train(model, optimizer, data(3))
    for layer in (model[0], model[2]):
        assert torch.all(layer.s >= 0) and bool((layer.s == 0).any())
        torch.testing.assert_close(
            layer.u.norm(dim=0), torch.ones(2, dtype=f64), rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            layer.v.norm(dim=0), torch.ones(2, dtype=f64), rtol=0, atol=1e-12
        )


def test_refactor_of_a_drifted_spectral_layer_keeps_its_function():
    torch.manual_seed(4)
    layer = SpectralLinear.from_linear(nn.Linear(7, 5).to(f64), rank=2)
    layer.select(torch.tensor([1, 3]))
    with torch.no_grad():  # what SST steps do: sampled columns and s move off the SVD
        layer.u.add_(0.3 * torch.randn_like(layer.u))
        layer.v.add_(0.3 * torch.randn_like(layer.v))
        layer.s.mul_(torch.rand_like(layer.s) + 0.5)
    x = torch.randn(6, 7, dtype=f64)
    before, weight = layer(x).detach(), layer.dense_weight()
    layer.refactor()
    torch.testing.assert_close(layer(x), before, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.dense_weight(), weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(5, dtype=f64), rtol=0, atol=1e-12)
    assert torch.equal(layer.u, layer.U[:, layer.indices])


def test_first_drop_in_step_is_adam_on_singular_values_and_sampled_vectors_by_hand():
    """Adam's first step moves each coordinate by lr · g / (|g| + ε) (its bias corrections
    cancel): s by ∂L/∂s = diag(Uᵀ G V), the sampled u, v by the enhanced G v and Gᵀ u, which
    are then normalised; the weight becomes U diag(s) Vᵀ."""
    lr, eps = 0.01, 1e-8
    gen = torch.Generator().manual_seed(5)
    start, G = (
        torch.randn(7, 5, generator=gen, dtype=f64),
        torch.randn(7, 5, generator=gen, dtype=f64),
    )
    p = nn.Parameter(start.clone())
    optimizer = SST([{"params": [p], "rank": 2, "update_proj_gap": 10}], lr=lr, eps=eps)
    p.grad = G
    optimizer.step()

    def adam_first_step(x, g):
        return x - lr * g / (g.abs() + eps)

    U, s, V = spectral_factors(start)
    pairs = optimizer.state[p]["indices"]
    s = adam_first_step(s, torch.diag(U.T @ G @ V)).clamp_min(0)
    u = adam_first_step(U[:, pairs], G @ V[:, pairs])
    v = adam_first_step(V[:, pairs], G.T @ U[:, pairs])
    U[:, pairs], V[:, pairs] = u / u.norm(dim=0), v / v.norm(dim=0)
    torch.testing.assert_close(p.detach(), product(U, s, V), rtol=1e-9, atol=1e-12)


def test_drop_in_steps_go_downhill():
    """Least squares ½‖W − T‖²: SST's steps lower the loss, over rounds of resampled pairs."""
    gen = torch.Generator().manual_seed(6)
    target = torch.randn(8, 6, generator=gen, dtype=f64)
    p = nn.Parameter(torch.randn(8, 6, generator=gen, dtype=f64))
    optimizer = SST([{"params": [p], "rank": 2, "update_proj_gap": 5}], lr=0.05)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = 0.5 * (p - target).square().sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert sum(b < a for a, b in itertools.pairwise(losses)) > 30


def test_pairs_stay_fixed_within_a_round_and_are_resampled_between_rounds():
    model = to_spectral(mlp(), rank=2)
    optimizer = SST(model, lr=1e-2, update_proj_gap=3, uniform_mix=1.0, seed=5)
    chosen = []
    for batch in data(12):
        train(model, optimizer, [batch])
        chosen.append(tuple(model[0].indices.tolist()))
        assert optimizer.state[model[0].s]["step"] == len(chosen) % 3  # Adam restarts each round
    rounds = [chosen[i : i + 3] for i in (2, 5, 8)]  # a round's pairs: from step 3k to 3k + 2
    assert all(len(set(r)) == 1 for r in rounds)
    assert len({r[0] for r in rounds}) > 1


# ------------------------------------------------------------------ dtypes, no grads, state


def test_bf16_drop_in_keeps_float32_factors():
    model = mlp(torch.bfloat16)
    optimizer = drop_in(model, rank=3, gap=2)
    train(model, optimizer, data(3, torch.bfloat16))
    state = optimizer.state[model[0].weight]
    assert model[0].weight.dtype == torch.bfloat16 and state["U"].dtype == torch.float32
    torch.testing.assert_close(
        product(state["U"], state["s"], state["V"]).to(torch.bfloat16),
        model[0].weight,
        rtol=0,
        atol=0,
    )


def test_parameters_without_gradients_are_skipped():
    model = mlp()
    model[2].weight.requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    optimizer = drop_in(model)
    train(model, optimizer, data(2))
    assert torch.equal(model[2].weight, frozen) and model[2].weight not in optimizer.state


@pytest.mark.parametrize("mode", ["drop-in", "spectral"])
def test_state_dict_round_trip_resumes_bit_identically(mode):
    def build(seed=0):
        model = mlp(seed=seed)
        if mode == "drop-in":
            return model, drop_in(model, rank=3, gap=3, weight_decay=0.01, uniform_mix=0.5)
        model = to_spectral(model, rank=3)
        return model, SST(model, lr=1e-2, update_proj_gap=3, weight_decay=0.01, uniform_mix=0.5)

    batches = [data(1, seed=i)[0] for i in range(8)]
    reference, reference_optimizer = build()
    train(reference, reference_optimizer, batches)

    interrupted, optimizer = build()
    train(interrupted, optimizer, batches[:4])  # inside the second round
    buffer = io.BytesIO()
    torch.save({"model": interrupted.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_optimizer = build(seed=7)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train(resumed, resumed_optimizer, batches[4:])
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ bad settings


def test_bad_settings_are_refused():
    model = mlp()
    with pytest.raises(
        ValueError, match=r"rank 6 is larger than the 5 singular values of a weight"
    ):
        SST([{"params": [model[2].weight], "rank": 6}])
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        SST([{"params": [model[2].weight], "rank": 0}])
    with pytest.raises(ValueError, match=r"uniform_mix must be in \[0, 1\]"):
        SST([{"params": [model[2].weight], "rank": 2, "uniform_mix": 1.5}])
    refused = mlp()
    with pytest.raises(ValueError, match=r"rank 6 is larger than min\(in, out\) = 5 of layer '2'"):
        to_spectral(refused, rank=6)
    assert all(type(layer) is not SpectralLinear for layer in refused)  # none converted
    with pytest.raises(ValueError, match=r"not nn.Linear layers of this model: \['1'\]"):
        to_spectral(mlp(), rank=2, modules=["1"])
    with pytest.raises(
        ValueError, match=r"no SpectralLinear layers: call secondorder.nn.to_spectral"
    ):
        SST(mlp())
    with pytest.raises(ValueError, match="give it to to_spectral"):
        SST(to_spectral(mlp(), rank=2), rank=2)


def test_complex_weights_are_refused_spectrally_and_stepped_by_adamw_otherwise():
    weight = nn.Parameter(torch.randn(5, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="cannot be trained spectrally"):
        SST([{"params": [weight], "rank": 2}])
    bias = nn.Parameter(torch.randn(5, dtype=torch.complex64))
    optimizer = SST([{"params": [bias, weight]}], lr=0.1)
    bias.grad, weight.grad = (1 + 1j) * torch.ones_like(bias), (1 - 1j) * torch.ones_like(weight)
    before = weight.detach().clone()
    optimizer.step()  # AdamW's first step moves every real and imaginary part by -lr
    torch.testing.assert_close(weight.detach(), before - 0.1 * (1 - 1j), rtol=0, atol=1e-6)


def test_weight_decay_shrinks_the_whole_weight():
    """With a zero gradient the step is decay only: s ← (1 - lr·wd) s, so W ← (1 - lr·wd) W."""
    model = mlp()
    before = model[0].weight.detach().clone()
    optimizer = SST([{"params": [model[0].weight], "rank": 3}], lr=0.1, weight_decay=0.5)
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    optimizer.step()
    torch.testing.assert_close(model[0].weight, 0.95 * before, rtol=1e-12, atol=1e-12)


def test_the_old_import_path_of_to_spectral_warns_and_still_works():
    from secondorder.optim import sst

    with pytest.warns(DeprecationWarning, match="moved to secondorder.nn.to_spectral"):
        model = sst.to_spectral(mlp(), 3)
    assert isinstance(model[0], SpectralLinear)


@pytest.mark.slow
def test_no_loss_jump_at_round_boundaries_on_the_tiny_llama():
    """The low-rank benchmark's tiny Llama (0.43M parameters, rounds of 50 steps, lr 1e-2 on
    its warm-up-then-cosine schedule over 300 steps), trained for 105 steps: the mean loss
    of the 5 steps after each boundary exceeds the mean of the 5 before by less than 0.1
    nats. Without the re-warm-up (rewarmup_steps=0) the jumps at steps 50 and 100 were
    0.66 and 0.35 nats for this seed (docs/benchmarks.md, "SST's round boundaries")."""
    from secondorder._workloads import language_model as lm
    from secondorder._workloads.data import load_stdlib_corpus

    setup = lm.LMSetup()
    corpus = load_stdlib_corpus(setup.corpus_bytes)
    model = lm.new_model(corpus, setup)
    model = to_spectral(model, setup.rank, modules=lm.matrix_layers(model))
    optimizer = SST(model, lr=1e-2, update_proj_gap=setup.update_proj_gap)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lm.warmup_cosine(setup))
    generator = torch.Generator().manual_seed(setup.seed + 1)
    losses = []
    for _ in range(105):
        losses.append(lm.train_step(model, optimizer, corpus, setup, generator))
        scheduler.step()
    gap = setup.update_proj_gap
    for boundary in (gap, 2 * gap):
        before = sum(losses[boundary - 5 : boundary]) / 5
        after = sum(losses[boundary : boundary + 5]) / 5
        assert after - before < 0.1, f"the loss jumps by {after - before:.3f} at step {boundary}"
