"""GaLoreAdamW, NaturalGaLore and DCTAdamW: the projected-Adam step, its projectors, its state."""

import io

import pytest
import torch
from _oracles import explicit_solve, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.errors import NonFiniteError
from secondorder.optim import DCTAdamW, GaLoreAdamW, NaturalGaLore
from secondorder.optim.projected_adam import LowRankConfig, ProjectedAdam
from secondorder.optim.projectors import (
    DCTProjector,
    Projector,
    SVDProjector,
    dct_basis,
    dct_rows,
)

f64 = torch.float64


class IdentityProjector(Projector):
    """The whole space as the 'low-rank' basis: the projected step must be AdamW's."""

    def refresh(self, oriented, rank):
        assert rank == oriented.shape[-1]
        eye = torch.eye(rank, dtype=oriented.dtype)
        return eye, oriented @ eye

    def basis(self, choice, size, dtype):
        return choice.to(dtype)


class CountingSVD(SVDProjector):
    def __init__(self):
        self.refreshes = 0

    def refresh(self, oriented, rank):
        self.refreshes += 1
        return super().refresh(oriented, rank)


def tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 6, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 10),
        torch.nn.Tanh(),
        torch.nn.Linear(10, 24),
    ).to(dtype)


def batches(steps, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(16, 2, 4, 4, generator=gen, dtype=dtype),
            torch.randn(16, 24, generator=gen, dtype=dtype),
        )
        for _ in range(steps)
    ]


def train(model, optimizer, data, backward_only=False):
    for inputs, targets in data:
        optimizer.zero_grad()
        loss = (model(inputs) - targets).square().mean()
        loss.backward()
        if not backward_only:
            optimizer.step()
    return loss


def matrices(model):
    return [p for p in model.parameters() if p.dim() >= 2]


def vectors(model):
    return [p for p in model.parameters() if p.dim() < 2]


def full_rank_groups(model, proj_type="std"):
    """One group per matrix with rank = the full compressed dimension."""
    groups = [{"params": vectors(model)}]
    for p in matrices(model):
        rows, cols = p.reshape(p.shape[0], -1).shape
        side = LowRankConfig(rank=1, proj_type=proj_type).side(rows, cols)
        groups.append({"params": [p], "rank": cols if side == "right" else rows})
    return groups


# ------------------------------------------------------------------ AdamW equivalence


@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLore, DCTAdamW])
def test_groups_without_rank_are_torch_adamw_exactly(cls):
    reference, ours = tiny_model(), tiny_model()
    kwargs = {"lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.1}
    torch_adamw = torch.optim.AdamW(reference.parameters(), foreach=False, **kwargs)
    optimizer = cls(ours.parameters(), **kwargs)
    data = batches(6)
    train(reference, torch_adamw, data)
    train(ours, optimizer, data)
    for a, b in zip(reference.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLore, DCTAdamW])
def test_complex_parameters_without_rank_are_torch_adamw_exactly(cls):
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(shape, generator=gen, dtype=torch.complex64) for shape in [(5,), (3, 4)]]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    kwargs = {"lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.1}
    optimizers = [cls(ours, **kwargs), torch.optim.AdamW(theirs, foreach=False, **kwargs)]
    for _ in range(4):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            b.grad = a.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"complex weight of shape \(3, 4\) is in a group"):
        cls([{"params": [ours[1]], "rank": 2}])


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_full_rank_identity_projection_equals_adamw(proj_type):
    """rank = the full compressed dimension and P = I: the projected step is AdamW's."""
    reference, ours = tiny_model(f64), tiny_model(f64)
    kwargs = {"lr": 1e-2, "eps": 1e-8, "weight_decay": 0.05}
    torch_adamw = torch.optim.AdamW(reference.parameters(), foreach=False, **kwargs)
    optimizer = ProjectedAdam(
        full_rank_groups(ours, proj_type),
        IdentityProjector(),
        update_proj_gap=2,
        proj_type=proj_type,
        **kwargs,
    )
    data = batches(5, f64)
    train(reference, torch_adamw, data)
    train(ours, optimizer, data)
    for a, b in zip(reference.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all("basis" in optimizer.state[p] for p in matrices(ours))


# ------------------------------------------------------------------ sides and schedule


@pytest.mark.parametrize(
    ("shape", "proj_type", "side"),
    [
        ((12, 5), "std", "right"),
        ((5, 12), "std", "left"),
        ((7, 7), "std", "right"),
        ((12, 5), "reverse_std", "left"),
        ((5, 12), "reverse_std", "right"),
        ((5, 12), "right", "right"),
        ((12, 5), "left", "left"),
        ((6, 2, 3, 3), "std", "left"),  # a conv weight acts as 6 × 18
    ],
)
def test_side_choice_by_shape(shape, proj_type, side):
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    assert LowRankConfig(rank=2, proj_type=proj_type).side(rows, cols) == side
    p = torch.nn.Parameter(torch.randn(shape))
    optimizer = GaLoreAdamW([{"params": [p], "rank": 2, "proj_type": proj_type}])
    p.grad = torch.randn(shape)
    optimizer.step()
    state = optimizer.state[p]
    kept, compressed = (rows, cols) if side == "right" else (cols, rows)
    assert state["exp_avg"].shape == (kept, 2)
    assert state["basis"].shape == (compressed, 2)
    basis = state["basis"]
    torch.testing.assert_close(basis.T @ basis, torch.eye(2), atol=1e-5, rtol=0)


def test_basis_is_refreshed_on_the_first_step_then_every_gap():
    p = torch.nn.Parameter(torch.randn(8, 6))
    optimizer = GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 3}])
    optimizer.projector = spy = CountingSVD()
    seen = []
    for step in range(1, 11):
        p.grad = torch.randn(8, 6)
        before = spy.refreshes
        optimizer.step()
        if spy.refreshes > before:
            seen.append(step)
    assert seen == [1, 4, 7, 10]


def test_svd_basis_spans_the_top_singular_vectors():
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(30, 3, generator=gen, dtype=f64) @ torch.randn(3, 12, generator=gen, dtype=f64)
    basis, low = SVDProjector().refresh(G, 3)
    torch.testing.assert_close(low @ basis.T, G, rtol=1e-10, atol=1e-10)  # rank 3 captured exactly


@pytest.mark.parametrize("correct_bias", [True, False])
def test_projected_steps_by_hand_with_and_without_bias_correction(correct_bias):
    """Three steps within one basis: Adam on X P, the update brought back by Pᵀ, times scale."""
    lr, scale, (beta1, beta2), eps = 0.05, 0.5, (0.8, 0.9), 1e-6
    gen = torch.Generator().manual_seed(11)
    start = torch.randn(8, 6, generator=gen, dtype=f64)  # rows ≥ cols: projected on the right
    grads = [torch.randn(8, 6, generator=gen, dtype=f64) for _ in range(3)]
    p = torch.nn.Parameter(start.clone())
    group = {"params": [p], "rank": 2, "update_proj_gap": 10, "scale": scale}
    optimizer = GaLoreAdamW(
        [group], lr=lr, betas=(beta1, beta2), eps=eps, correct_bias=correct_bias
    )
    expected, m, v = start.clone(), 0.0, 0.0
    for t, grad in enumerate(grads, start=1):
        p.grad = grad
        optimizer.step()
        P = optimizer.state[p]["basis"]
        low = grad @ P
        m, v = beta1 * m + (1 - beta1) * low, beta2 * v + (1 - beta2) * low.square()
        if correct_bias:
            direction = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        else:
            direction = m / (v.sqrt() + eps)
        expected -= lr * scale * direction @ P.T
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW])
def test_scale_multiplies_the_learning_rate_of_projected_weights(cls):
    """Without weight decay, scale = 0.25 at lr is scale = 1 at lr / 4, through refreshes."""
    models, data = [tiny_model(f64), tiny_model(f64)], batches(6, f64)
    for model, (lr, scale) in zip(models, [(0.04, 0.25), (0.01, 1.0)], strict=True):
        groups = [{"params": matrices(model), "rank": 3, "update_proj_gap": 2, "scale": scale}]
        train(model, cls(groups, lr=lr), data)
    for a, b in zip(matrices(models[0]), matrices(models[1]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.equal(matrices(models[0])[0], matrices(tiny_model(f64))[0])


# ------------------------------------------------------------------ the DCT basis


@pytest.mark.parametrize("size", [1, 2, 7, 64, 100, 129])
def test_dct_basis_is_orthonormal_and_the_fft_forms_the_same_product(size):
    Q = dct_basis(size, f64)
    torch.testing.assert_close(Q.T @ Q, torch.eye(size, dtype=f64), rtol=0, atol=1e-12)
    torch.testing.assert_close(Q @ Q.T, torch.eye(size, dtype=f64), rtol=0, atol=1e-12)
    X = torch.randn(5, size, dtype=f64)
    torch.testing.assert_close(dct_rows(X), X @ Q, rtol=0, atol=1e-12)


def test_dct_basis_is_scipys_orthonormal_dct_ii():
    scipy_fft = pytest.importorskip("scipy.fft")
    X = torch.randn(4, 37, dtype=f64)
    expected = torch.from_numpy(scipy_fft.dct(X.numpy(), type=2, norm="ortho", axis=-1))
    torch.testing.assert_close(X @ dct_basis(37, f64), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("method", ["matmul", "fft"])
def test_chosen_dct_columns_are_the_top_r_by_norm(norm, method):
    projector = DCTProjector(norm=norm, method=method)
    X = torch.randn(9, 40, dtype=f64)
    indices, low = projector.refresh(X, 6)
    S = X @ dct_basis(40, f64)
    scores = torch.linalg.vector_norm(S, ord=norm, dim=0)
    assert indices.dtype == torch.int64
    assert set(indices.tolist()) == set(scores.argsort(descending=True)[:6].tolist())
    assert torch.equal(scores[indices], scores.sort(descending=True).values[:6])  # best first
    torch.testing.assert_close(low, X @ projector.basis(indices, 40, f64), rtol=0, atol=1e-12)


def test_auto_method_uses_the_fft_where_it_measured_faster():
    projector = DCTProjector()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert projector.uses_fft(1024, cpu) and not projector.uses_fft(512, cpu)
    assert not projector.uses_fft(4096, cuda)  # GPUs: the matmul (not measured here)
    assert DCTProjector(method="fft").uses_fft(8, cpu) and not DCTProjector(
        method="matmul"
    ).uses_fft(4096, cpu)


def test_dct_basis_is_built_once_per_size_and_shared():
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)
    )
    optimizer = DCTAdamW([{"params": matrices(model), "rank": 4}])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert sorted(key[0] for key in optimizer.projector._bases) == [8, 16]  # one per size


# ------------------------------------------------------------------ moments on a refresh


def two_steps(optimizer, p, grads):
    """Step with grads[0], record the state, step with grads[1]."""
    p.grad = grads[0]
    optimizer.step()
    first = {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
    p.grad = grads[1]
    optimizer.step()
    return first, optimizer.state[p]


@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW])
@pytest.mark.parametrize("on_refresh", ["keep", "rotate"])
def test_moments_are_kept_or_rotated_on_a_refresh(cls, on_refresh):
    beta1, beta2 = 0.9, 0.999
    p = torch.nn.Parameter(torch.randn(10, 8, dtype=f64))
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(10, 8, generator=gen, dtype=f64) for _ in range(2)]
    optimizer = cls([{"params": [p], "rank": 3, "update_proj_gap": 1, "on_refresh": on_refresh}])
    first, second = two_steps(optimizer, p, grads)
    P_old = optimizer.projector.basis(first["basis"], 8, f64)
    P_new = optimizer.projector.basis(second["basis"], 8, f64)
    low = grads[1] @ P_new
    m, v = first["exp_avg"], first["exp_avg_sq"]
    if on_refresh == "rotate":
        R = P_old.T @ P_new
        m, v = m @ R, v @ R.square()
    torch.testing.assert_close(
        second["exp_avg"], beta1 * m + (1 - beta1) * low, rtol=1e-12, atol=1e-14
    )
    expected_v = beta2 * v + (1 - beta2) * low.square()
    torch.testing.assert_close(second["exp_avg_sq"], expected_v, rtol=1e-12, atol=1e-16)


def test_rotation_is_exact_for_a_moment_inside_the_old_span():
    gen = torch.Generator().manual_seed(5)
    P_old = torch.linalg.qr(torch.randn(12, 4, generator=gen, dtype=f64)).Q
    P_new = torch.linalg.qr(torch.cat([P_old, torch.randn(12, 2, generator=gen, dtype=f64)], 1)).Q
    M = torch.randn(7, 4, generator=gen, dtype=f64) @ P_old.T  # a full-space moment in span(P_old)
    torch.testing.assert_close((M @ P_old) @ (P_old.T @ P_new), M @ P_new, rtol=1e-12, atol=1e-12)


def test_dct_rotation_moves_each_kept_columns_moments_exactly_and_zeroes_new_ones():
    p = torch.nn.Parameter(torch.zeros(20, 16, dtype=f64))  # compressed on the right: 16 columns
    Q = dct_basis(16, f64)
    gen = torch.Generator().manual_seed(9)
    weights = torch.tensor([3.0, 2.0, 1.0], dtype=f64)
    # gradients whose DCT energy sits on columns {1, 2, 3}, then on {3, 1, 9}
    grads = [
        (torch.randn(20, 3, generator=gen, dtype=f64) * weights) @ Q[:, columns].T
        for columns in ([1, 2, 3], [3, 1, 9])
    ]
    optimizer = DCTAdamW([{"params": [p], "rank": 3, "update_proj_gap": 1}], betas=(0.5, 0.5))
    first, second = two_steps(optimizer, p, grads)
    old, new = first["basis"].tolist(), second["basis"].tolist()
    assert set(old) == {1, 2, 3} and set(new) == {1, 3, 9}
    for j, column in enumerate(new):
        low = grads[1] @ Q[:, column]
        carried = first["exp_avg_sq"][:, old.index(column)] if column in old else 0.0
        expected = 0.5 * carried + 0.5 * low.square()
        torch.testing.assert_close(second["exp_avg_sq"][:, j], expected, rtol=1e-12, atol=1e-20)


# ------------------------------------------------------------------ Natural GaLore


def projected_gradients(optimizer, p):
    state = optimizer.state[p]
    return p.grad.to(f64) @ optimizer.projector.basis(state["basis"], p.shape[1], f64)


@pytest.mark.parametrize("history", [1, 3, 5])
def test_natural_galore_preconditions_with_the_explicit_inverse_fisher(history):
    beta1, damp = 0.9, 1e-2
    p = torch.nn.Parameter(torch.randn(9, 6, dtype=f64))
    optimizer = NaturalGaLore(
        [{"params": [p], "rank": 2, "update_proj_gap": 100}],
        history=history,
        damp=damp,
        betas=(beta1, 0.999),
    )
    gen = torch.Generator().manual_seed(6)
    held, before = [], torch.zeros(9, 2, dtype=f64)
    for _ in range(8):
        p.grad = torch.randn(9, 6, generator=gen, dtype=f64)
        optimizer.step()
        low = projected_gradients(optimizer, p).reshape(-1)
        held = [*held, low][-history:]
        state = optimizer.state[p]
        natural = (state["exp_avg"] - beta1 * before) / (1 - beta1)
        expected = explicit_solve(torch.stack(held), damp, low)
        assert relative_error(natural.reshape(-1), expected) < 1e-9
        before = state["exp_avg"].clone()


def test_natural_galore_window_is_rotated_with_the_basis():
    """After a refresh, F is the Fisher of the old projected gradients carried by R."""
    beta1, damp, history = 0.9, 1e-1, 4
    p = torch.nn.Parameter(torch.randn(9, 6, dtype=f64))
    optimizer = NaturalGaLore(
        [{"params": [p], "rank": 2, "update_proj_gap": 3}],
        history=history,
        damp=damp,
        betas=(beta1, 0.999),
    )
    gen = torch.Generator().manual_seed(7)
    held, before = [], None
    for step in range(1, 12):  # refreshes at 4 (window filling), 7 and 10 (window full)
        old_basis = optimizer.state[p]["basis"].clone() if step > 1 else None
        p.grad = torch.randn(9, 6, generator=gen, dtype=f64)
        optimizer.step()
        state = optimizer.state[p]
        if step > 1 and (step - 1) % 3 == 0:
            R = old_basis.T @ state["basis"]
            held = [(g.reshape(9, 2) @ R).reshape(-1) for g in held]
            before = before @ R
        low = projected_gradients(optimizer, p).reshape(-1)
        held = [*held, low][-history:]
        if before is not None:
            natural = (state["exp_avg"] - beta1 * before) / (1 - beta1)
            assert (
                relative_error(natural.reshape(-1), explicit_solve(torch.stack(held), damp, low))
                < 1e-9
            )
        before = state["exp_avg"].clone()


def test_natural_galore_with_history_1_and_large_damping_is_galore():
    """F⁻¹a = a / (damp + ‖a‖²) ≈ a / damp, and Adam absorbs the scale into ε."""
    damp, eps = 1e6, 1e-9
    natural_model, galore_model = tiny_model(f64), tiny_model(f64)
    group = {"rank": 3, "update_proj_gap": 2}
    natural = NaturalGaLore(
        [{"params": vectors(natural_model)}, {"params": matrices(natural_model), **group}],
        lr=1e-2, eps=eps, history=1, damp=damp,
    )  # fmt: skip
    galore = GaLoreAdamW(
        [{"params": vectors(galore_model), "eps": eps}, {"params": matrices(galore_model), **group}],
        lr=1e-2, eps=eps * damp,
    )  # fmt: skip
    data = batches(6, f64)
    train(natural_model, natural, data)
    train(galore_model, galore, data)
    for a, b in zip(natural_model.parameters(), galore_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert not torch.equal(natural_model[0].weight, tiny_model(f64)[0].weight)


# ------------------------------------------------------------------ dtypes, shapes, no grads


@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLore, DCTAdamW])
def test_conv_weights_train_and_keep_low_rank_state(cls):
    model = tiny_model()
    optimizer = cls([{"params": vectors(model)}, {"params": matrices(model), "rank": 3}], lr=1e-2)
    data = batches(1) * 30  # one batch, fitted
    with torch.no_grad():
        start = (model(data[0][0]) - data[0][1]).square().mean()
    end = train(model, optimizer, data)
    assert end < 0.9 * start
    conv = optimizer.state[model[0].weight]
    assert conv["exp_avg"].shape == (18, 3)  # conv as 6 × 18, its 6 rows compressed to 3


@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLore, DCTAdamW])
def test_bf16_weights_are_updated_from_float32_statistics_rounded_once(cls):
    torch.manual_seed(8)
    low_precision = torch.nn.Parameter(torch.randn(12, 8).to(torch.bfloat16))
    wide = torch.nn.Parameter(low_precision.detach().float())
    optimizers = [
        cls([{"params": [q], "rank": 3}], lr=1e-2, weight_decay=0.1) for q in (low_precision, wide)
    ]
    grad = torch.randn(12, 8).to(torch.bfloat16)
    low_precision.grad, wide.grad = grad, grad.float()
    for optimizer in optimizers:
        optimizer.step()
    assert low_precision.dtype == torch.bfloat16
    assert optimizers[0].state[low_precision]["exp_avg"].dtype == torch.float32
    assert torch.equal(low_precision, wide.detach().to(torch.bfloat16))


def test_parameters_without_gradients_are_skipped():
    model = tiny_model()
    optimizer = GaLoreAdamW([{"params": vectors(model)}, {"params": matrices(model), "rank": 2}])
    frozen = model[2].weight.detach().clone()
    model[2].weight.requires_grad_(False)
    train(model, optimizer, batches(2))
    assert torch.equal(model[2].weight, frozen)
    assert model[2].weight not in optimizer.state
    assert optimizer.step() is None  # nothing has a gradient after zero_grad: nothing happens


def test_lr_scheduler_and_closure():
    model = tiny_model()
    optimizer = DCTAdamW(
        [{"params": vectors(model)}, {"params": matrices(model), "rank": 2}], lr=1e-2
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    inputs, targets = batches(1)[0]

    def closure():
        optimizer.zero_grad()
        loss = (model(inputs) - targets).square().mean()
        loss.backward()
        return loss

    losses = []
    for _ in range(3):
        losses.append(optimizer.step(closure).item())
        scheduler.step()
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-2 / 8)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ state_dict


def make(cls, model, **kwargs):
    groups = [
        {"params": vectors(model)},
        {"params": matrices(model), "rank": 3, "update_proj_gap": 3},
    ]
    return cls(groups, lr=1e-2, weight_decay=0.01, **kwargs)


@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLore, DCTAdamW])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bit_identically(cls, dtype):
    extra = {"history": 3} if cls is NaturalGaLore else {}
    data = batches(9, dtype)
    reference = tiny_model(dtype)
    reference_optimizer = make(cls, reference, **extra)
    train(reference, reference_optimizer, data)

    interrupted = tiny_model(dtype)
    optimizer = make(cls, interrupted, **extra)
    train(interrupted, optimizer, data[:4])  # stops between refreshes, window full
    buffer = io.BytesIO()
    torch.save({"model": interrupted.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = tiny_model(dtype, seed=99)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = make(cls, resumed, **extra)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    basis = resumed_optimizer.state[resumed[2].weight]["basis"]
    assert basis.dtype == (torch.int64 if cls is DCTAdamW else torch.float32)
    train(resumed, resumed_optimizer, data[4:])
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_natural_galore_loads_a_window_saved_before_padding():
    """Windows are now saved at full size (for DCP); a checkpoint holding the window's own
    n × n state, as written before, still resumes bit-identically."""
    data = batches(6)
    reference, interrupted = tiny_model(), tiny_model()
    reference_optimizer = make(NaturalGaLore, reference, history=4)
    optimizer = make(NaturalGaLore, interrupted, history=4)
    train(reference, reference_optimizer, data)
    train(interrupted, optimizer, data[:2])  # two of four slots filled
    saved = optimizer.state_dict()
    for state in saved["state"].values():
        if "fisher" in state:
            fisher = dict(state["fisher"])
            n = fisher["num_stored"]
            assert n == 2 and fisher["factor"].shape == (4, 4)
            fisher["factor"], fisher["pivots"] = fisher["factor"][:n, :n], fisher["pivots"][:n]
            state["fisher"] = fisher
    resumed_optimizer = make(NaturalGaLore, interrupted, history=4)
    resumed_optimizer.load_state_dict(saved)
    train(interrupted, resumed_optimizer, data[2:])
    for a, b in zip(reference.parameters(), interrupted.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank": 99}, "rank 99 is larger than the dimension it compresses"),
        ({"proj_type": "full"}, "proj_type must be one of"),
        ({"history": 0}, "history must be a positive integer"),
        ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
    ],
)
def test_a_load_with_a_bad_group_setting_is_refused_whole(change, message):
    """The settings were loaded before _group_changed refused them: a half-loaded optimiser."""
    model = tiny_model()
    optimizer = make(NaturalGaLore, model, history=3)
    train(model, optimizer, batches(2))
    before = io.BytesIO()
    torch.save(optimizer.state_dict(), before)
    saved = optimizer.state_dict()
    saved["param_groups"] = [dict(g) for g in saved["param_groups"]]
    saved["param_groups"][1].update({"lr": 0.5, **change})
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(saved)
    after = io.BytesIO()
    torch.save(optimizer.state_dict(), after)
    assert before.getvalue() == after.getvalue()
    del saved["param_groups"][1]["scale"]
    saved["param_groups"][1].update(rank=3, proj_type="std", history=3, lr=0.5)
    with pytest.raises(ValueError, match="parameter group 1 of the state dict lacks 'scale'"):
        optimizer.load_state_dict(saved)
    assert optimizer.param_groups[1]["lr"] == 1e-2


# ------------------------------------------------------------------ layer-wise


@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLore])
@pytest.mark.parametrize("accumulation_steps", [1, 3])
def test_layerwise_updates_equal_ordinary_steps(cls, accumulation_steps):
    data = batches(6)
    ordinary, layerwise = tiny_model(), tiny_model()
    ordinary_optimizer = make(cls, ordinary)
    layerwise_optimizer = make(
        cls, layerwise, layerwise=True, accumulation_steps=accumulation_steps
    )
    for start in range(0, len(data), accumulation_steps):
        ordinary_optimizer.zero_grad()
        for inputs, targets in data[start : start + accumulation_steps]:
            (ordinary(inputs) - targets).square().mean().backward()
            (layerwise(inputs) - targets).square().mean().backward()
            layerwise_optimizer.step()  # runs no update itself
        ordinary_optimizer.step()
        assert all(p.grad is None for p in layerwise.parameters())
    for a, b in zip(ordinary.parameters(), layerwise.parameters(), strict=True):
        assert torch.equal(a, b)
    layerwise_optimizer.remove_hooks()
    (layerwise(data[0][0]) - data[0][1]).square().mean().backward()
    assert all(p.grad is not None for p in layerwise.parameters())


def test_layerwise_takes_a_parameter_unfrozen_after_construction():
    """It had no hook: its gradient stayed in .grad and it was never updated, silently."""
    model = tiny_model()
    model[0].weight.requires_grad_(False)
    optimizer = make(GaLoreAdamW, model, layerwise=True)
    frozen = model[0].weight.detach().clone()
    data = batches(3)
    model[0].weight.requires_grad_(True)
    (model(data[0][0]) - data[0][1]).square().mean().backward()
    assert model[0].weight.grad is not None and torch.equal(model[0].weight, frozen)
    optimizer.step()  # applies what it accumulated, and hooks it
    assert model[0].weight.grad is None and not torch.equal(model[0].weight, frozen)
    moved = model[0].weight.detach().clone()
    (model(data[1][0]) - data[1][1]).square().mean().backward()  # its hook steps it now
    assert model[0].weight.grad is None and not torch.equal(model[0].weight, moved)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_layerwise_non_finite_gradient_abandons_the_backward_pass(accumulation_steps):
    """Hooks run from the last layer back: the last layer (and here the middle layer's bias)
    is updated before the NaN in the middle weight is seen. The error names them; the rest
    keep their weights; every gradient is cleared, so the next backward passes train
    normally."""
    model = tiny_model()
    optimizer = make(GaLoreAdamW, model, layerwise=True, accumulation_steps=accumulation_steps)
    assert optimizer.layerwise
    data = batches(2 + 2 * accumulation_steps)
    for inputs, targets in data[:accumulation_steps]:
        (model(inputs) - targets).square().mean().backward()  # a clean first update
    before = [p.detach().clone() for p in model.parameters()]
    handle = model[2].weight.register_hook(lambda g: g * float("nan"))
    for inputs, targets in data[accumulation_steps : 2 * accumulation_steps - 1]:
        (model(inputs) - targets).square().mean().backward()  # accumulates, updates nothing
    inputs, targets = data[2 * accumulation_steps - 1]
    updated = r"3 parameter\(s\) were already updated by it: .*group 1 #2 \(24, 10\)"
    with pytest.raises(NonFiniteError, match=updated):
        (model(inputs) - targets).square().mean().backward()
    handle.remove()
    moved = {id(model[4].weight), id(model[4].bias), id(model[2].bias)}
    for p, old in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, old) != (id(p) in moved)
        assert p.grad is None
    for inputs, targets in data[2 * accumulation_steps :]:
        (model(inputs) - targets).square().mean().backward()  # no error: a fresh start
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(model[0].weight, before[0])


@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLore])
def test_a_deep_copy_of_a_layerwise_optimiser_steps_its_own_parameters(cls):
    import copy

    model = tiny_model()
    optimizer = make(cls, model, layerwise=True)
    data = batches(4)
    for inputs, targets in data[:2]:
        (model(inputs) - targets).square().mean().backward()
    copied_model, copied_optimizer = copy.deepcopy((model, optimizer))
    assert copied_optimizer.layerwise and len(copied_optimizer._hooks) == len(optimizer._hooks)
    for net in (model, copied_model):
        for inputs, targets in data[2:]:
            (net(inputs) - targets).square().mean().backward()
    assert all(p.grad is None for p in copied_model.parameters())  # stepped by the copy's hooks
    for a, b in zip(model.parameters(), copied_model.parameters(), strict=True):
        assert torch.equal(a, b)
    optimizer.process_group = object()  # stands for a torch.distributed group
    with pytest.raises(TypeError, match="with a process_group cannot be copied"):
        copy.deepcopy(optimizer)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": -2}, "rank must be a positive integer"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        (
            {"rank": 9},
            r"rank 9 is larger than the dimension it compresses: a weight of shape \(12, 8\)",
        ),
        ({"rank": 13, "proj_type": "left"}, "projected on the left has 12"),
        ({"rank": 2, "proj_type": "full"}, "proj_type must be one of"),
        ({"rank": 2, "update_proj_gap": 0}, "update_proj_gap must be a positive integer"),
        ({"rank": 2, "on_refresh": "reset"}, "on_refresh must be one of"),
        ({"rank": 2, "scale": float("nan")}, "scale must be a finite number"),
        ({"rank": 2, "history": 0}, "history must be a positive integer"),
        ({"rank": 2, "damp": 0.0}, "damp must be a finite number > 0"),
    ],
)
def test_bad_group_settings_are_refused(setting, message):
    p = torch.nn.Parameter(torch.randn(12, 8))
    with pytest.raises(ValueError, match=message):
        NaturalGaLore([{"params": [p], **setting}])


def test_a_refused_group_is_not_added():
    p, q = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    optimizer = GaLoreAdamW([p])
    with pytest.raises(ValueError, match="rank 5"):
        optimizer.add_param_group({"params": [q], "rank": 5})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_raise_and_change_nothing(bad):
    model = tiny_model()
    optimizer = NaturalGaLore([{"params": vectors(model)}, {"params": matrices(model), "rank": 2}])
    train(model, optimizer, batches(2))
    weights = [p.detach().clone() for p in model.parameters()]
    state = {
        p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
        for p, s in optimizer.state.items()
    }
    train(model, optimizer, batches(1), backward_only=True)
    model[4].weight.grad[0, 0] = bad  # the last parameter: every other one would have been updated
    with pytest.raises(NonFiniteError, match="1 NaN or Inf entries"):
        optimizer.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    for p, saved in state.items():
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in saved.items())


# ------------------------------------------------------------------ hypothesis: any shape, any side


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    proj_type=st.sampled_from(["std", "reverse_std", "left", "right"]),
    data=st.data(),
)
def test_projected_update_lies_in_the_span_of_the_basis(rows, cols, proj_type, data):
    side = LowRankConfig(rank=1, proj_type=proj_type).side(rows, cols)
    size = cols if side == "right" else rows
    rank = data.draw(st.integers(1, size))
    cls = data.draw(st.sampled_from([GaLoreAdamW, DCTAdamW]))
    p = torch.nn.Parameter(torch.zeros(rows, cols, dtype=f64))
    optimizer = cls([{"params": [p], "rank": rank, "proj_type": proj_type}], lr=0.1)
    p.grad = torch.randn(rows, cols, dtype=f64)
    optimizer.step()
    P = optimizer.projector.basis(optimizer.state[p]["basis"], size, f64)
    update = p.detach() if side == "right" else p.detach().T
    torch.testing.assert_close(update @ P @ P.T, update, rtol=1e-10, atol=1e-12)
    assert torch.linalg.matrix_rank(update).item() <= rank


def test_natural_galore_relative_damping_is_scale_free():
    """With relative damping, scaling every gradient by c leaves Natural GaLore's steps as
    they were (the Fisher and its damping scale together, and Adam undoes the rest), up to
    Adam's ε; with absolute damping it does not."""
    trajectories = {}
    for relative in (None, 0.1):
        for scale in (1.0, 1e3):
            p = torch.nn.Parameter(torch.ones(6, 4, dtype=f64))
            optimizer = NaturalGaLore(
                [{"params": [p], "rank": 2, "update_proj_gap": 3}],
                lr=0.1, history=3, damp=1.0, relative_damp=relative, eps=1e-30,
            )  # fmt: skip
            gen = torch.Generator().manual_seed(3)
            for _ in range(7):
                p.grad = scale * torch.randn(6, 4, generator=gen, dtype=f64)
                optimizer.step()
            trajectories[relative, scale] = p.detach().clone()
    torch.testing.assert_close(
        trajectories[0.1, 1.0], trajectories[0.1, 1e3], rtol=1e-9, atol=1e-12
    )
    assert not torch.allclose(trajectories[None, 1.0], trajectories[None, 1e3], rtol=1e-3)


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_ways_of_stepping_plain_parameters_agree_bit_for_bit(correct_bias, dtype):
    """``functional.adamw`` steps a list one tensor at a time (CPU) or with foreach kernels
    (GPU): the same bits either way, with parameters that miss a step (their step counts
    differ) and bf16 weights updated from float32 moments; and, for float32 with bias
    correction, the bits of torch.optim.AdamW, as GaLoreAdamW's plain groups give them."""
    from secondorder.optim.functional import adamw

    torch.manual_seed(0)
    weights = [torch.randn(5, 3).to(dtype), torch.randn(7).to(dtype), torch.randn(2, 2).to(dtype)]
    kwargs = {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.1}

    class Functional(torch.optim.Optimizer):
        def __init__(self, params, foreach):
            super().__init__(params, kwargs)
            self.foreach = foreach

        @torch.no_grad()
        def step(self):
            group, lists = self.param_groups[0], ([], [], [], [], [])
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if not state:
                    zeros = torch.zeros(p.shape)
                    state.update(step=0, exp_avg=zeros, exp_avg_sq=zeros.clone())
                state["step"] += 1
                for values, item in zip(lists, (p, p.grad.float(), state["exp_avg"],
                                                state["exp_avg_sq"], state["step"]), strict=True):  # fmt: skip
                    values.append(item)
            beta1, beta2 = group["betas"]
            adamw(*lists, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                  weight_decay=group["weight_decay"], correct_bias=correct_bias,
                  foreach=self.foreach)  # fmt: skip

    def run(make):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = make(params)
        gen = torch.Generator().manual_seed(1)
        for step in range(5):
            for i, p in enumerate(params):
                missing = step == 2 and i == 1
                p.grad = None if missing else torch.randn(p.shape, generator=gen).to(dtype)
            optimizer.step()
        return params

    results = {foreach: run(lambda p, f=foreach: Functional(p, f)) for foreach in (False, True)}
    results["galore"] = run(lambda p: GaLoreAdamW(p, correct_bias=correct_bias, **kwargs))
    for a, b, c in zip(results[False], results[True], results["galore"], strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    if correct_bias and dtype == torch.float32:
        reference = run(lambda p: torch.optim.AdamW(p, foreach=False, **kwargs))
        for a, b in zip(results[True], reference, strict=True):
            assert torch.equal(a, b)


def test_an_unknown_keyword_is_a_type_error_as_in_torch_optim():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['foo'\]"):
        GaLoreAdamW([weight], foo=1)
    NaturalGaLore([weight], history=3)  # a subclass's own settings are known
