"""Issue 24 held out: the curvature operators on a model, inputs and loss used nowhere else.

A two-input conv net with ``BatchNorm2d`` and ``GroupNorm``, fed a dict of two tensors,
under ``MSELoss(reduction="sum")`` on batches of 4 and 1, against float64 dense matrices
built here without the code under test: the Hessian of the summed loss over all samples
at once, and explicit loops over the samples for the GGN and the empirical Fisher.
Hessians are ``jacrev(jacrev(f))``, what ``torch.func.hessian`` computes, without its
forward-mode pass, whose first use costs seconds of TorchScript compilation.
"""

from collections import UserDict
from functools import partial

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from secondorder.curvature import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    empirical_fisher_diagonal,
    per_sample_gradients,
)
from secondorder.errors import NondeterminismError

f64 = torch.float64
OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator, "ef": EmpiricalFisherOperator}
SIZES = (4, 1)


def hessian(f):
    return jacrev(jacrev(f))


class TwoStreamNet(nn.Module):
    """An image through conv, batch norm and group norm, joined by a vector of extras."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.batch_norm = nn.BatchNorm2d(4)
        self.group_norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 + 2, 2)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.group_norm(torch.tanh(self.batch_norm(self.conv(x["image"]))))
        return self.head(torch.cat([h.mean(dim=(2, 3)), x["extra"]], dim=1))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = TwoStreamNet().to(f64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # running statistics that are not the identity
        model.batch_norm.running_mean.copy_(torch.randn(4, generator=gen, dtype=f64))
        model.batch_norm.running_var.copy_(torch.rand(4, generator=gen, dtype=f64) + 0.5)
    return model.eval()


def make_data(container=dict):
    gen = torch.Generator().manual_seed(2)
    n = sum(SIZES)
    image = torch.randn(n, 1, 5, 5, generator=gen, dtype=f64)
    extra = torch.randn(n, 2, generator=gen, dtype=f64)
    targets = torch.randn(n, 2, generator=gen, dtype=f64)
    return [
        (container(image=i, extra=e), t)
        for i, e, t in zip(
            image.split(SIZES), extra.split(SIZES), targets.split(SIZES), strict=True
        )
    ]


def samples(data):
    """Each sample as a batch of one: ``({"image": [1, ...], "extra": [1, 2]}, [1, 2])``."""
    for inputs, targets in data:
        for i in range(targets.shape[0]):
            yield {k: v[i : i + 1] for k, v in inputs.items()}, targets[i : i + 1]


def as_function_of_theta(model):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(t, inputs):
        blocks = t.split([s.numel() for s in shapes])
        named = {n: b.view(s) for n, b, s in zip(names, blocks, shapes, strict=True)}
        return functional_call(model, named, (inputs,))

    return theta, outputs


def dense_hessian(model, loss_fn, data):
    theta, outputs = as_function_of_theta(model)
    inputs = {k: torch.cat([x[k] for x, _ in data]) for k in data[0][0]}
    targets = torch.cat([y for _, y in data])
    return hessian(lambda t: loss_fn(outputs(t, inputs), targets))(theta)


def dense_ggn(model, loss_fn, data):
    theta, outputs = as_function_of_theta(model)
    total = torch.zeros(theta.numel(), theta.numel(), dtype=f64)
    for x, y in samples(data):
        jacobian = jacrev(outputs)(theta, x).reshape(-1, theta.numel())
        out = outputs(theta, x)
        h = hessian(lambda o, y=y: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
        total += jacobian.T @ h @ jacobian
    return total


def sample_gradient_rows(model, loss_fn, data):
    rows = []
    for x, y in samples(data):
        loss = loss_fn(model(x), y)
        rows.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, model.parameters())])
        )
    return torch.stack(rows)


def dense_ef(model, loss_fn, data):
    rows = sample_gradient_rows(model, loss_fn, data)
    return rows.T @ rows


DENSE = {"hessian": dense_hessian, "ggn": dense_ggn, "ef": dense_ef}


@pytest.fixture(scope="module")
def oracles():
    """The dense matrices of the summed loss, built once."""
    model, data = make_model(), make_data()
    summed = nn.MSELoss(reduction="sum")
    return {name: DENSE[name](model, summed, data) for name in OPERATORS}


@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_sum_reduced_mse_on_dict_inputs_is_the_summed_matrix(oracles, op_name):
    model, data = make_model(), make_data()
    op = OPERATORS[op_name](model, nn.MSELoss(reduction="sum"), None, data)
    torch.testing.assert_close(op.to_dense(), oracles[op_name], rtol=1e-10, atol=1e-12)
    # the same reduction given by a partial of the functional loss
    partial_op = OPERATORS[op_name](
        model, partial(nn.functional.mse_loss, reduction="sum"), None, data
    )
    v = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(3), dtype=f64)
    torch.testing.assert_close(partial_op @ v, oracles[op_name] @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_mean_reduced_mse_is_the_mean_over_samples(op_name):
    """With the default mean, each sample's loss is a mean over its two outputs (the
    convention of a batch of one), and the matrix is the mean over the five samples."""
    model, data = make_model(), make_data()
    op = OPERATORS[op_name](model, nn.MSELoss(), None, data)
    expected = DENSE[op_name](model, nn.MSELoss(), data) / sum(SIZES)
    if op_name == "hessian":  # the oracle's one batch already averages
        expected = expected * sum(SIZES)
    torch.testing.assert_close(op.to_dense(), expected, rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_and_diagonal_on_dict_and_userdict_inputs(oracles):
    model = make_model()
    loss_fn = nn.MSELoss(reduction="sum")
    rows = sample_gradient_rows(model, loss_fn, make_data())
    for container in (dict, UserDict):
        data = make_data(container)
        grads = per_sample_gradients(model, loss_fn, None, data[0])
        torch.testing.assert_close(torch.cat([g.reshape(4, -1) for g in grads], 1), rows[:4])
        diagonal = empirical_fisher_diagonal(model, loss_fn, None, data, progress=False)
        torch.testing.assert_close(
            torch.cat([d.reshape(-1) for d in diagonal]), oracles["ef"].diagonal()
        )


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_batch_norm_in_train_mode_is_refused_and_the_buffers_kept(op_name, check):
    model, data = make_model(), make_data()
    model.train()  # GroupNorm has no buffers: only the batch norm is to blame
    before = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(NondeterminismError, match=r"model\.eval\(\)") as error:
        OPERATORS[op_name](
            model, nn.MSELoss(reduction="sum"), None, data, check_deterministic=check
        )
    assert "batch_norm.running_mean" in str(error.value) and "BatchNorm2d" in str(error.value)
    assert "GroupNorm" not in str(error.value)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name])


def test_batch_norm_in_train_mode_is_refused_by_the_per_sample_functions():
    model, data = make_model(), make_data()
    model.train()
    with pytest.raises(NondeterminismError, match=r"model\.eval\(\)"):
        per_sample_gradients(model, nn.MSELoss(), None, data[0])
    with pytest.raises(NondeterminismError, match=r"model\.eval\(\)"):
        empirical_fisher_diagonal(model, nn.MSELoss(), None, data, progress=False)
