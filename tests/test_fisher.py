from collections import UserDict
from collections.abc import Mapping

import pytest
import torch
from _curvature_oracles import (
    LOSSES,
    MODELS,
    dense_empirical_fisher,
    f64,
    make_data,
    stacked_sample_gradients,
    tiny_mlp,
)
from torch import nn

from secondorder.curvature import (
    EmpiricalFisherOperator,
    empirical_fisher_diagonal,
    fisher_merge,
    per_sample_gradients,
)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_per_sample_gradients_match_one_grad_per_sample(model_name, loss_name):
    make_model, shape = MODELS[model_name]
    model, loss_fn = make_model(), LOSSES[loss_name]
    data = make_data(shape, loss_name, sizes=(5,))
    params = list(model.parameters())
    grads = per_sample_gradients(model, loss_fn, params, data[0])
    assert [g.shape for g in grads] == [(5, *p.shape) for p in params]
    flat = torch.cat([g.reshape(5, -1) for g in grads], dim=1)
    torch.testing.assert_close(flat, stacked_sample_gradients(model, loss_fn, params, data))
    # With a mean-reduced loss, their mean is the batch gradient.
    batch_loss = loss_fn(model(data[0][0]), data[0][1])
    expected = torch.autograd.grad(batch_loss, params)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g.mean(0), e)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_exact_diagonal_over_uneven_batches(model_name):
    make_model, shape = MODELS[model_name]
    model, loss_fn = make_model(), LOSSES["cross_entropy"]
    data = make_data(shape, "cross_entropy")  # batches of 3, 3, 1
    expected = dense_empirical_fisher(model, loss_fn, list(model.parameters()), data).diagonal()
    blocks = empirical_fisher_diagonal(model, loss_fn, None, data)
    torch.testing.assert_close(torch.cat([b.reshape(-1) for b in blocks]), expected)
    op = EmpiricalFisherOperator(model, loss_fn, None, data)
    torch.testing.assert_close(op.diagonal(), expected)


def _copies(count):
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).to(f64))
    return models


def test_fisher_merge_is_the_weighted_elementwise_average():
    models = _copies(3)
    gen = torch.Generator().manual_seed(0)
    fishers = [
        [torch.rand(p.shape, generator=gen, dtype=f64) + 0.1 for p in m.parameters()]
        for m in models
    ]
    weights = [1.0, 2.0, 0.5]
    merged = fisher_merge(models, fishers, weights=weights)
    for index, p in enumerate(merged.parameters()):
        numerator = sum(
            w * f[index] * list(m.parameters())[index]
            for w, f, m in zip(weights, fishers, models, strict=True)
        )
        denominator = sum(w * f[index] for w, f in zip(weights, fishers, strict=True))
        torch.testing.assert_close(p.detach(), (numerator / denominator).detach())
    assert merged is not models[0]
    assert all(p.requires_grad for p in merged.parameters())


def test_fisher_merge_special_cases():
    a, b = _copies(2)
    ones = [torch.ones_like(p) for p in a.parameters()]
    plain = fisher_merge([a, b], [ones, ones])
    for p, pa, pb in zip(plain.parameters(), a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), ((pa + pb) / 2).detach())
    # Where model a has no information, the merge takes model b's value.
    blind = [torch.zeros_like(p) for p in a.parameters()]
    blind[0][0, 0] = 0.0
    informed = [torch.ones_like(p) for p in b.parameters()]
    merged = fisher_merge([a, b], [blind, informed])
    torch.testing.assert_close(merged[0].weight[0, 0], b[0].weight[0, 0], rtol=1e-5, atol=0)
    # A dict for a subset: the other parameters are plainly averaged.
    subset = fisher_merge([a, b], [{"0.weight": ones[0]}, {"0.weight": 3 * ones[0]}])
    torch.testing.assert_close(subset[0].weight, (a[0].weight + 3 * b[0].weight) / 4)
    torch.testing.assert_close(subset[2].bias, (a[2].bias + b[2].bias) / 2)


def test_fisher_merge_bad_input():
    a, b = _copies(2)
    ones = [torch.ones_like(p) for p in a.parameters()]
    other = tiny_mlp()
    with pytest.raises(ValueError, match="does not have the parameters"):
        fisher_merge([a, other], [ones, [torch.ones_like(p) for p in other.parameters()]])
    with pytest.raises(ValueError, match="2 models but 1"):
        fisher_merge([a, b], [ones])
    with pytest.raises(ValueError, match="has 1 tensors"):
        fisher_merge([a, b], [ones, ones[:1]])
    with pytest.raises(ValueError, match="shape"):
        fisher_merge([a, b], [ones, [torch.ones(1, dtype=f64)] * len(ones)])
    with pytest.raises(ValueError, match="not a parameter"):
        fisher_merge([a, b], [{"nope": ones[0]}, {"nope": ones[0]}])
    with pytest.raises(ValueError, match="weights"):
        fisher_merge([a, b], [ones, ones], weights=[1.0, -1.0])


class _TwoInputs(nn.Module):
    """A model of a dict of two tensors, or of a tuple of them (the same layers)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.left, self.right = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x):
        a, b = (x["a"], x["b"]) if isinstance(x, Mapping) else x
        return self.left(a) + torch.tanh(self.right(b))


def _as_container(kind, a, b):
    return {"dict": {"a": a, "b": b}, "tuple": (a, b), "userdict": UserDict(a=a, b=b)}[kind]


@pytest.mark.parametrize("kind", ["dict", "tuple", "userdict"])
def test_pytree_inputs_match_a_per_sample_loop(kind):
    """Per-sample gradients, the exact diagonal and the operator on inputs that are not one
    tensor, against one ``grad`` per sample (batches of 3 and 2)."""
    model, loss_fn = _TwoInputs().to(f64).eval(), nn.functional.cross_entropy
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=gen, dtype=f64), torch.randn(5, 2, generator=gen, dtype=f64)
    y = torch.randint(0, 3, (5,), generator=gen)
    data = [(_as_container(kind, a[s], b[s]), y[s]) for s in (slice(0, 3), slice(3, 5))]
    params = list(model.parameters())
    rows = []
    for i in range(5):
        sample = _as_container(kind, a[i : i + 1], b[i : i + 1])
        loss = loss_fn(model(sample), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    expected = torch.stack(rows)
    grads = per_sample_gradients(model, loss_fn, params, data[0])
    torch.testing.assert_close(torch.cat([g.reshape(3, -1) for g in grads], 1), expected[:3])
    dense = expected.T @ expected / 5
    diagonal = empirical_fisher_diagonal(model, loss_fn, None, data, progress=False)
    torch.testing.assert_close(torch.cat([d.reshape(-1) for d in diagonal]), dense.diagonal())
    op = EmpiricalFisherOperator(model, loss_fn, None, data)
    torch.testing.assert_close(op.to_dense(), dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.diagonal(), dense.diagonal())


def test_pytree_inputs_without_a_common_batch_dimension_are_refused():
    model, loss_fn = _TwoInputs().to(f64).eval(), nn.functional.cross_entropy
    inputs = {"a": torch.randn(3, 4, dtype=f64), "b": torch.randn(2, 2, dtype=f64)}
    with pytest.raises(ValueError, match="batch dimension"):
        per_sample_gradients(model, loss_fn, None, (inputs, torch.zeros(3, dtype=torch.long)))
