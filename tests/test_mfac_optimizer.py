import copy
import io

import pytest
import torch
from _oracles import explicit_solve, top_k_compress

from secondorder.errors import NonFiniteError, NotPositiveDefiniteError
from secondorder.optim import MFAC

f64 = torch.float64


def tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(
        dtype
    )


def data(seed=0, n=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def loss_of(model, batch):
    inputs, targets = batch
    return torch.nn.functional.cross_entropy(model(inputs), targets)


def train(model, optimizer, steps, seed0=0):
    dtype = next(model.parameters()).dtype
    for step in range(steps):
        optimizer.zero_grad()
        loss_of(model, data(seed0 + step, dtype=dtype)).backward()
        optimizer.step()


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_steps_match_the_explicit_inverse_with_groups_decay_and_momentum():
    """Float64 oracle: per-group lr and L2 decay, momentum, through the window's wrap-around."""
    model = tiny_model(f64)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    groups = [
        {"params": first, "lr": 0.1, "weight_decay": 0.01, "momentum": 0.5},
        {"params": second, "lr": 0.02, "weight_decay": 0.0, "momentum": 0.0},
    ]
    optimizer = MFAC(groups, num_grads=3, damp=1e-2, graft=None)
    params = first + second
    sizes = [p.numel() for p in params]
    lr = torch.cat(
        [torch.full((p.numel(),), g["lr"], dtype=f64) for g in groups for p in g["params"]]
    )
    decay = torch.cat(
        [
            torch.full((p.numel(),), g["weight_decay"], dtype=f64)
            for g in groups
            for p in g["params"]
        ]
    )
    mu = torch.cat(
        [torch.full((p.numel(),), g["momentum"], dtype=f64) for g in groups for p in g["params"]]
    )
    history, velocity = [], torch.zeros(sum(sizes), dtype=f64)
    for step in range(7):
        optimizer.zero_grad()
        loss_of(model, data(step, dtype=f64)).backward()
        w = flat(p.detach() for p in params).clone()
        g = flat(p.grad for p in params) + decay * w
        history.append(g)
        u = explicit_solve(torch.stack(history[-3:]), 1e-2, g)
        velocity = torch.where(mu > 0, mu * velocity + (1 - mu) * u, u)
        optimizer.step()
        torch.testing.assert_close(
            flat(p.detach() for p in params), w - lr * velocity, rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize("error_feedback", [True, False])
def test_sparse_steps_match_the_float64_algorithm(error_feedback):
    """density=0.3: the compressed accumulator of g + weight_decay·w (+ e) is preconditioned,
    with momentum, through the window's wrap-around."""
    model = tiny_model(f64)
    params = list(model.parameters())
    optimizer = MFAC(
        params,
        lr=0.1,
        num_grads=3,
        damp=1e-2,
        momentum=0.5,
        weight_decay=0.01,
        density=0.3,
        error_feedback=error_feedback,
        graft=None,
    )
    d = sum(p.numel() for p in params)
    k = -(-3 * d // 10)
    history, e, velocity = [], torch.zeros(d, dtype=f64), torch.zeros(d, dtype=f64)
    for step in range(7):
        optimizer.zero_grad()
        loss_of(model, data(step, dtype=f64)).backward()
        w = flat(p.detach() for p in params).clone()
        a = e + flat(p.grad for p in params) + 0.01 * w
        c = top_k_compress(a, k)
        e = a - c if error_feedback else e
        history.append(c)
        velocity = 0.5 * velocity + 0.5 * explicit_solve(torch.stack(history[-3:]), 1e-2, c)
        optimizer.step()
        torch.testing.assert_close(
            flat(p.detach() for p in params), w - 0.1 * velocity, rtol=1e-9, atol=1e-12
        )
    torch.testing.assert_close(optimizer.window.error, e, rtol=0, atol=1e-12)


def test_density_one_is_the_dense_optimiser():
    dense, sparse = tiny_model(), tiny_model()
    settings = {"lr": 0.05, "num_grads": 4, "damp": 1e-2, "momentum": 0.9}
    train(dense, MFAC(dense.parameters(), prior=None, **settings), 9)
    train(sparse, MFAC(sparse.parameters(), prior=None, density=1.0, **settings), 9)
    for a, b in zip(dense.parameters(), sparse.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sparse_state_dict_resumes_bit_identically():
    settings = {"lr": 0.05, "num_grads": 4, "damp": 1e-2, "density": 0.2}
    reference, interrupted = tiny_model(), tiny_model()
    ref_opt = MFAC(reference.parameters(), prior=None, **settings)
    train(reference, ref_opt, 10)
    int_opt = MFAC(interrupted.parameters(), prior=None, **settings)
    train(interrupted, int_opt, 6)
    buffer = io.BytesIO()
    torch.save({"model": interrupted.state_dict(), "optim": int_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = tiny_model(seed=1)
    resumed.load_state_dict(saved["model"])
    res_opt = MFAC(resumed.parameters(), prior=None, **settings)
    res_opt.load_state_dict(saved["optim"])
    assert res_opt.window.error.any()
    train(resumed, res_opt, 4, seed0=6)
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="density"):
        MFAC(
            tiny_model().parameters(), prior=None, **(settings | {"density": 0.3})
        ).load_state_dict(ref_opt.state_dict())
    with pytest.raises(ValueError, match=r"density=0\.2 into one with density=None"):
        MFAC(
            tiny_model().parameters(), prior=None, lr=0.05, num_grads=4, damp=1e-2
        ).load_state_dict(ref_opt.state_dict())


def test_sparse_arguments_are_checked():
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        MFAC(tiny_model().parameters(), prior=None, density=0.0)
    with pytest.raises(ValueError, match="error_feedback=False applies to a sparse window"):
        MFAC(tiny_model().parameters(), prior=None, error_feedback=False)


def test_state_dict_round_trip_resumes_bit_identically():
    """Saved mid-run (after the window wrapped), loaded with weights_only=True into fresh objects."""
    settings = {"lr": 0.05, "num_grads": 4, "damp": 1e-3, "momentum": 0.9, "weight_decay": 1e-3}
    reference = tiny_model()
    reference_optimizer = MFAC(reference.parameters(), prior=None, **settings)
    train(reference, reference_optimizer, 15)

    interrupted = tiny_model()
    interrupted_optimizer = MFAC(interrupted.parameters(), prior=None, **settings)
    train(interrupted, interrupted_optimizer, 9)
    buffer = io.BytesIO()
    torch.save(
        {"model": interrupted.state_dict(), "optimizer": interrupted_optimizer.state_dict()}, buffer
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = tiny_model(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = MFAC(resumed.parameters(), prior=None, **settings)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_optimizer, 6, seed0=9)
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lr_scheduler_changes_the_step():
    model = tiny_model(f64)
    optimizer = MFAC(model.parameters(), lr=0.1, num_grads=2, damp=1e-2, graft=None)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(model, optimizer, 1)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    before = flat(p.detach() for p in model.parameters()).clone()
    optimizer.zero_grad()
    loss_of(model, data(1, dtype=f64)).backward()
    g = flat(p.grad for p in model.parameters())
    previous = optimizer.window._grads[0].clone()
    optimizer.step()
    u = explicit_solve(torch.stack([previous, g]), 1e-2, g)
    torch.testing.assert_close(flat(p.detach() for p in model.parameters()), before - 0.05 * u)


def test_closure_is_evaluated_and_its_loss_returned():
    model = tiny_model()
    optimizer = MFAC(model.parameters(), prior=None, lr=0.05, num_grads=4, damp=1e-3)
    calls = []

    def closure():
        optimizer.zero_grad()
        loss = loss_of(model, data(0))
        loss.backward()
        calls.append(loss.item())
        return loss

    returned = optimizer.step(closure)
    assert calls and returned.item() == calls[0]
    assert optimizer.window.num_stored == 1


@pytest.mark.parametrize("density", [None, 0.5])
def test_parameters_without_gradients_are_skipped(density):
    model = tiny_model()
    unused = torch.nn.Parameter(torch.ones(7))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    optimizer = MFAC(
        [*model.parameters(), unused, frozen],
        prior=None,
        lr=0.05,
        num_grads=4,
        damp=1e-3,
        weight_decay=0.1,
        density=density,
    )
    assert (
        optimizer.window.dim == sum(p.numel() for p in model.parameters()) + 7
    )  # frozen: not in the window
    train(model, optimizer, 3)
    assert torch.equal(unused, torch.ones(7)) and torch.equal(frozen, torch.ones(2))
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()  # no gradient anywhere: nothing happens
    assert optimizer.window.num_stored == 3


@pytest.mark.parametrize("density", [None, 0.5])
def test_bfloat16_parameters_follow_the_float32_trajectory(density):
    """Same start, same batches: the bf16 model (float32 window) tracks the float32 model."""
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model(dtype)
        optimizer = MFAC(
            model.parameters(), prior=None, lr=0.2, num_grads=8, damp=0.1, density=density
        )
        batch = data(0, n=64, dtype=dtype)
        start = loss_of(model, batch).item()
        for _ in range(30):
            optimizer.zero_grad()
            loss_of(model, batch).backward()
            optimizer.step()
        losses[dtype] = (start, loss_of(model, batch).item())
        assert optimizer.window.dtype == torch.float32
        assert all(p.dtype == dtype for p in model.parameters())
    (start32, end32), (start16, end16) = losses[torch.float32], losses[torch.bfloat16]
    assert end32 < 0.85 * start32 and end16 < 0.85 * start16
    assert abs(end16 - end32) < 0.02


def test_storage_dtype_reaches_the_window():
    optimizer = MFAC(
        tiny_model().parameters(), prior=None, num_grads=4, storage_dtype=torch.bfloat16
    )
    assert optimizer.window._grads.dtype == torch.bfloat16


@pytest.mark.parametrize("density", [None, 0.5])
def test_a_non_finite_gradient_raises_and_changes_nothing(density):
    model = tiny_model()
    optimizer = MFAC(
        model.parameters(), prior=None, lr=0.05, num_grads=4, damp=1e-3, density=density
    )
    train(model, optimizer, 2)
    before = [p.detach().clone() for p in model.parameters()]
    window = copy.deepcopy(optimizer.window.state_dict())
    optimizer.zero_grad()
    loss_of(model, data(5)).backward()
    model[0].weight.grad[0, 0] = float("nan")
    # found by the window in its one host read, named as before
    with pytest.raises(NonFiniteError, match=r"parameter of shape \(4, 5\) has 1 NaN or Inf"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    after = optimizer.window.state_dict()
    assert optimizer.window.num_stored == 2
    for key, value in window.items():
        assert torch.equal(after[key], value) if torch.is_tensor(value) else after[key] == value


def test_a_singular_window_raises_and_the_step_changes_nothing():
    """The same integer gradient twice with damp=1e-30: K = [[25, 25], [25, 25]] exactly."""
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = MFAC([weight], prior=None, lr=0.1, num_grads=2, damp=1e-30, momentum=0.5)
    weight.grad = torch.tensor([3.0, 4.0])
    optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())
    moved = weight.detach().clone()
    with pytest.raises(NotPositiveDefiniteError, match="larger damp"):
        optimizer.step()  # the same gradient again
    assert torch.equal(weight, moved)
    after, before = optimizer.state_dict()["state"][0]["mfac"], state["state"][0]["mfac"]
    assert after["steps"] == before["steps"] == 1
    assert torch.equal(after["momentum"], before["momentum"])
    assert torch.equal(after["window"]["grads"], before["window"]["grads"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"damp": 0.0}, "damp must be a finite number > 0"),
        ({"num_grads": 0}, "num_grads must be a positive integer"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MFAC(tiny_model().parameters(), prior=None, **kwargs)


def test_structural_errors():
    optimizer = MFAC(tiny_model().parameters(), prior=None, num_grads=2)
    with pytest.raises(ValueError, match="cannot load a window with num_grads=2"):
        MFAC(tiny_model().parameters(), prior=None, num_grads=3).load_state_dict(
            optimizer.state_dict()
        )
    with pytest.raises(ValueError, match="num_grads=3 in a parameter group: num_grads belongs"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "num_grads": 3})
    assert len(optimizer.param_groups) == 1
    with pytest.raises(ValueError, match="meta device"):
        MFAC([torch.nn.Parameter(torch.ones(2, device="meta"))], prior=None)
    with pytest.raises(ValueError, match="exactly one of damp and relative_damp"):
        MFAC(tiny_model().parameters(), prior=None, damp=1e-3, relative_damp=1e-2)
    with pytest.raises(ValueError, match="graft must be None or one of"):
        MFAC(tiny_model().parameters(), graft="lion")


def test_an_all_frozen_list_builds_and_steps_as_a_no_op_until_something_unfreezes():
    """As torch.optim.AdamW: no error at construction; the window appears with a gradient."""
    weight = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    optimizer = MFAC([weight], lr=0.1, num_grads=2, damp=0.1, graft=None)
    optimizer.step()
    with pytest.raises(RuntimeError, match="MFAC has no window yet"):
        optimizer.window
    weight.requires_grad_(True)
    weight.grad = torch.tensor([1.0, 0.0, 0.0])
    optimizer.step()
    assert optimizer.window.dim == 3
    torch.testing.assert_close(weight.detach(), torch.tensor([1 - 0.1 / 1.1, 1.0, 1.0]))


@pytest.mark.parametrize("density", [None, 0.5])
def test_a_parameter_unfrozen_later_joins_the_window(density):
    """Frozen at construction, it gets a gradient later: it is updated (never ignored), and
    the window grows with zeros in the stored gradients, so the dense step equals a window
    that always spanned it with zero gradients there. (A sparse window keeps more entries
    once it is wider, k = ⌈density · d⌉, so there it is the same only from the growth on.)"""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    second.requires_grad_(False)
    grown = MFAC([*first.parameters(), *second.parameters()], lr=0.1, num_grads=3, damp=0.1,
                 density=density, graft=None)  # fmt: skip
    always = [
        p.detach().clone().requires_grad_(True) for p in (*first.parameters(), *second.parameters())
    ]
    reference = MFAC(always, lr=0.1, num_grads=3, damp=0.1, density=density, graft=None)
    start = second.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        if step == 2:
            second.requires_grad_(True)
        x = torch.randn(4, 3, generator=gen)
        for params in (list(first.parameters()) + list(second.parameters()), always):
            for p in params:
                p.grad = None
            w1, b1, w2, b2 = params
            out = torch.tanh(x @ w1.T + b1) @ (w2.T if w2.requires_grad else w2.detach().T) + b2
            out.square().sum().backward()
        for p in always[2:]:
            if step < 2:
                p.grad = torch.zeros_like(p)  # the reference sees zeros where the other is frozen
        grown.step()
        reference.step()
    ours = [*first.parameters(), *second.parameters()]
    assert grown.window.dim == reference.window.dim == 20
    if density is None:
        for a, b in zip(ours, always, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        assert grown.window.k == reference.window.k == 10
        assert not torch.equal(second.weight.detach(), start)  # it was stepped, not ignored


def test_a_non_finite_gradient_of_a_newcomer_is_refused_before_the_window_grows():
    """A step that would grow the window checks the gradients first (the one step with a
    host sync besides the window's), so a refused step changes nothing."""
    first, second = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    second.requires_grad_(False)
    optimizer = MFAC([first, second], prior=None, lr=0.1, num_grads=2, damp=0.1)
    first.grad = torch.tensor([1.0, 0.0, 0.0])
    optimizer.step()
    second.requires_grad_(True)
    first.grad, second.grad = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([float("nan"), 1.0])
    moved = first.detach().clone()
    with pytest.raises(NonFiniteError, match=r"parameter of shape \(2,\)"):
        optimizer.step()
    assert optimizer.window.dim == 3 and optimizer.window.num_stored == 1
    assert torch.equal(first.detach(), moved) and torch.equal(second.detach(), torch.ones(2))


def _logistic_regression_loss(make_optimizer, seed, epochs=3):
    from secondorder._workloads.data import load_digits
    from secondorder._workloads.training import train_classifier

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    train, test = load_digits()
    run = train_classifier(
        "logistic",
        model,
        make_optimizer,
        train,
        test,
        epochs=epochs,
        batch_size=32,
        seed=seed,
        show_progress=False,
    )
    return run.train_loss


def test_mfac_beats_sgd_on_logistic_regression_of_the_digits():
    """Convex problem, real data, same batches and step budget (3 epochs), 4 seeds.

    Along directions its window has not seen, M-FAC is SGD with step lr/damp; along
    directions where recent gradients show curvature it steps less. So at the same
    step size lr/damp = 10, where plain SGD overshoots, M-FAC reaches a lower loss.
    (Against SGD tuned to its best step, M-FAC only ties on this small problem: see
    docs/benchmarks.md.)
    """
    seeds = range(4)
    mfac = [
        _logistic_regression_loss(lambda p: MFAC(p, lr=0.1, damp=0.01, num_grads=32, graft=None), s)
        for s in seeds
    ]
    sgd = [_logistic_regression_loss(lambda p: torch.optim.SGD(p, lr=0.1 / 0.01), s) for s in seeds]
    assert sum(mfac) / len(mfac) < 0.8 * sum(sgd) / len(sgd)
    assert sum(m < s for m, s in zip(mfac, sgd, strict=True)) >= 3
