import pytest
import torch

from secondorder.optim import GaLoreAdamW
from secondorder.optim.base import BaseOptimizer, _untag_ranks


class _KeepsWideState(BaseOptimizer):
    """A toy optimiser holding float64, float32 and int64 state for bf16 parameters."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    def _step(self, params):
        for p in params:
            state = self.state[p]
            state["moment"] = torch.full(p.shape, 1 / 3, dtype=torch.float64)
            state["nested"] = {"indices": torch.tensor([4097, 4099]), "scale": torch.tensor(0.1)}


def test_torch_casts_state_to_the_parameter_dtype_and_we_do_not():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    source = _KeepsWideState([p])
    p.grad = torch.zeros_like(p)
    source.step()
    saved = source.state_dict()

    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])
    torch.optim.Optimizer.load_state_dict(plain, saved)
    torch_loaded = next(iter(plain.state.values()))
    assert torch_loaded["nested"]["indices"].dtype == torch.bfloat16  # the cast the base undoes
    assert torch_loaded["nested"]["indices"].tolist() != [4097, 4099]

    target = _KeepsWideState([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])
    target.load_state_dict(saved)
    loaded = next(iter(target.state.values()))
    assert loaded["moment"].dtype == torch.float64
    assert torch.equal(loaded["moment"], saved["state"][0]["moment"])
    assert loaded["nested"]["indices"].tolist() == [4097, 4099]
    assert loaded["nested"]["scale"].dtype == torch.float32


def test_rank_tags_are_removed_for_this_rank_and_refuse_another_ranks_state():
    state = {0: {"step": 3, "exp_avg": torch.ones(2)}, "1.weight": {"step": 3}}
    tagged = {0: {"step@rank1": 3, "exp_avg@rank1": state[0]["exp_avg"]}, "1.weight": {"step": 3}}
    assert _untag_ranks(tagged, {0: 1}) == state
    assert _untag_ranks(state, {0: 1}) == state  # an unsharded save
    with pytest.raises(ValueError, match="saved by rank 1 of an FSDP2 run and is loaded by rank 0"):
        _untag_ranks(tagged, {0: 0})
    with pytest.raises(ValueError, match="loaded by an unsharded parameter"):
        _untag_ranks(tagged, {})


def test_keys_the_optimiser_does_not_know_are_carried_and_ignored():
    """As torch.optim: ``optimizer.state["some_flag"] = True`` survives a save and a load
    (PyTorch's own load-state-dict hook tests set such keys)."""
    weight = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2}], lr=0.1)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    optimizer.state["some_flag"] = True
    saved = optimizer.state_dict()
    assert saved["state"]["some_flag"] is True
    fresh = GaLoreAdamW([{"params": [weight], "rank": 2}], lr=0.1)
    fresh.load_state_dict(saved)
    assert fresh.state["some_flag"] is True
    fresh.step()
