"""MFACPruner and MagnitudePruner on small models, against float64 oracles."""

import copy
import io

import pytest
import torch
from _oracles import block_diagonal_inverse
from torch import nn
from torch.nn.utils import prune as torch_prune

from secondorder import _checks
from secondorder.errors import InsufficientMemoryError, NonFiniteError
from secondorder.prune import (
    MagnitudePruner,
    MFACPruner,
    count_to_prune,
    keep_masks_applied,
    load_pruned_state_dict,
)

f64 = torch.float64
ce = nn.functional.cross_entropy


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 8))


def small_data(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 5, generator=gen), torch.randint(0, 8, (6,), generator=gen))
        for _ in range(count)
    ]


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([model[0].weight.detach().flatten(), model[2].weight.detach().flatten()])


def flat_masks(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            getattr(model[i], "weight_mask", torch.ones_like(model[i].weight)).flatten() != 0
            for i in (0, 2)
        ]
    )


def batch_gradient(model: nn.Module, batch) -> torch.Tensor:
    """Gradient of the batch loss with respect to both weights, flat, by plain autograd."""
    params = [getattr(model[i], "weight_orig", model[i].weight) for i in (0, 2)]
    was_training = model.training
    model.eval()
    grads = torch.autograd.grad(ce(model(batch[0]), batch[1]), params)
    model.train(was_training)
    return torch.cat([g.flatten() for g in grads])


class CountingData:
    """A re-iterable list of batches that counts how many were drawn."""

    def __init__(self, batches):
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            yield batch


def test_exactly_num_grads_gradients_one_per_batch_in_order():
    model, batches = small_model(), small_data(3)
    data = CountingData(batches)
    calls = []

    def loss_fn(outputs, targets):
        calls.append(1)
        return ce(outputs, targets)

    pruner = MFACPruner(model, loss_fn, data, num_grads=5, progress=False)
    grads = pruner.collect_gradients()
    assert grads.shape == (5, 20 + 32)
    assert data.drawn == 5 and len(calls) == 5  # the data is restarted after 3 batches
    for row, index in enumerate([0, 1, 2, 0, 1]):
        torch.testing.assert_close(grads[row], batch_gradient(model, batches[index]))
    assert model[0].weight.grad is None  # the model's .grad is left alone

    data.drawn = 0
    pruner.prune(0.5, recompute_steps=3)
    assert data.drawn == 3 * 5


def test_prune_step_matches_the_explicit_block_diagonal_obs_on_the_alive_weights():
    model, batches = small_model(1), small_data(6, seed=1)
    torch_prune.random_unstructured(model[0], "weight", amount=0.3)  # 6 of 20 already gone
    before, alive = flat_weights(model).to(f64), flat_masks(model)
    damp, block = 1e-2, 5
    G = torch.stack([batch_gradient(model, b)[alive] for b in batches]).to(f64)
    F_inv = block_diagonal_inverse(G, damp, block)  # blocks of the compacted alive weights
    w = before[alive]
    saliency = w.square() / (2 * F_inv.diagonal())
    remove = torch.zeros_like(alive[alive])
    remove[torch.argsort(saliency)[: 26 - 6]] = True  # 50% of 52 weights: 26 zeros in all
    v = torch.zeros_like(w)
    v[remove] = -w[remove] / F_inv.diagonal()[remove]
    expected = torch.zeros_like(before)
    expected[alive] = (w + F_inv @ v).masked_fill(remove, 0)

    pruner = MFACPruner(
        model,
        ce,
        batches,
        num_grads=6,
        block_size=block,
        damp=damp,
        relative_damp=0.0,
        progress=False,
    )
    assert pruner.prune(0.5, recompute_steps=1) == 0.5

    expected_alive = alive.clone()
    expected_alive[alive] = ~remove
    assert torch.equal(flat_masks(model), expected_alive)
    torch.testing.assert_close(flat_weights(model).to(f64), expected, rtol=1e-4, atol=1e-5)
    assert (flat_weights(model)[~alive] == 0).all()  # pruned before, still exactly zero


def least_squares(seed: int, size: int = 16, dim: int = 8, noise: float = 30.0):
    """A linear model at the least-squares optimum whose empirical Fisher is ``noise² H``.

    Every input appears twice, with residuals ``+noise`` and ``−noise``: the
    gradient at ``w*`` vanishes and the per-sample gradients ``r_i x_i`` give
    ``(1/N) Σ r_i² x_i x_iᵀ = noise² XᵀX / N``, the Hessian times ``noise²``.
    """
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, dim, dtype=f64)[torch.randperm(dim, generator=gen)]
    mixing = torch.eye(dim, dtype=f64) + 0.5 * torch.randn(dim, dim, generator=gen, dtype=f64)
    X0 = torch.randn(size, dim, generator=gen, dtype=f64) @ mixing * scales  # correlated, uneven
    X = torch.cat([X0, X0])
    residuals = torch.cat([torch.full((size,), noise), torch.full((size,), -noise)]).to(f64)
    w_star = torch.randn(dim, generator=gen, dtype=f64) / scales
    y = X @ w_star - residuals
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star)
    data = [(X[i : i + 1], y[i : i + 1]) for i in range(2 * size)]

    def loss(w: torch.Tensor) -> float:
        return float(0.5 * (X @ w - y).square().mean())

    return model, data, X, residuals, loss


def mse(outputs, targets):
    return 0.5 * (outputs.squeeze(-1) - targets).square().mean()


@pytest.mark.parametrize("seed", range(4))
def test_on_least_squares_obs_loses_less_than_magnitude_and_reoptimises_the_kept_weights(seed):
    model, data, X, residuals, loss = least_squares(seed)
    w_star = model.weight.detach().flatten().clone()
    pruner = MFACPruner(
        model,
        mse,
        data,
        num_grads=len(data),
        block_size=None,
        damp=1e-9,
        relative_damp=0.0,
        progress=False,
    )
    # The empirical Fisher in closed form: per-sample gradients r_i x_i.
    torch.testing.assert_close(pruner.collect_gradients(), residuals[:, None] * X)

    for sparsity in (0.25, 0.5, 0.75):
        obs = copy.deepcopy(model)
        MFACPruner(
            obs,
            mse,
            data,
            num_grads=len(data),
            block_size=None,
            damp=1e-9,
            relative_damp=0.0,
            progress=False,
        ).prune(sparsity, recompute_steps=8)
        magnitude = copy.deepcopy(model)
        MagnitudePruner(magnitude).prune(sparsity)
        w_obs = obs.weight.detach().flatten()
        kept = w_obs != 0
        assert int((~kept).sum()) == round(sparsity * 8)
        obs_increase = loss(w_obs) - loss(w_star)
        magnitude_increase = loss(magnitude.weight.detach().flatten()) - loss(w_star)
        assert obs_increase < magnitude_increase
        # The kept weights are (close to) the least-squares solution on their support.
        best = torch.zeros_like(w_star)
        best[kept] = torch.linalg.lstsq(X[:, kept], X @ w_star - residuals).solution
        assert obs_increase <= (loss(best) - loss(w_star)) * 1.001 + 1e-9


def test_relative_damping_makes_pruning_independent_of_the_loss_scale():
    batches = small_data(4, seed=10)
    results = []
    for scale in (1.0, 1e-4):
        model = small_model(10)
        loss = lambda outputs, targets, scale=scale: scale * ce(outputs, targets)  # noqa: E731
        MFACPruner(model, loss, batches, num_grads=4, progress=False).prune(0.6, recompute_steps=2)
        results.append((flat_masks(model), flat_weights(model)))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_gradual_pruning_composes_and_pruned_weights_stay_zero():
    model, batches = small_model(2), small_data(8, seed=2)
    pruner = MFACPruner(model, ce, batches, num_grads=4, progress=False)
    pruner.prune(0.3, recompute_steps=2)
    first = flat_masks(model)
    pruner.prune(0.7, recompute_steps=2)
    second = flat_masks(model)
    assert not (second & ~first).any()  # nothing comes back
    assert pruner.sparsity == pytest.approx(round(0.7 * 52) / 52)
    assert (flat_weights(model)[~second] == 0).all()
    with pytest.raises(ValueError, match=r"cannot go down to 0\.5"):
        pruner.prune(0.5)


def test_per_layer_scope_brings_every_layer_to_the_sparsity():
    model, batches = small_model(3), small_data(4, seed=3)
    pruner = MFACPruner(model, ce, batches, num_grads=4, scope="layer", progress=False)
    pruner.prune(0.5, recompute_steps=3)
    assert int((model[0].weight == 0).sum()) == 10 and int((model[2].weight == 0).sum()) == 16
    other = small_model(3)
    MagnitudePruner(other, scope="layer").prune(0.25)
    assert int((other[0].weight == 0).sum()) == 5 and int((other[2].weight == 0).sum()) == 8


@pytest.mark.parametrize("make", ["magnitude", "mfac"])
@pytest.mark.parametrize(("nm", "steps"), [((2, 4), 1), ((1, 4), 3)])
def test_n_m_masks_are_exact(make, nm, steps):
    n, m = nm
    model, batches = small_model(4), small_data(4, seed=4)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 8))
    pruner = (
        MagnitudePruner(model)
        if make == "magnitude"
        else MFACPruner(
            model,
            ce,
            [(torch.randn(6, 8), t) for _, t in batches],
            num_grads=4,
            progress=False,
        )
    )
    pruner.prune(n_m=nm, recompute_steps=steps)
    for layer in (model[0], model[2]):
        groups = (layer.weight_mask != 0).reshape(layer.weight.shape[0], -1, m)
        assert (groups.sum(-1) == n).all()
        assert (layer.weight[layer.weight_mask == 0] == 0).all()
    with pytest.raises(ValueError, match="groups of 3"):
        pruner.prune(n_m=(1, 3))


def test_magnitude_matches_torch_global_unstructured():
    ours, theirs = small_model(5), small_model(5)
    MagnitudePruner(ours).prune(0.6)
    torch_prune.global_unstructured(
        [(theirs[0], "weight"), (theirs[2], "weight")],
        pruning_method=torch_prune.L1Unstructured,
        amount=round(0.6 * 52),
    )
    assert torch.equal(flat_masks(ours), flat_masks(theirs))


def test_masks_interoperate_with_torch_prune_and_checkpoints_round_trip():
    model, batches = small_model(6), small_data(4, seed=6)
    pruner = MFACPruner(model, ce, batches, num_grads=4, progress=False)
    pruner.prune(0.6, recompute_steps=2)
    inputs = batches[0][0]
    expected = model(inputs)

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = small_model(99)
    load_pruned_state_dict(fresh, torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(inputs), expected, rtol=0, atol=0)
    assert MagnitudePruner(fresh).sparsity == pruner.sparsity

    for layer in (model[0], model[2]):
        torch_prune.remove(layer, "weight")  # permanent
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(model(inputs), expected, rtol=0, atol=0)
    assert (flat_weights(model) == 0).float().mean() == pytest.approx(round(0.6 * 52) / 52)


def test_keep_masks_applied_zeroes_pruned_weights_after_every_step():
    def train(model, optimizer, batches):
        for inputs, targets in batches:
            optimizer.zero_grad()
            ce(model(inputs), targets).backward()
            optimizer.step()

    batches = small_data(3, seed=7)
    models = [small_model(7), small_model(7)]
    for model, keep in zip(models, [True, False], strict=True):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train(model, optimizer, batches)  # momentum builds up before pruning
        MagnitudePruner(model).prune(0.5)
        if keep:
            handle = keep_masks_applied(optimizer, model)
        train(model, optimizer, batches)
    kept, drifted = (m[0].weight_orig[m[0].weight_mask == 0] for m in models)
    assert (kept == 0).all() and (drifted != 0).any()  # momentum moves what nothing resets
    handle.remove()
    assert not optimizer._optimizer_step_post_hooks


def test_bad_input_raises_and_restores_the_model():
    model = small_model(8)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    nan_batch = (torch.full((6, 5), float("nan")), torch.zeros(6, dtype=torch.long))
    pruner = MFACPruner(model, ce, [*small_data(2, seed=8), nan_batch], num_grads=2, progress=False)
    with pytest.raises(NonFiniteError, match="gradient of pruning batch 0"):
        pruner.prune(0.5, recompute_steps=2)  # the first step prunes, the second fails
    assert set(model.state_dict()) == set(original)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key])


def test_memory_guard_refuses_before_drawing_any_batch(monkeypatch):
    model = small_model(9)
    data = CountingData(small_data(2))
    pruner = MFACPruner(model, ce, data, num_grads=2, progress=False)
    monkeypatch.setattr(_checks, "free_bytes", lambda device: 100)
    with pytest.raises(
        InsufficientMemoryError, match=r"2 gradients of 52 weights .* lower num_grads or block_size"
    ):
        pruner.prune(0.5)
    assert data.drawn == 0 and not hasattr(model[0], "weight_mask")


def test_argument_errors():
    model = small_model()
    data = small_data(2)
    with pytest.raises(ValueError, match="damp must be a finite number >= 0"):
        MFACPruner(model, ce, data, damp=float("nan"))
    with pytest.raises(ValueError, match="relative_damp must be a finite number >= 0"):
        MFACPruner(model, ce, data, relative_damp=-1.0)
    with pytest.raises(ValueError, match="both 0"):
        MFACPruner(model, ce, data, relative_damp=0.0)
    with pytest.raises(ValueError, match="every gradient is zero"):
        zero_loss = lambda outputs, targets: 0 * outputs.sum()  # noqa: E731
        MFACPruner(model, zero_loss, data, progress=False).prune(0.1)
    with pytest.raises(ValueError, match="scope"):
        MagnitudePruner(model, scope="row")
    with pytest.raises(ValueError, match=r"no parameter '0\.wieght'"):
        MagnitudePruner(model, params=["0.wieght"])
    pruner = MagnitudePruner(model)
    with pytest.raises(ValueError, match="exactly one of sparsity and n_m"):
        pruner.prune()
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        pruner.prune(1.0)
    with pytest.raises(ValueError, match="1 <= n < m"):
        pruner.prune(n_m=(4, 4))
    with pytest.raises(ValueError, match="data yielded no batches"):
        MFACPruner(model, ce, [], progress=False).prune(0.1)
    with pytest.raises(TypeError, match="scalar"):
        MFACPruner(model, nn.CrossEntropyLoss(reduction="none"), data, progress=False).prune(0.1)
    assert not hasattr(model[0], "weight_mask")


def test_which_weights_are_pruned():
    model = small_model()
    model[2].weight.requires_grad_(False)  # frozen weights are skipped, as torch.optim skips them
    assert [t.qualname for t in MagnitudePruner(model).targets] == ["0.weight"]
    pruner = MagnitudePruner(model, params=[(model[0], "bias"), "0.weight"])
    assert [t.qualname for t in pruner.targets] == ["0.bias", "0.weight"]
    with pytest.raises(ValueError, match="does not require grad"):
        MagnitudePruner(model, params=["2.weight"])


def test_a_weight_the_loss_does_not_use_gets_zero_gradients():
    class OneUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(5, 8), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    model = OneUnused()
    pruner = MFACPruner(model, ce, small_data(2), num_grads=2, progress=False)
    grads = pruner.collect_gradients()
    assert grads.shape == (2, 40 + 9) and (grads[:, 40:] == 0).all() and (grads[:, :40] != 0).any()
    assert pruner.prune(0.5, recompute_steps=2) == pytest.approx(25 / 49)  # 24.5 rounds up


def test_bfloat16_model():
    model = small_model().to(torch.bfloat16)
    data = [(x.to(torch.bfloat16), t) for x, t in small_data(2)]
    pruner = MFACPruner(model, ce, data, num_grads=2, progress=False)
    assert pruner.prune(0.5, recompute_steps=2) == 0.5
    assert model[0].weight_orig.dtype == torch.bfloat16
    assert torch.isfinite(model(data[0][0])).all()


@pytest.mark.parametrize("method", ["magnitude", "mfac"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.97, 0.99, 0.999])
def test_every_sparsity_below_one_leaves_a_weight_in_every_tensor(method, scope, sparsity):
    model = small_model(11)
    pruner = (
        MagnitudePruner(model, scope=scope)
        if method == "magnitude"
        else MFACPruner(model, ce, small_data(2, seed=11), num_grads=2, scope=scope, progress=False)
    )
    reached = pruner.prune(sparsity, recompute_steps=2)
    assert reached < 1
    for layer in (model[0], model[2]):
        assert int((layer.weight_mask != 0).sum()) >= 1
    # 52 weights in two tensors: at most 50 can go while each keeps one.
    assert reached == pytest.approx(50 / 52)


def test_count_to_prune_never_removes_a_whole_tensor_below_sparsity_one():
    assert count_to_prune(0.999, 52, 0) == 51
    assert count_to_prune(0.99, 10, 9) == 0
    assert count_to_prune(0.0, 1, 0) == 0


def test_params_accept_parameters_besides_names_and_pairs():
    model = small_model()
    data = small_data(2)
    specs = [
        [model[0].weight, model[2].weight],
        ["0.weight", "2.weight"],
        [(model[0], "weight"), (model[2], "weight")],
        [model[0].weight, "2.weight"],
    ]
    for params in specs:
        pruner = MFACPruner(model, ce, data, params=params, num_grads=2, progress=False)
        assert [t.qualname for t in pruner.targets] == ["0.weight", "2.weight"]
    MagnitudePruner(model, params=[model[0].weight]).prune(0.5)
    # once reparametrised by torch's pruning, the parameter is weight_orig: still accepted
    assert [t.qualname for t in MagnitudePruner(model, params=[model[0].weight_orig]).targets] == [
        "0.weight"
    ]
    with pytest.raises(ValueError, match="not a parameter of the model"):
        MagnitudePruner(model, params=[nn.Parameter(torch.ones(2, 2))])
    with pytest.raises(ValueError, match=r"not a parameter of the model.*pass name_orig"):
        MagnitudePruner(
            model, params=[model[0].weight]
        )  # now a plain tensor computed from the mask
