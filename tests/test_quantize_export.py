"""save_compressed: a quantized Llama in the compressed-tensors format, and back."""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from secondorder._workloads.models import tiny_llama  # noqa: E402
from secondorder.prune import SparseGPTPruner  # noqa: E402
from secondorder.quantize import GPTQQuantizer, save_compressed  # noqa: E402


def llama(seed: int = 0):
    torch.manual_seed(seed)
    return tiny_llama(32, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                      max_length=16).eval()  # fmt: skip


def tokens(count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32, (4, 16), generator=gen) for _ in range(count)]


def load(directory):
    """The checkpoint through transformers, dequantized on load."""
    config = transformers.CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():  # that the file's own quantization config is kept
        warnings.filterwarnings("ignore", "You passed `quantization_config`")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=config
        )
    return model.eval()


def logits(model, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(batch).logits


def unpacked_weights(directory) -> dict[str, torch.Tensor]:
    """Every quantized weight of a saved checkpoint, dequantized by compressed-tensors
    itself from the packed tensors written to disk."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    tensors = load_file(directory / "model.safetensors")
    config = QuantizationConfig.model_validate(
        json.loads((directory / "config.json").read_text())["quantization_config"]
    )
    weights = {}
    for scheme in config.config_groups.values():
        for module in scheme.targets:
            local = {k.removeprefix(module + "."): v for k, v in tensors.items()
                     if k.rpartition(".")[0] == module}  # fmt: skip
            weights[module + ".weight"] = PackedQuantizationCompressor.decompress(local, scheme)[
                "weight"
            ]
    return weights


def test_symmetric_grids_load_back_with_transformers_to_the_same_weights_and_outputs(tmp_path):
    model, data = llama(), tokens()
    records = GPTQQuantizer(model, data, bits=4, group_size=16, symmetric=True,
                            progress=False).quantize()  # fmt: skip
    keys = sorted(model.state_dict())
    save_compressed(model, records, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    saved = {name for group in config["config_groups"].values() for name in group["targets"]}
    assert saved == {name.removesuffix(".weight") for name in records}
    loaded = load(tmp_path)
    for name, record in records.items():
        assert torch.equal(loaded.get_parameter(name), record.dequantize()), name
    assert torch.equal(logits(loaded, data[0]), logits(model, data[0]))
    # the model saved is a copy: the caller's is as it was
    assert sorted(model.state_dict()) == keys
    assert not any(hasattr(m, "quantization_scheme") for m in model.modules())


def test_half_precision_scales_are_stored_in_the_weights_dtype(tmp_path):
    """The format keeps the scales in the weights' dtype: a bfloat16 model's weights come
    back within the rounding of its scales (2⁻⁸ relative), its codes unchanged."""
    model, data = llama().to(torch.bfloat16), tokens()
    records = GPTQQuantizer(model, data, bits=4, group_size=16, symmetric=True,
                            progress=False).quantize()  # fmt: skip
    save_compressed(model, records, tmp_path)
    loaded = load(tmp_path)
    for name, record in records.items():
        weight, expected = loaded.get_parameter(name), model.get_parameter(name).detach()
        assert weight.dtype == torch.bfloat16
        scale = record.scales.to(torch.bfloat16).float()[:, record.group_index()]
        codes = torch.round(weight.float() / scale) + 2**3  # our unsigned codes, recovered
        assert torch.equal(codes.to(torch.uint8), record.codes), name
        torch.testing.assert_close(weight, expected, rtol=2**-6, atol=0)


def test_asymmetric_act_order_per_row_grids_unpack_to_the_same_weights(tmp_path):
    model, data = llama(1), tokens(seed=1)
    records = GPTQQuantizer(model, data, bits=4, group_size=-1, act_order=True,
                            progress=False).quantize()  # fmt: skip
    assert any(int(r.zeros.min()) != 2**3 for r in records.values())  # asymmetric indeed
    with pytest.warns(UserWarning, match="cannot load them back"):
        save_compressed(model, records, tmp_path)
    unpacked = unpacked_weights(tmp_path)
    assert unpacked.keys() == records.keys()
    for name, record in records.items():
        assert torch.equal(unpacked[name], record.dequantize()), name


def test_pruned_and_quantized_weights_keep_their_zeros(tmp_path):
    model, data = llama(2), tokens(seed=2)
    pruner = SparseGPTPruner(model, data, progress=False)
    pruner.prune(0.5, bits=4, group_size=16, symmetric=True)
    with pytest.raises(ValueError, match="pruning masks"):
        save_compressed(model, pruner.quantized, tmp_path)
    assert not any(tmp_path.iterdir())
    pruner.make_permanent()
    save_compressed(model, pruner.quantized, tmp_path)
    loaded = load(tmp_path)
    for name in pruner.quantized:
        weight = loaded.get_parameter(name)
        assert torch.equal(weight, model.get_parameter(name).detach()), name
        assert (weight == 0).float().mean() >= 0.5


def test_what_the_format_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    model, data = llama(3), tokens(seed=3)
    grouped = GPTQQuantizer(model, data, bits=4, group_size=16, act_order=True,
                            progress=False).quantize()  # fmt: skip
    with pytest.raises(ValueError, match="act_order and groups of 16"):
        save_compressed(model, grouped, tmp_path)
    plain = GPTQQuantizer(llama(3), data, bits=4, group_size=16, progress=False).quantize()
    with pytest.raises(ValueError, match="not the one its record dequantizes to"):
        save_compressed(llama(4), plain, tmp_path)  # another model's weights
    record = next(iter(plain.values()))
    with pytest.raises(ValueError, match=r"not the weight of an nn\.Linear"):
        save_compressed(model, {"model.embed_tokens.weight": record}, tmp_path)
    with pytest.raises(ValueError, match="no quantized weights"):
        save_compressed(model, {}, tmp_path)
    assert not any(tmp_path.iterdir())
