"""SOAP beyond the reference: one-sided low-rank bases, DCT bases, settings and state.

(``test_soap_faithful.py`` holds the full-rank SOAP to the authors' trajectory.)
"""

from __future__ import annotations

import pytest
import torch

from secondorder.optim import SOAP
from secondorder.optim.projectors import dct_basis

F64 = torch.float64


def _two_steps(**settings):
    """A 4 × 16 weight stepped twice in float64 (the first step builds the bases)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 16, generator=gen, dtype=F64))
    grads = [torch.randn(4, 16, generator=gen, dtype=F64) for _ in range(2)]
    optimizer = SOAP([weight], **settings)
    start = weight.detach().clone()
    for grad in grads:
        weight.grad = grad
        optimizer.step()
    return start, grads, weight.detach(), optimizer.state[weight]


def _expected(start, grads, Q, settings):
    """The second step by hand: Adam's first step on ``Qᵀ G₂`` rotated back, then decay."""
    lr, (beta1, beta2), eps, wd = settings["lr"], settings["betas"], 1e-8, settings["weight_decay"]
    rotated = Q.mT @ grads[1]
    m, v = (1 - beta1) * rotated, (1 - beta2) * rotated.square()
    step_size = lr * (1 - beta2) ** 0.5 / (1 - beta1)
    after = start - step_size * (Q @ (m / (v.sqrt() + eps)))
    return after * (1 - lr * wd)


SETTINGS = {"lr": 0.01, "betas": (0.9, 0.95), "weight_decay": 0.1}


def test_rank_keeps_the_top_eigenvectors_of_the_smaller_side_only():
    start, grads, after, state = _two_steps(rank=2, **SETTINGS)
    gram = (1 - 0.95) * grads[0] @ grads[0].mT  # shampoo_beta = betas[1]
    Q = torch.linalg.eigh(gram).eigenvectors.flip(1)[:, :2]
    assert set(state) >= {"basis_0", "gram_0"} and "basis_1" not in state
    assert state["basis_0"].shape == (4, 2) and state["exp_avg"].shape == (2, 16)
    torch.testing.assert_close(
        after, _expected(start, grads, Q, SETTINGS), rtol=1e-6, atol=1e-9
    )  # eigh in float32, as the reference


def test_dct_basis_needs_no_eigendecomposition(monkeypatch):
    """The DCT columns with the most energy of the Gram, here the highest frequencies (the
    first gradient is built on them), not the first columns; no ``eigh``."""

    def refuse(*args, **kwargs):
        raise AssertionError("basis='dct' must not call eigh")

    monkeypatch.setattr(torch.linalg, "eigh", refuse)
    full = dct_basis(4, F64)
    gen = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(4, 16, generator=gen, dtype=F64))
    grads = [full[:, [3, 2]] @ torch.randn(2, 16, generator=gen, dtype=F64),
             torch.randn(4, 16, generator=gen, dtype=F64)]  # fmt: skip
    optimizer = SOAP([weight], basis="dct", rank=2, **SETTINGS)
    start = weight.detach().clone()
    for grad in grads:
        weight.grad = grad
        optimizer.step()
    basis = optimizer.state[weight]["basis_0"]
    energy = (full.mT @ grads[0] @ grads[0].mT @ full).diagonal()
    assert set(torch.topk(energy, 2).indices.tolist()) == {2, 3}
    torch.testing.assert_close(basis, full[:, torch.topk(energy, 2).indices])
    torch.testing.assert_close(weight.detach(), _expected(start, grads, basis, SETTINGS),
                               rtol=1e-6, atol=1e-9)  # fmt: skip


def test_low_rank_state_is_smaller_than_full_soap_and_adamw():
    def state_bytes(optimizer):
        return sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )

    sizes = {}
    for name, settings in {"full": {}, "rank": {"rank": 4}}.items():
        weight = torch.nn.Parameter(torch.randn(16, 256))
        optimizer = SOAP([weight], **settings)
        for _ in range(2):
            weight.grad = torch.randn(16, 256)
            optimizer.step()
        sizes[name] = state_bytes(optimizer)
    adamw = 2 * 16 * 256 * 4
    assert sizes["rank"] < adamw / 2 < sizes["full"], sizes


def test_a_low_rank_basis_holds_only_its_columns_from_the_first_step():
    """The first basis is cut from a full eigendecomposition: its memory must be its
    ``n × r`` columns, not the ``n × n`` eigenvectors it was cut from."""
    weight = torch.nn.Parameter(torch.randn(16, 256))
    optimizer = SOAP([weight], rank=4)
    weight.grad = torch.randn(16, 256)
    optimizer.step()
    basis = optimizer.state[weight]["basis_0"]
    assert basis.shape == (16, 4)
    assert basis.untyped_storage().nbytes() == 16 * 4 * basis.element_size()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"precondition_frequency": 0}, "precondition_frequency must be a positive integer"),
        ({"max_precond_dim": 0}, "max_precond_dim must be a positive integer"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"basis": "svd"}, "basis must be 'eigh' or 'dct'"),
        ({"shampoo_beta": 1.0}, "shampoo_beta must be < 1"),
        ({"betas": (0.9, 1.0)}, r"betas must be in \[0, 1\)"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SOAP([torch.nn.Parameter(torch.ones(3, 3))], **settings)


def test_a_refresh_permutes_the_second_moment_and_carries_the_first():
    """After a refresh the moments are those of the new basis: ``m`` rotated (in the
    original coordinates it is ``β₁ m + (1 − β₁) G``, whatever the basis) and ``v`` the
    entries it had in the old basis, permuted."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=F64))
    optimizer = SOAP([weight], precondition_frequency=2)
    for _ in range(2):  # build, then one step
        weight.grad = torch.randn(5, 3, generator=gen, dtype=F64)
        optimizer.step()
    state = optimizer.state[weight]
    left, right = state["basis_0"].clone(), state["basis_1"].clone()
    m_before = left @ state["exp_avg"] @ right.mT
    grad = torch.randn(5, 3, generator=gen, dtype=F64)
    v_expected = 0.95 * state["exp_avg_sq"] + 0.05 * (left.mT @ grad @ right).square()
    weight.grad = grad
    optimizer.step()  # the second step refreshes
    assert int(state["step"]) == 2 and not torch.equal(state["basis_0"], left)
    new_left, new_right = state["basis_0"], state["basis_1"]
    for Q in (new_left, new_right):
        torch.testing.assert_close(Q.mT @ Q, torch.eye(Q.shape[1], dtype=F64), atol=1e-6, rtol=0)
    m_after = new_left @ state["exp_avg"] @ new_right.mT
    torch.testing.assert_close(
        m_after, 0.95 * m_before + 0.05 * grad, atol=1e-6, rtol=1e-6
    )  # float32 QR
    # v is permuted, entry by entry, to the order of the columns' estimated eigenvalues
    orders = [torch.argsort((Q.mT @ state[f"gram_{k}"].float() @ Q).diagonal(), descending=True)
              for k, Q in enumerate((left.float(), right.float()))]  # fmt: skip
    torch.testing.assert_close(state["exp_avg_sq"], v_expected[orders[0]][:, orders[1]])


@pytest.mark.parametrize(
    ("shape", "max_dim", "merged"),
    [
        ((8, 3, 3, 3), 12, [8, 9, 3]),
        ((8, 8, 3, 3), 12, [8, 8, 9]),
        ((8, 3, 3, 3), 64, [24, 9]),
        ((8, 8, 3, 3), 64, [64, 9]),
        ((8, 3, 3, 3), 10000, [216]),
        ((16, 4), 12, [16, 4]),
        ((5, 1, 1), 10, [5]),  # trailing ones vanish
        ((), 10, [1]),  # a scalar
    ],
)
def test_merge_dims_shapes_are_the_references(shape, max_dim, merged):
    """The working shapes the authors' ``merge_dims`` gives (read off their code's runs)."""
    from secondorder.optim.eigenbasis import merged_shape

    assert merged_shape(shape, max_dim) == merged
