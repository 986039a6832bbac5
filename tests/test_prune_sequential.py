"""Sequential calibration: the same masks and weights as re-running the model for every block, at linear cost."""

import pytest
import torch
from torch import nn

from secondorder._workloads.models import tiny_llama
from secondorder.prune import SparseGPTPruner, WandaPruner
from secondorder.prune.calibration import BlockInputs
from secondorder.prune.targets import refresh_pruned_weights

PRUNERS = {"sparsegpt": SparseGPTPruner, "wanda": WandaPruner}
PATTERNS = [{"sparsity": 0.5}, {"n_m": (2, 4)}]


def llama(layers: int, hidden: int = 16, heads: int = 2, intermediate: int = 24, seed: int = 0):
    pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = tiny_llama(32, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       intermediate_size=intermediate, max_length=16)  # fmt: skip
    return model.double()


def token_batches(count: int = 3, vocab: int = 32, seed: int = 0, padded: bool = False):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        batch = {"input_ids": torch.randint(0, vocab, (2, 8), generator=gen)}
        if padded:  # left padding: the attention mask differs from batch to batch
            mask = torch.ones(2, 8, dtype=torch.long)
            mask[0, : int(torch.randint(1, 4, (), generator=gen))] = 0
            batch["attention_mask"] = mask
        batches.append(batch)
    return batches


def pruned_twice(build, method, pattern, data, **options):
    """Masks and weights of the targets, pruned sequentially and by re-running the model."""
    results = []
    for sequential in (True, False):
        model = build()
        pruner = PRUNERS[method](model, data, sequential=sequential, progress=False, **options)
        pruner.prune(**pattern)
        results.append({t.qualname: (t.mask(), t.weight()) for t in pruner.targets})
    return results


def assert_same(first, second):
    assert first.keys() == second.keys()
    for name, (mask, weight) in first.items():
        assert torch.equal(mask, second[name][0]), name
        torch.testing.assert_close(weight, second[name][1], rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", PRUNERS)
def test_llama_sequential_equals_rerun(method, pattern):
    assert_same(*pruned_twice(lambda: llama(3), method, pattern, token_batches(padded=True)))


@pytest.mark.parametrize("method", PRUNERS)
def test_held_out_shape_six_layers_other_width_and_heads(method):
    # a shape used nowhere else: 6 layers, width 24, 3 heads, intermediate 40
    def build():
        return llama(6, hidden=24, heads=3, intermediate=40, seed=5)

    assert_same(*pruned_twice(build, method, {"sparsity": 0.6}, token_batches(2, seed=7)))


def test_held_out_architecture_opt():
    transformers = pytest.importorskip("transformers")

    def build():
        torch.manual_seed(4)
        config = transformers.OPTConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=3, ffn_dim=24,
            num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16,
        )  # fmt: skip
        return transformers.OPTForCausalLM(config).double()

    first, second = pruned_twice(build, "sparsegpt", {"n_m": (2, 4)}, token_batches(seed=3))
    assert len(first) == 3 * 6  # q, k, v, out_proj, fc1, fc2 of each decoder layer
    assert_same(first, second)


@pytest.mark.parametrize("method", PRUNERS)
def test_device_and_offloaded_activations_change_nothing(method):
    data = token_batches()
    reference, _ = pruned_twice(lambda: llama(2), method, {"sparsity": 0.5}, data)
    for options in (
        {"device": "cpu"},
        {"device": torch.device("cpu"), "offload_activations": True},
    ):
        model = llama(2)
        pruner = PRUNERS[method](model, data, progress=False, **options)
        pruner.prune(0.5)
        assert_same(reference, {t.qualname: (t.mask(), t.weight()) for t in pruner.targets})


def count_calls(model, modules):
    calls = {name: 0 for name in modules}
    for name, module in modules.items():
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


@pytest.mark.parametrize("layers", [2, 5])
def test_each_block_computes_twice_per_batch_whatever_the_depth(layers):
    model, data = llama(layers), token_batches(3)
    mlps = {f"block {i}": block.mlp for i, block in enumerate(model.model.layers)}
    calls = count_calls(model, {**mlps, "norm": model.model.norm})
    SparseGPTPruner(model, data, progress=False).prune(0.5)
    # calibrate, give the next block its inputs (all but the last); recording the blocks'
    # arguments computes them on the first batch only (all but the last)
    assert calls == {**{f"block {i}": 2 * 3 + 1 for i in range(layers - 1)},
                     f"block {layers - 1}": 3, "norm": 0}  # fmt: skip


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)

    def forward(self, x, *, scale):
        return x + scale * torch.tanh(self.inner(x))


class Stack(nn.Module):
    """Blocks in a ModuleList, chained or with a layer norm between them."""

    def __init__(self, chained: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(Residual(8) for _ in range(3))
        self.between = nn.Identity() if chained else nn.LayerNorm(8)
        self.chained = chained

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h if self.chained else self.between(h), scale=0.5)
        return h


@pytest.mark.parametrize("chained", [True, False])
def test_other_models_chained_or_not_give_the_rerun_result(chained):
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(5, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    model = Stack(chained).double()
    blocks = [model.inp, *model.blocks]
    captured = BlockInputs.capture(
        model, data, blocks, input_device=torch.device("cpu"), storage=torch.device("cpu"),
        device=torch.device("cpu"),
    )  # fmt: skip
    assert (captured is not None) == chained
    assert_same(
        *pruned_twice(lambda: Stack(chained).double(), "sparsegpt", {"sparsity": 0.5}, data)
    )


def test_mlp_with_activations_between_layers_still_prunes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    data = [torch.randn(5, 6, dtype=torch.float64) for _ in range(2)]
    assert BlockInputs.capture(
        model, data, [model[0], model[2]], input_device=torch.device("cpu"),
        storage=torch.device("cpu"), device=torch.device("cpu"),
    ) is None  # fmt: skip
    assert_same(*pruned_twice(lambda: model_copy(model), "wanda", {"sparsity": 0.5}, data))


def model_copy(model):
    import copy

    return copy.deepcopy(model)


def test_refreshed_weight_follows_its_moved_parameter_and_bad_devices_are_refused():
    layer = nn.Linear(4, 4)
    nn.utils.prune.random_unstructured(layer, "weight", amount=0.5)
    # what module.to(other device) does: new parameter and mask tensors, the product left behind
    layer._parameters["weight_orig"] = nn.Parameter(layer.weight_orig.detach() + 1)
    layer._buffers["weight_mask"] = layer.weight_mask.clone()
    refresh_pruned_weights(nn.Sequential(layer))
    torch.testing.assert_close(layer.weight, layer.weight_orig * layer.weight_mask)
    with pytest.raises(ValueError, match=r"device must be a torch\.device or its name, got 'gpu0'"):
        WandaPruner(nn.Sequential(nn.Linear(4, 4)), [], device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda', but CUDA is not available"):
            SparseGPTPruner(nn.Sequential(nn.Linear(4, 4)), [], device="cuda")
