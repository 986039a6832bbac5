"""WandaPruner: its mask is the top of |W_ij| · ‖X_j‖₂ in each row, computed here in float64."""

import pytest
import torch
from torch import nn

from secondorder.prune import WandaPruner, prune_lowest_per_row, wanda_scores

f64 = torch.float64


def layer_and_batches(seed: int = 0):
    """A float64 ``nn.Linear(12, 5)`` and calibration batches of 3-D inputs with uneven feature scales."""
    torch.manual_seed(seed)
    layer = nn.Linear(12, 5).double()
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, 12, dtype=f64)
    batches = [torch.randn(2, 7, 12, generator=gen, dtype=f64) * scales for _ in range(3)]
    return layer, batches


def oracle_scores(weight: torch.Tensor, batches: list[torch.Tensor]) -> torch.Tensor:
    tokens = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches])
    return weight.abs() * torch.linalg.vector_norm(tokens, dim=0)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_mask_is_the_top_k_of_the_score_in_every_row(sparsity):
    layer, batches = layer_and_batches()
    before = layer.weight.detach().clone()
    scores = oracle_scores(before, batches)
    keep = 12 - round(sparsity * 12)
    expected = torch.zeros_like(before, dtype=torch.bool)
    expected.scatter_(1, torch.topk(scores, keep, dim=1).indices, True)

    model = nn.Sequential(layer)
    pruner = WandaPruner(model, batches, progress=False)
    assert pruner.prune(sparsity) == pytest.approx(1 - keep / 12)
    assert torch.equal(layer.weight_mask != 0, expected)
    # the kept weights are not changed
    torch.testing.assert_close(layer.weight, before.masked_fill(~expected, 0), rtol=0, atol=0)


def test_n_m_keeps_the_top_n_of_every_group():
    layer, batches = layer_and_batches(1)
    before = layer.weight.detach().clone()
    groups = oracle_scores(before, batches).reshape(5, 3, 4)
    expected = torch.zeros_like(groups, dtype=torch.bool)
    expected.scatter_(2, torch.topk(groups, 2, dim=2).indices, True)
    WandaPruner(nn.Sequential(layer), batches, progress=False).prune(n_m=(2, 4))
    assert torch.equal(layer.weight_mask != 0, expected.reshape(5, 12))
    assert ((layer.weight_mask != 0).reshape(5, 3, 4).sum(-1) == 2).all()


def test_scores_and_per_row_selection():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.5, 1.0]])
    norms = torch.tensor([3.0, 1.0, 0.5])
    assert wanda_scores(weight, norms).tolist() == [[3.0, 2.0, 1.5], [12.0, 0.5, 0.5]]
    alive = torch.tensor([[True, True, True], [True, False, True]])
    # one zero per row: row 1 already has one, so it loses nothing
    removed = prune_lowest_per_row(wanda_scores(weight, norms), alive, 1 / 3)
    assert removed.tolist() == [[False, False, True], [False, False, False]]
    # 0.99 of 3 rounds to 3: one weight per row always stays
    assert (~prune_lowest_per_row(torch.rand(4, 3), torch.ones(4, 3, dtype=torch.bool), 0.99)).sum(
        1
    ).tolist() == [1, 1, 1, 1]
