import pytest
import torch

from secondorder.optim._state import load_state_dict_exactly


class _KeepsWideState(torch.optim.Optimizer):
    """A toy optimiser holding float64, float32 and int64 state for bf16 parameters."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["moment"] = torch.full(p.shape, 1 / 3, dtype=torch.float64)
                state["nested"] = {
                    "indices": torch.tensor([4097, 4099]),
                    "scale": torch.tensor(0.1),
                }

    def load_state_dict(self, state_dict):
        load_state_dict_exactly(self, state_dict)


def test_torch_casts_state_to_the_parameter_dtype_and_we_do_not():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    source = _KeepsWideState([p])
    source.step()
    saved = source.state_dict()

    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])
    torch.optim.Optimizer.load_state_dict(plain, saved)
    torch_loaded = next(iter(plain.state.values()))
    assert torch_loaded["nested"]["indices"].dtype == torch.bfloat16  # the cast this module undoes
    assert torch_loaded["nested"]["indices"].tolist() != [4097, 4099]

    target = _KeepsWideState([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])
    target.load_state_dict(saved)
    loaded = next(iter(target.state.values()))
    assert loaded["moment"].dtype == torch.float64
    assert torch.equal(loaded["moment"], saved["state"][0]["moment"])
    assert loaded["nested"]["indices"].tolist() == [4097, 4099]
    assert loaded["nested"]["scale"].dtype == torch.float32


def test_rank_tags_round_trip_and_refuse_another_ranks_state():
    from secondorder.optim._state import tag_rank_local, untag_rank_local

    state = {0: {"step": 3, "exp_avg": torch.ones(2)}, "1.weight": {"step": 3}}
    tagged = tag_rank_local(state, {0: 1})
    assert set(tagged[0]) == {"step@rank1", "exp_avg@rank1"} and tagged["1.weight"] == {"step": 3}
    assert untag_rank_local(tagged, {0: 1}) == state
    assert untag_rank_local(state, {0: 1}) == state  # saved before tags existed
    with pytest.raises(ValueError, match="saved by rank 1 of an FSDP2 run and is loaded by rank 0"):
        untag_rank_local(tagged, {0: 0})
    with pytest.raises(ValueError, match="loaded by an unsharded parameter"):
        untag_rank_local(tagged, {})
