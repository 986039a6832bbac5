"""GPTQ on one layer, against a plain float64 transcription of its column-by-column procedure."""

import math

import pytest
import torch

from secondorder.errors import NotPositiveDefiniteError
from secondorder.quantize import QuantizedWeight, gptq_quantize

f64 = torch.float64


def correlated_inputs(features: int, tokens: int, seed: int, dead: int = 0) -> torch.Tensor:
    """``[tokens, features]`` inputs of scales 0.1 to 10, correlated, the first ``dead`` features zero."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, features, dtype=f64)[torch.randperm(features, generator=gen)]
    mix = torch.eye(features, dtype=f64) + 0.3 * torch.randn(
        features, features, generator=gen, dtype=f64
    )
    X = torch.randn(tokens, features, generator=gen, dtype=f64) @ mix * scales
    X[:, :dead] = 0
    return X


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W - W_hat) @ X.T).square().sum())


def oracle_grid(x: list[float], bits: int, symmetric: bool) -> tuple[float, float]:
    """``(scale, zero)`` of the min-max grid of one row's group, from the definition."""
    maxq = 2**bits - 1
    low, high = min(min(x), 0.0), max(max(x), 0.0)
    if symmetric:
        high = max(-low, high)
        low = -high
    if low == high == 0:
        low, high = -1.0, 1.0
    scale = (high - low) / maxq
    return scale, (maxq + 1) / 2 if symmetric else float(round(-low / scale))


def oracle_round(x: float, scale: float, zero: float, bits: int) -> int:
    return int(min(max(round(x / scale) + zero, 0), 2**bits - 1))


def column_by_column(W, H, *, bits, group_size, symmetric, act_order, block_size, relative_damp):
    """GPTQ as the paper states it, one column at a time, no Cholesky factor, no lazy batches.

    Columns in sweep order (by decreasing ``H_jj`` with act-order); at column ``j``
    the inverse of the damped Hessian of the columns not yet done, ``H_F⁻¹`` with
    ``F = {j, …}``, is formed explicitly and every row takes the OBS step
    ``w_F −= ((w_j − q_j) / [H_F⁻¹]_jj) [H_F⁻¹]_{j,F}``. A group's grid is found on
    its weights as they were when the block of ``block_size`` columns holding its
    first column began (the reference's rule). Returns the codes and grids.
    """
    rows, cols = W.shape
    dead = H.diagonal() == 0
    live_mean = H.diagonal()[~dead].mean()  # the damping's scale: live inputs only
    H = H.clone()
    H[dead, dead] = 1
    W = W.clone()
    W[:, dead] = 0
    order = list(range(cols))
    if act_order:
        order = sorted(range(cols), key=lambda j: -float(H[j, j]))  # Python's sort is stable
    W, H = W[:, order], H[order][:, order]
    H = H + relative_damp * live_mean * torch.eye(cols, dtype=f64)
    size = cols if group_size == -1 else group_size
    groups = math.ceil(cols / size)
    codes = torch.zeros(rows, cols, dtype=torch.long)
    scales, zeros = torch.zeros(rows, groups, dtype=f64), torch.zeros(rows, groups, dtype=f64)
    for j in range(cols):
        if j % block_size == 0:
            at_block_start = W.clone()
        g = j // size
        if j % size == 0:
            for r in range(rows):
                group = at_block_start[r, j : j + size].tolist()
                scales[r, g], zeros[r, g] = oracle_grid(group, bits, symmetric)
        inverse = torch.linalg.inv(H[j:, j:])
        for r in range(rows):
            code = oracle_round(float(W[r, j]), float(scales[r, g]), float(zeros[r, g]), bits)
            codes[r, j] = code
            q = float(scales[r, g]) * (code - float(zeros[r, g]))
            W[r, j:] -= (float(W[r, j]) - q) / inverse[0, 0] * inverse[0, :]
            W[r, j] = q
    unpermuted = torch.empty_like(codes)
    unpermuted[:, order] = codes
    return unpermuted, scales, zeros, order


CASES = [
    # bits, group_size, symmetric, act_order, block_size, shape
    (4, -1, False, False, 8, (5, 24)),
    (4, 8, False, False, 8, (5, 24)),
    (3, 4, False, False, 8, (5, 24)),  # groups start inside blocks
    (4, 6, True, False, 4, (4, 18)),  # groups straddle blocks
    (3, 8, False, True, 16, (6, 24)),
    (2, -1, True, True, 5, (3, 13)),
]


@pytest.mark.parametrize(("bits", "group_size", "symmetric", "act_order", "block", "shape"), CASES)
def test_lazy_sweep_equals_the_column_by_column_procedure(
    bits, group_size, symmetric, act_order, block, shape
):
    rows, cols = shape
    X = correlated_inputs(cols, 60, seed=cols + bits, dead=2)
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(bits), dtype=f64)
    H = hessian_of(X)
    settings = dict(bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order)
    codes, scales, zeros, order = column_by_column(
        W, H, **settings, block_size=block, relative_damp=0.01
    )
    record = gptq_quantize(W, H, **settings, block_size=block, relative_damp=0.01)
    assert torch.equal(record.codes.long(), codes)
    torch.testing.assert_close(record.scales, scales, rtol=1e-12, atol=0)
    assert torch.equal(record.zeros.to(f64), zeros)
    if act_order:
        assert record.perm.tolist() == order
    else:
        assert record.perm is None


def check_on_the_grid(record: QuantizedWeight, weights: torch.Tensor) -> None:
    """Codes in range, zero points codes, and ``weights`` exactly what the codes stand for."""
    assert record.codes.dtype == torch.uint8
    assert int(record.codes.max()) <= 2**record.bits - 1
    assert int(record.zeros.max()) <= 2**record.bits - 1
    assert (record.scales > 0).all()
    assert torch.equal(record.dequantize(), weights)
    groups = record.group_index()
    steps = weights / record.scales[:, groups] + record.zeros[:, groups].to(weights.dtype)
    atol = 1e-9 if weights.dtype == f64 else 1e-5
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=atol)


def round_to_nearest(W: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Each row's group rounded onto its own min-max grid, with no compensation (the oracle's grid)."""
    rows, cols = W.shape
    size = cols if group_size == -1 else group_size
    out = torch.empty_like(W)
    for r in range(rows):
        for start in range(0, cols, size):
            scale, zero = oracle_grid(W[r, start : start + size].tolist(), bits, False)
            for c in range(start, min(start + size, cols)):
                out[r, c] = scale * (oracle_round(float(W[r, c]), scale, zero, bits) - zero)
    return out


@pytest.mark.parametrize(("bits", "group_size"), [(4, -1), (3, 16), (2, 8)])
def test_on_the_grid_and_compensation_beats_round_to_nearest(bits, group_size):
    X = correlated_inputs(48, 200, seed=3)
    W = torch.randn(12, 48, generator=torch.Generator().manual_seed(3), dtype=f64)
    record = gptq_quantize(W, hessian_of(X), bits=bits, group_size=group_size)
    quantized = record.dequantize()
    check_on_the_grid(record, quantized)
    rtn = round_to_nearest(W, bits, group_size)
    assert output_error(W, quantized, X) < 0.8 * output_error(W, rtn, X)


def test_held_out_three_bits_groups_of_32_act_order_with_dead_inputs():
    # A shape, calibration and setting used nowhere else: 96 x 200, 7 dead inputs,
    # 3 bits, groups of 32 in act-order, float32 weights (the compute dtype of models).
    X = correlated_inputs(200, 400, seed=21, dead=7)
    X = X[:, torch.randperm(200, generator=torch.Generator().manual_seed(22))]
    dead = (X == 0).all(0)
    W = torch.randn(96, 200, generator=torch.Generator().manual_seed(21), dtype=f64)
    H = hessian_of(X)
    settings = dict(bits=3, group_size=32, symmetric=False, act_order=True)
    codes, *_ = column_by_column(W, H, **settings, block_size=128, relative_damp=0.01)
    record = gptq_quantize(W.float(), H, **settings)
    assert float((record.codes.long() == codes).float().mean()) >= 0.99
    quantized = record.dequantize()
    check_on_the_grid(record, quantized)
    assert (quantized[:, dead] == 0).all()
    assert int(record.codes.max()) <= 7
    assert record.group_index().bincount().tolist() == [32] * 6 + [8]
    rtn = round_to_nearest(W.float().double(), 3, 32)
    assert output_error(W, quantized.double(), X) < 0.8 * output_error(W, rtn, X)


def test_pruned_weights_stay_zero_and_the_record_round_trips_dtypes():
    X = correlated_inputs(16, 50, seed=4)
    W = torch.randn(6, 16, generator=torch.Generator().manual_seed(4))
    alive = torch.rand(6, 16, generator=torch.Generator().manual_seed(5)) > 0.4
    record = gptq_quantize(W, hessian_of(X), alive, bits=4, group_size=8)
    quantized = record.dequantize()
    assert quantized.dtype == torch.float32
    assert (quantized[~alive] == 0).all()
    check_on_the_grid(record, quantized)


def test_argument_errors():
    W, H = torch.randn(3, 8, dtype=f64), torch.eye(8, dtype=f64)
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(W, torch.eye(7, dtype=f64))
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(W, H, bits=1)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(W, H, bits=9)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(W, H, group_size=0)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(W, H, block_size=0)
    with pytest.raises(NotPositiveDefiniteError, match="raise relative_damp"):
        gptq_quantize(W, -H, relative_damp=0.0)


def test_block_size_matters_only_to_groups_that_start_inside_a_block():
    X = correlated_inputs(32, 80, seed=8)
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(8), dtype=f64)
    H = hessian_of(X)

    def codes(group_size, block_size):
        return gptq_quantize(W, H, bits=3, group_size=group_size, block_size=block_size).codes

    assert torch.equal(codes(16, 4), codes(16, 8))  # every group starts a block
    assert torch.equal(codes(16, 8), codes(16, 16))
    assert not torch.equal(codes(8, 8), codes(8, 16))  # the second group of each block differs
