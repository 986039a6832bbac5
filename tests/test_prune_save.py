"""Users keep what they prune: masks made permanent, a pruned Hugging Face model saved and loaded back."""

import pytest
import torch
from torch import nn

from secondorder.prune import (
    MagnitudePruner,
    SparseGPTPruner,
    WandaPruner,
    check_masks_removed,
    remove_masks,
)


def held_out_loss(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(**batch, labels=batch["input_ids"]).loss for batch in batches]
    return float(torch.stack(losses).mean())


def token_batches(count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (2, 12), generator=gen)} for _ in range(count)]


@pytest.mark.parametrize("pruner_class", [SparseGPTPruner, WandaPruner])
def test_pruned_llama_saves_and_loads_back_to_the_same_held_out_loss(pruner_class, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    pruner = pruner_class(model, token_batches(4, seed=1), progress=False)
    pruner.prune(n_m=(2, 4))
    held_out = token_batches(3, seed=2)
    loss = held_out_loss(model, held_out)

    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*remove_masks"
    ):
        check_masks_removed(model)
    made = pruner.make_permanent()
    assert len(made) == 14 and made[0] == "model.layers.0.self_attn.q_proj.weight"
    check_masks_removed(model)  # nothing left
    assert held_out_loss(model, held_out) == loss

    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert held_out_loss(loaded, held_out) == loss
    weight = loaded.model.layers[1].mlp.down_proj.weight
    assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all()


def test_remove_masks_turns_every_masked_weight_back_into_a_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    MagnitudePruner(model).prune(0.5)
    assert {"0.weight_orig", "0.weight_mask"} <= model.state_dict().keys()
    outputs = model(torch.ones(2, 8))
    assert remove_masks(model) == ["0.weight", "2.weight"]
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert isinstance(model[0].weight, nn.Parameter)
    assert int((model[0].weight == 0).sum()) + int((model[2].weight == 0).sum()) == 48
    torch.testing.assert_close(model(torch.ones(2, 8)), outputs, rtol=0, atol=0)
    assert remove_masks(model) == []
    check_masks_removed(model)
