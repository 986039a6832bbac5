"""SparseGPT's damping ignores the scale of the calibration data, dead inputs included."""

import pytest
import torch
from torch import nn

from secondorder.prune import SparseGPTPruner, sparsegpt_prune
from secondorder.prune.sparsegpt import upper_cholesky_of_inverse

f64 = torch.float64


def inputs_with_dead_features(
    tokens: int = 512, features: int = 128, dead: int = 13, seed: int = 0
) -> torch.Tensor:
    """Correlated ``[tokens, features]`` inputs of uneven scales, ``dead`` columns always zero."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(features, dtype=f64) + 0.3 * torch.randn(
        features, features, generator=gen, dtype=f64
    )
    scales = torch.logspace(-1, 1, features, dtype=f64)
    X = torch.randn(tokens, features, generator=gen, dtype=f64) @ mix * scales
    X[:, torch.randperm(features, generator=gen)[:dead]] = 0
    return X


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n_m": (2, 4)}])
def test_scaling_the_inputs_changes_neither_masks_nor_weights(pattern):
    # the case: 13 of 128 inputs never fire, the data scaled by 1/30
    X = inputs_with_dead_features()
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1), dtype=f64)
    results = []
    for scale in (1.0, 1 / 30):
        layer = nn.Linear(128, 64, bias=False).double()
        layer.weight.data.copy_(weight)
        model = nn.Sequential(layer)
        SparseGPTPruner(model, [scale * X[:256], scale * X[256:]], progress=False).prune(**pattern)
        results.append((layer.weight_mask.clone(), layer.weight.detach().clone()))
    (mask, pruned), (scaled_mask, scaled_pruned) = results
    assert torch.equal(mask, scaled_mask)
    torch.testing.assert_close(pruned, scaled_pruned, rtol=1e-9, atol=1e-12)


def test_damping_is_relative_to_the_live_inputs_and_as_the_reference_without_dead_ones():
    X = inputs_with_dead_features(tokens=64, features=12, dead=3)
    H = 2 * X.T @ X / X.shape[0]
    live = H.diagonal() != 0
    damped = H.clone()
    damped.diagonal()[~live] = 1
    damped.diagonal()[:] += 0.01 * H.diagonal()[live].mean()
    U = upper_cholesky_of_inverse(H, 0.01)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(damped), rtol=1e-10, atol=1e-12)

    # no dead input: the reference's 1% of the mean diagonal, unchanged
    full = inputs_with_dead_features(tokens=64, features=12, dead=0)
    H = 2 * full.T @ full / full.shape[0]
    expected = torch.linalg.inv(H + 0.01 * H.diagonal().mean() * torch.eye(12, dtype=f64))
    U = upper_cholesky_of_inverse(H, 0.01)
    torch.testing.assert_close(U.T @ U, expected, rtol=1e-10, atol=1e-12)


def test_hessian_scale_does_not_matter_on_one_layer():
    X = inputs_with_dead_features(tokens=256, features=32, dead=5, seed=3)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(4), dtype=f64)
    H = 2 * X.T @ X / X.shape[0]
    pruned, mask = sparsegpt_prune(W, H, sparsity=0.6, block_size=16)
    scaled, scaled_mask = sparsegpt_prune(W, 1e-4 * H, sparsity=0.6, block_size=16)
    assert torch.equal(mask, scaled_mask)
    torch.testing.assert_close(pruned, scaled, rtol=1e-9, atol=1e-12)
