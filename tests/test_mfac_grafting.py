"""Grafted M-FAC: each tensor's step has M-FAC's direction and the grafting optimiser's norm."""

import io

import pytest
import torch
from _oracles import explicit_solve, top_k_compress

from secondorder.optim import MFAC

f64 = torch.float64


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(
        f64
    )


def loss(net, step):
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 5, generator=gen, dtype=f64), torch.randint(0, 3, (16,), generator=gen)
    return torch.nn.functional.cross_entropy(net(x), y)


def grafted_step(kind, g, state, beta2, eps, beta1=0.9):
    """The grafting optimiser's step for one tensor, written out: torch.optim.Adam's (both
    moments, bias-corrected), RMSprop's, Adagrad's."""
    if kind == "sgd":
        return g
    if kind == "adagrad":
        state["sum"] = state.get("sum", 0) + g * g
        return g / (state["sum"].sqrt() + eps)
    state["v"] = beta2 * state.get("v", torch.zeros_like(g)) + (1 - beta2) * g * g
    if kind == "rmsprop":
        return g / (state["v"].sqrt() + eps)
    state["m"] = beta1 * state.get("m", torch.zeros_like(g)) + (1 - beta1) * g
    state["t"] = state.get("t", 0) + 1
    m_hat = state["m"] / (1 - beta1 ** state["t"])
    v_hat = state["v"] / (1 - beta2 ** state["t"])
    return m_hat / (v_hat.sqrt() + eps)


def test_adam_grafting_is_torch_adams_step_norm():
    """The oracle above is torch.optim.Adam: its step from zero moments, divided by lr."""
    g_seq = [
        torch.randn(7, dtype=f64, generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    p = torch.nn.Parameter(torch.zeros(7, dtype=f64))
    adam = torch.optim.Adam([p], lr=1.0, betas=(0.9, 0.99), eps=1e-6)
    state = {}
    for g in g_seq:
        before = p.detach().clone()
        p.grad = g.clone()
        adam.step()
        expected = grafted_step("adam", g, state, 0.99, 1e-6, beta1=0.9)
        torch.testing.assert_close(before - p.detach(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["sgd", "adam", "rmsprop", "adagrad"])
@pytest.mark.parametrize("density", [None, 0.4])
def test_each_tensor_steps_in_mfacs_direction_with_the_grafted_norm(kind, density):
    net = model()
    params = list(net.parameters())
    lr, damp, wd, beta2, eps = 0.1, 1e-2, 0.01, 0.99, 1e-6
    optimizer = MFAC(
        params, lr=lr, num_grads=3, damp=damp, weight_decay=wd, graft=kind,
        betas=(0.9, beta2), eps=eps, density=density,
    )  # fmt: skip
    sizes = [p.numel() for p in params]
    d = sum(sizes)
    k = -(-4 * d // 10)
    history, error = [], torch.zeros(d, dtype=f64)
    states = [{} for _ in params]
    for step in range(6):
        optimizer.zero_grad()
        loss(net, step).backward()
        w = torch.cat([p.detach().reshape(-1) for p in params])
        g = torch.cat([p.grad.reshape(-1) for p in params]) + wd * w
        if density is None:
            c = g
        else:
            accumulator = error + g
            c = top_k_compress(accumulator, k)
            error = accumulator - c
        history = [*history, c][-3:]
        u = explicit_solve(torch.stack(history), damp, c)
        optimizer.step()
        moved = torch.cat([p.detach().reshape(-1) for p in params]) - w
        for u_p, g_p, step_p, state in zip(
            u.split(sizes), g.split(sizes), moved.split(sizes), states, strict=True
        ):
            target = grafted_step(kind, g_p, state, beta2, eps).norm()
            expected = -lr * target * u_p / u_p.norm()
            torch.testing.assert_close(step_p, expected, rtol=1e-9, atol=1e-13)


def test_sgd_grafting_gives_each_tensor_the_norm_of_its_gradient():
    net = model()
    optimizer = MFAC(net.parameters(), lr=0.3, num_grads=4, damp=1e-3, graft="sgd")
    for step in range(5):
        optimizer.zero_grad()
        loss(net, step).backward()
        before = [p.detach().clone() for p in net.parameters()]
        grads = [p.grad.clone() for p in net.parameters()]
        optimizer.step()
        for p, w, g in zip(net.parameters(), before, grads, strict=True):
            assert (p.detach() - w).norm().item() == pytest.approx(0.3 * g.norm().item(), rel=1e-12)


def test_grafting_comes_before_momentum_and_per_group_settings_apply():
    """Two groups with their own lr, betas and eps; momentum averages the grafted steps."""
    net = model()
    first, second = list(net[0].parameters()), list(net[2].parameters())
    groups = [
        {"params": first, "lr": 0.05, "betas": (0.9, 0.9), "eps": 1e-3, "momentum": 0.5},
        {"params": second, "lr": 0.2, "betas": (0.9, 0.999), "eps": 1e-8, "momentum": 0.0},
    ]
    optimizer = MFAC(groups, num_grads=3, damp=1e-2, graft="adam")
    params, settings = first + second, [groups[0]] * 2 + [groups[1]] * 2
    sizes = [p.numel() for p in params]
    history, states = [], [{} for _ in params]
    velocity = [torch.zeros(s, dtype=f64) for s in sizes]
    for step in range(5):
        optimizer.zero_grad()
        loss(net, step).backward()
        w = [p.detach().clone().reshape(-1) for p in params]
        g = torch.cat([p.grad.reshape(-1) for p in params])
        history = [*history, g][-3:]
        u = explicit_solve(torch.stack(history), 1e-2, g)
        optimizer.step()
        for i, (u_p, g_p) in enumerate(zip(u.split(sizes), g.split(sizes), strict=True)):
            group = settings[i]
            s = grafted_step("adam", g_p, states[i], group["betas"][1], group["eps"])
            grafted = u_p * s.norm() / u_p.norm()
            mu = group["momentum"]
            velocity[i] = mu * velocity[i] + (1 - mu) * grafted if mu else grafted
            expected = w[i] - group["lr"] * velocity[i]
            torch.testing.assert_close(
                params[i].detach().reshape(-1), expected, rtol=1e-9, atol=1e-13
            )


@pytest.mark.parametrize("density", [None, 0.5])
def test_grafted_state_resumes_bit_identically_and_deep_copies(density):
    import copy

    settings = {"lr": 0.05, "num_grads": 3, "damp": 1e-2, "graft": "adam", "density": density}
    reference, interrupted = model(), model()
    ref_opt, int_opt = (
        MFAC(reference.parameters(), **settings),
        MFAC(interrupted.parameters(), **settings),
    )
    for step in range(4):
        for net, opt in ((reference, ref_opt), (interrupted, int_opt)):
            opt.zero_grad()
            loss(net, step).backward()
            opt.step()
    buffer = io.BytesIO()
    torch.save({"model": interrupted.state_dict(), "optim": int_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = model(seed=3)
    resumed.load_state_dict(saved["model"])
    res_opt = MFAC(resumed.parameters(), **settings)
    res_opt.load_state_dict(saved["optim"])
    assert "graft_exp_avg_sq" in saved["optim"]["state"][0]["mfac"]
    twin = copy.deepcopy((reference, ref_opt))
    for step in range(4, 7):
        for net, opt in ((reference, ref_opt), (resumed, res_opt), twin):
            opt.zero_grad()
            loss(net, step).backward()
            opt.step()
    for a, b, c in zip(
        reference.parameters(), resumed.parameters(), twin[0].parameters(), strict=True
    ):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_parameter_without_gradient_keeps_its_grafting_moments():
    """Its Adam second moment and step count stand still while it has no gradient, so its
    later grafted norm is the one an Adam that skipped it would give."""
    a = torch.nn.Parameter(torch.zeros(3, dtype=f64))
    b = torch.nn.Parameter(torch.zeros(2, dtype=f64))
    beta2, eps = 0.9, 1e-8
    optimizer = MFAC(
        [a, b], lr=1.0, num_grads=4, damp=1.0, graft="adam", betas=(0.9, beta2), eps=eps
    )
    gen = torch.Generator().manual_seed(5)
    state = {}
    for step in range(5):
        a.grad = torch.randn(3, generator=gen, dtype=f64)
        b.grad = None if step in (1, 2) else torch.randn(2, generator=gen, dtype=f64)
        before = b.detach().clone()
        optimizer.step()
        if b.grad is None:
            assert torch.equal(b.detach(), before)
            continue
        target = grafted_step("adam", b.grad, state, beta2, eps).norm()
        assert (b.detach() - before).norm().item() == pytest.approx(target.item(), rel=1e-12)
