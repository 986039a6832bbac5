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
