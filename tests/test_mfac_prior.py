"""M-FAC with Adam's diagonal as its prior: ``F = λ D + (1/n) Σ gᵢ gᵢᵀ``, ``D = √v̂ + ε``,
against the explicit ``d × d`` matrix in float64."""

import pytest
import torch

from secondorder.optim import MFAC

f64 = torch.float64


def model(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    return net.to(f64)


def loss(net, step):
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 5, generator=gen, dtype=f64), torch.randint(0, 3, (16,), generator=gen)
    return torch.nn.functional.cross_entropy(net(x), y)


def train_side_by_side(nets, optimizers, steps):
    """Each net stepped by its optimizer on the same losses, in turn."""
    for step in range(steps):
        for net, optimizer in zip(nets, optimizers, strict=True):
            optimizer.zero_grad()
            loss(net, step).backward()
            optimizer.step()


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("damping", [{"damp": 0.05}, {"relative_damp": 3.0}])
def test_each_step_is_lr_lambda_inverse_fisher_of_adams_first_moment(damping):
    """Adam's moments written out, the window's rows whitened by the ``D`` of their own step,
    and the step ``lr · λ F⁻¹ m̂`` with ``F = D^½ (λ I + (1/n) Σ wᵢwᵢᵀ) D^½`` for the current
    ``D``: ``λ D + (1/n) Σ gᵢ gᵢᵀ`` for gradients ``gᵢ = D^½ wᵢ`` (exact for the newest row,
    the older ones re-scaled by today's ``D``)."""
    net = model()
    params = list(net.parameters())
    lr, wd, (beta1, beta2), eps, num_grads = 0.1, 0.01, (0.8, 0.95), 1e-6, 3
    steps = 6 if "damp" in damping else num_grads  # relative λ: recomputed while filling
    optimizer = MFAC(params, lr=lr, num_grads=num_grads, weight_decay=wd, prior="adam",
                     betas=(beta1, beta2), eps=eps, **damping)  # fmt: skip
    d = sum(p.numel() for p in params)
    m, v, rows = torch.zeros(d, dtype=f64), torch.zeros(d, dtype=f64), []
    for t in range(1, steps + 1):
        optimizer.zero_grad()
        loss(net, t).backward()
        before = flat(p.detach() for p in params)
        g = flat(p.grad for p in params) + wd * before
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        D = v_hat.sqrt() + eps
        rows = [*rows, g / D.sqrt()][-num_grads:]
        optimizer.step()
        W = torch.stack(rows)
        torch.testing.assert_close(optimizer.window.gradients(), W, rtol=1e-12, atol=1e-15)
        lam = damping.get("damp", damping.get("relative_damp", 0) * W.square().mean())
        assert optimizer.window.damp == pytest.approx(float(lam), rel=1e-12)
        G = W * D.sqrt()  # the rows as gradients, un-whitened by today's D
        F = lam * torch.diag(D) + G.T @ G / len(rows)
        expected = before - lr * lam * torch.linalg.solve(F, m_hat)
        torch.testing.assert_close(flat(p.detach() for p in params), expected, rtol=1e-9,
                                   atol=1e-12)  # fmt: skip


def test_large_damping_is_adams_step():
    """As ``λ`` grows, ``λ F⁻¹ m̂ → D⁻¹ m̂``: torch.optim.Adam's step at the same ``lr``."""
    nets = model(), model()
    adam = torch.optim.Adam(nets[0].parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    mfac = MFAC(nets[1].parameters(), lr=0.01, betas=(0.9, 0.99), prior="adam",
                relative_damp=1e12, num_grads=4)  # fmt: skip
    train_side_by_side(nets, (adam, mfac), steps=8)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_full_density_sparse_window_is_the_dense_one():
    nets = model(), model()
    dense = MFAC(nets[0].parameters(), lr=0.05, prior="adam", num_grads=3, damp=0.1)
    sparse = MFAC(nets[1].parameters(), lr=0.05, prior="adam", num_grads=3, damp=0.1,
                  density=1.0)  # fmt: skip
    train_side_by_side(nets, (dense, sparse), steps=5)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_parameter_without_gradient_keeps_its_moments():
    net = model()
    optimizer = MFAC(net.parameters(), lr=0.05, prior="adam", num_grads=3, damp=0.1)
    loss(net, 0).backward()
    optimizer.step()
    record = optimizer.state[net[0].weight]["mfac"]
    before = record["exp_avg"].clone(), record["exp_avg_sq"].clone()
    frozen = net[0].bias.detach().clone()
    net[0].bias.grad = None
    for p in net.parameters():
        if p is not net[0].bias:
            p.grad = torch.ones_like(p)
    optimizer.step()
    start = net[0].weight.numel()
    span = slice(start, start + net[0].bias.numel())
    assert torch.equal(record["exp_avg"][span], before[0][span])
    assert torch.equal(record["exp_avg_sq"][span], before[1][span])
    assert torch.equal(net[0].bias.detach(), frozen)
    assert not torch.equal(record["exp_avg"], before[0])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"prior": "adam", "graft": "adam"}, "graft"),
        ({"prior": "adam", "momentum": 0.9}, "momentum"),
        ({"prior": "adam", "eps": 0.0}, "eps"),
        ({"prior": "shampoo"}, "prior"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        MFAC(model().parameters(), **settings)


def test_graft_and_prior_follow_each_other_unless_given():
    params = list(model().parameters())

    def settings(**kwargs):
        return tuple(MFAC(params, **kwargs).defaults[k] for k in ("graft", "prior"))

    assert settings() == (None, "adam")
    assert settings(prior=None) == ("adam", None)
    assert settings(graft="sgd") == ("sgd", None)
    assert settings(graft=None) == (None, None)  # the paper's M-FAC
