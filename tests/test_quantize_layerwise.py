"""GPTQQuantizer and SparseGPT's joint mode on models: calibration order, records, saving, errors."""

import pytest
import torch
from torch import nn

from secondorder._workloads.models import tiny_llama
from secondorder.errors import NonFiniteError
from secondorder.prune import SparseGPTPruner
from secondorder.quantize import GPTQQuantizer, QuantizedWeight, gptq_quantize

f64 = torch.float64


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).double()


def batches(count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, 16, dtype=f64)
    return [torch.randn(20, 16, generator=gen, dtype=f64) * scales for _ in range(count)]


def on_its_grid(record: QuantizedWeight, weight: torch.Tensor) -> bool:
    return (
        bool(torch.equal(record.dequantize(), weight)) and int(record.codes.max()) < 2**record.bits
    )


SETTINGS = {"bits": 3, "group_size": 8, "act_order": True}


def test_each_layer_is_quantized_on_the_outputs_of_the_quantized_layers_before_it():
    model, data = mlp(), batches()
    X = torch.cat(data)
    first = gptq_quantize(model[0].weight.detach(), 2 * X.T @ X / len(X), **SETTINGS)
    hidden = torch.relu(X @ first.dequantize().T + model[0].bias.detach())
    second = gptq_quantize(model[2].weight.detach(), 2 * hidden.T @ hidden / len(X), **SETTINGS)

    quantizer = GPTQQuantizer(model, data, **SETTINGS, progress=False)
    records = quantizer.quantize()
    assert list(records) == ["0.weight", "2.weight"]
    for layer, expected in ((model[0], first), (model[2], second)):
        torch.testing.assert_close(layer.weight, expected.dequantize(), rtol=1e-10, atol=1e-12)
    for name, record in records.items():
        assert on_its_grid(record, model.get_parameter(name).detach())
    # a plain model again: no torch.nn.utils.prune reparametrisation left behind
    assert sorted(model.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert isinstance(model[0].weight, nn.Parameter)


def test_llama_output_layer_and_embeddings_stay_and_state_dict_keys_do_not_change():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_llama(32, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                       max_length=16)  # fmt: skip
    keys = list(model.state_dict())
    head, embed = model.lm_head.weight.clone(), model.model.embed_tokens.weight.clone()
    data = [{"input_ids": torch.randint(0, 32, (2, 16))} for _ in range(2)]
    records = GPTQQuantizer(model, data, bits=4, group_size=16, progress=False).quantize()
    assert len(records) == 2 * 7
    assert all(on_its_grid(r, model.get_parameter(n).detach()) for n, r in records.items())
    assert torch.equal(model.lm_head.weight, head)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert list(model.state_dict()) == keys


def test_a_pruned_model_keeps_its_zeros_and_masks():
    model, data = mlp(1), batches()
    SparseGPTPruner(model, data, progress=False).prune(0.5)
    masks = [model[0].weight_mask.clone(), model[2].weight_mask.clone()]
    records = GPTQQuantizer(model, data, bits=4, group_size=-1, progress=False).quantize()
    for layer, mask, name in zip((model[0], model[2]), masks, records, strict=True):
        assert torch.equal(layer.weight_mask, mask)
        assert (layer.weight_orig[mask == 0] == 0).all()
        assert on_its_grid(records[name], layer.weight.detach())


class Poison(nn.Module):
    def forward(self, x):
        return x * float("nan")


def test_nan_inputs_raise_and_restore_the_model():
    model = mlp(2)
    model.insert(2, Poison())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    quantizer = GPTQQuantizer(model, batches(), progress=False)
    with pytest.raises(NonFiniteError, match=r"calibration inputs of 3\.weight"):
        quantizer.quantize()
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert quantizer.quantized == {}


def test_argument_errors():
    model = mlp()
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        GPTQQuantizer(model, batches(), bits=16)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        GPTQQuantizer(model, batches(), group_size=0)
    with pytest.raises(ValueError, match="relative_damp must be a finite number >= 0"):
        GPTQQuantizer(model, batches(), relative_damp=-1)
    with pytest.raises(ValueError, match=r"nn\.Linear weights"):
        GPTQQuantizer(nn.Sequential(nn.Conv1d(2, 2, 1)), batches(), params=["0.weight"])
    with pytest.raises(ValueError, match="data yielded no batches"):
        GPTQQuantizer(model, [], progress=False).quantize()
    with pytest.raises(ValueError, match="bits"):
        SparseGPTPruner(model, batches(), progress=False).prune(0.5, bits=1)
    with pytest.raises(ValueError, match="recompute_steps must be 1"):
        SparseGPTPruner(model, batches(), progress=False).prune(0.5, bits=4, recompute_steps=2)
    assert not hasattr(model[0], "weight_mask") and isinstance(model[0].weight, nn.Parameter)


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n_m": (2, 4)}])
def test_joint_mode_puts_the_kept_weights_on_their_grid(pattern):
    model, data = mlp(3), batches()
    pruner = SparseGPTPruner(model, data, block_size=8, progress=False)
    assert pruner.prune(**pattern, bits=4, group_size=8) == pytest.approx(0.5)
    assert list(pruner.quantized) == ["0.weight", "2.weight"]
    for layer, record in zip((model[0], model[2]), pruner.quantized.values(), strict=True):
        assert on_its_grid(record, layer.weight.detach())
        assert (layer.weight[layer.weight_mask == 0] == 0).all()
    pruner.prune(0.6)  # a later call without bits quantizes nothing new
    assert list(pruner.quantized) == ["0.weight", "2.weight"]


def test_device_and_offloading_reach_the_layerwise_base():
    """Blocks quantized one at a time on ``device`` give the same result as in place."""
    reference, model = mlp(), mlp()
    GPTQQuantizer(reference, batches(), progress=False).quantize()
    GPTQQuantizer(model, batches(), device="cpu", offload_activations=True,
                  progress=False).quantize()  # fmt: skip
    assert model[0].weight.device.type == "cpu"
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="device"):
        GPTQQuantizer(
            mlp(), batches(), device="cuda:7" if not torch.cuda.is_available() else "meta"
        )
