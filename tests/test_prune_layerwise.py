"""SparseGPTPruner and WandaPruner on models: calibration order, which layers, errors."""

import pytest
import torch
from torch import nn

from secondorder import _checks
from secondorder._workloads import models
from secondorder.errors import InsufficientMemoryError, NonFiniteError
from secondorder.prune import SparseGPTPruner, WandaPruner, sparsegpt_prune, wanda_scores

f64 = torch.float64
PRUNERS = {"sparsegpt": SparseGPTPruner, "wanda": WandaPruner}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()


def batches(count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, 6, dtype=f64)
    return [torch.randn(5, 6, generator=gen, dtype=f64) * scales for _ in range(count)]


def prune_one_layer(method: str, weight: torch.Tensor, inputs: torch.Tensor, sparsity: float):
    """The float64 single-layer computation of each method on the given inputs."""
    if method == "sparsegpt":
        hessian = 2 * inputs.T @ inputs / inputs.shape[0]
        return sparsegpt_prune(weight, hessian, sparsity=sparsity)[0]
    scores = wanda_scores(weight, torch.linalg.vector_norm(inputs, dim=0))
    drop = torch.argsort(scores, dim=1)[:, : round(sparsity * weight.shape[1])]
    return weight.scatter(1, drop, 0.0)


@pytest.mark.parametrize("method", PRUNERS)
def test_each_layer_is_calibrated_on_the_outputs_of_the_pruned_layers_before_it(method):
    model, data = mlp(), batches()
    X = torch.cat(data)
    first = prune_one_layer(method, model[0].weight.detach(), X, 0.5)
    hidden = torch.relu(X @ first.T + model[0].bias.detach())  # through the pruned first layer
    second = prune_one_layer(method, model[2].weight.detach(), hidden, 0.5)
    # (calibrated on the dense first layer's outputs instead, the second layer would differ)
    dense_hidden = torch.relu(X @ model[0].weight.detach().T + model[0].bias.detach())
    assert not torch.allclose(
        second, prune_one_layer(method, model[2].weight.detach(), dense_hidden, 0.5)
    )

    # pairs, whose targets are ignored, work as plain inputs do
    data = [(x, torch.zeros(5)) for x in data] if method == "wanda" else data
    pruner = PRUNERS[method](model, data, progress=False)
    assert [len(targets) for _, targets in pruner.blocks] == [1, 1]  # one layer after the other
    pruner.prune(0.5)
    torch.testing.assert_close(model[0].weight, first, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[2].weight, second, rtol=1e-10, atol=1e-12)


def tiny_llama(layers: int = 2):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return models.tiny_llama(32, hidden_size=16, num_layers=layers, num_heads=2,
                             intermediate_size=24, max_length=16)  # fmt: skip


@pytest.mark.parametrize("method", PRUNERS)
def test_llama_decoder_blocks_in_order_embeddings_and_output_layer_dense(method):
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 32, (2, 8), generator=gen)} for _ in range(2)]
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = PRUNERS[method](model, data, progress=False)
    names = [t.qualname for t in pruner.targets]
    per_block = [f"self_attn.{p}_proj" for p in "qkvo"] + [
        f"mlp.{p}_proj" for p in ("gate", "up", "down")
    ]
    assert names == [f"model.layers.{i}.{n}.weight" for i in range(2) for n in per_block]
    assert [block for block, _ in pruner.blocks] == list(model.model.layers)

    # the model stops after the block being calibrated: the final norm never runs
    calls = {"last block": 0, "final norm": 0}
    model.model.layers[1].register_forward_hook(
        lambda *_: calls.__setitem__("last block", calls["last block"] + 1)
    )
    model.model.norm.register_forward_hook(
        lambda *_: calls.__setitem__("final norm", calls["final norm"] + 1)
    )
    pruner.prune(n_m=(2, 4))
    assert calls == {"last block": 2, "final norm": 0}  # block 1 runs once per batch, for itself

    for target in pruner.targets:
        groups = (target.mask()).reshape(target.parameter.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(model.state_dict()[key], dense[key])
    assert torch.isfinite(model(data[0]["input_ids"]).logits).all()


@pytest.mark.parametrize("method", PRUNERS)
def test_gradual_pruning_composes_and_every_layer_reaches_the_sparsity(method):
    model = mlp(1)
    pruner = PRUNERS[method](model, batches(seed=1), progress=False)
    pruner.prune(0.25)
    first = [layer.weight_mask.clone() for layer in (model[0], model[2])]
    pruner.prune(0.5, recompute_steps=2)
    for layer, before in zip((model[0], model[2]), first, strict=True):
        mask = layer.weight_mask != 0
        assert not (mask & (before == 0)).any()  # nothing comes back
        assert int((~mask).sum()) == layer.weight.numel() // 2
        assert (layer.weight[~mask] == 0).all()
    pruner.prune(0.999)  # every tensor keeps at least one weight (and every row, for Wanda)
    assert all(int((layer.weight_mask != 0).sum()) >= 1 for layer in (model[0], model[2]))


@pytest.mark.parametrize("method", PRUNERS)
def test_parameters_names_and_pairs_choose_the_layers(method):
    model = mlp()
    for params in ([model[2].weight], ["2.weight"], [(model[2], "weight")]):
        pruner = PRUNERS[method](model, batches(), params=params, progress=False)
        assert [t.qualname for t in pruner.targets] == ["2.weight"]
    with pytest.raises(ValueError, match=r"prunes nn\.Linear weights; 0\.bias"):
        PRUNERS[method](model, batches(), params=["0.bias"])
    embedding = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    assert [t.qualname for t in PRUNERS[method](embedding, []).targets] == ["1.weight"]


class Poison(nn.Module):
    def forward(self, x):
        return x * float("nan")


@pytest.mark.parametrize("method", PRUNERS)
def test_nan_inputs_raise_and_restore_the_model(method):
    model = mlp(2)
    model.insert(2, Poison())  # the second linear layer sees NaN, after the first is pruned
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"calibration inputs of 3\.weight"):
        PRUNERS[method](model, batches(), progress=False).prune(0.5)
    assert not hasattr(model[0], "weight_mask")
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


class CountingData:
    def __init__(self, items):
        self.items, self.drawn = items, 0

    def __iter__(self):
        for item in self.items:
            self.drawn += 1
            yield item


@pytest.mark.parametrize("method", PRUNERS)
def test_memory_guard_refuses_before_drawing_any_batch(method, monkeypatch):
    model, data = mlp(), CountingData(batches())
    monkeypatch.setattr(_checks, "free_bytes", lambda device: 100)
    with pytest.raises(InsufficientMemoryError, match="layers up to \\(8, 6\\)"):
        PRUNERS[method](model, data, progress=False).prune(0.5)
    assert data.drawn == 0 and not hasattr(model[0], "weight_mask")


@pytest.mark.parametrize("method", PRUNERS)
def test_memory_guard_counts_the_block_that_device_moves(method, monkeypatch):
    """With ``device=`` elsewhere than the model, the block moved there counts too: on a
    one-layer model the guard asks for exactly its weight and bias more."""
    from secondorder.prune import layerwise

    asked = []
    monkeypatch.setattr(layerwise, "ensure_fits", lambda nbytes, *a, **kw: asked.append(nbytes))
    for device in (None, "meta"):  # the guard runs first: nothing is moved to meta
        layer = nn.Sequential(nn.Linear(6, 8)).double()
        PRUNERS[method](layer, batches(), progress=False, device=device)._check_memory()
    assert asked[1] - asked[0] == (8 * 6 + 8) * 8


def test_argument_errors():
    model = mlp()
    with pytest.raises(
        TypeError, match="a dict of keyword inputs or an \\(inputs, targets\\) pair"
    ):
        WandaPruner(model, ["text"], progress=False).prune(0.5)
    with pytest.raises(TypeError, match="got 3 items"):
        WandaPruner(model, [(1, 2, 3)], progress=False).prune(0.5)
    with pytest.raises(ValueError, match="data yielded no batches"):
        SparseGPTPruner(model, [], progress=False).prune(0.5)
    with pytest.raises(ValueError, match="block_size=6 is not a multiple of 4"):
        SparseGPTPruner(nn.Linear(8, 4), [], block_size=6).prune(n_m=(2, 4))
    with pytest.raises(ValueError, match="relative_damp must be a finite number >= 0"):
        SparseGPTPruner(model, [], relative_damp=-0.1)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        WandaPruner(model, []).prune(1.0)
    assert not hasattr(model[0], "weight_mask")


def test_bfloat16_model_is_pruned_in_float32():
    model = nn.Sequential(nn.Linear(8, 4)).to(torch.bfloat16)
    data = [torch.randn(6, 8).to(torch.bfloat16)]
    for pruner in (SparseGPTPruner(model, data, progress=False), WandaPruner(model, data)):
        pruner.prune(n_m=(2, 4))
        assert model[0].weight_orig.dtype == torch.bfloat16
        assert ((model[0].weight_mask != 0).reshape(4, 2, 4).sum(-1) == 2).all()
