"""MFAC's defaults (prior="adam", relative_damp=3e4, num_grads=32, momentum 0, lr=3e-3)
train each problem of the comparison in docs/benchmarks.md without raising: the digits
logistic regression, the demo's digits CNN, the tiny Llama (shortened) and the conformance
table's MLP, with the dense and the sparse window. With Adam's diagonal as the prior, the
step tends to Adam's as the damping grows, so the yardstick is ``torch.optim.Adam()``
with its defaults on the same batches: M-FAC's defaults must lower the loss at least half
as much."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import pytest
import torch
from _conformance import backward, mlp

from secondorder._workloads import language_model as lm
from secondorder._workloads.data import load_digits, load_stdlib_corpus
from secondorder._workloads.models import digits_cnn
from secondorder.optim import MFAC

WINDOWS = {"dense": {}, "sparse 1%": {"density": 0.01}}
STEPS = 60


def test_the_documented_defaults_are_the_constructor_s():
    """The docstring and README quote these; a change must be deliberate."""
    defaults = {name: p.default for name, p in inspect.signature(MFAC).parameters.items()}
    assert defaults["lr"] == 3e-3
    assert defaults["num_grads"] == 32
    assert (defaults["graft"], defaults["prior"]) == ("auto", "auto")
    assert defaults["momentum"] == 0.0
    group = MFAC(mlp().parameters()).param_groups[0]
    assert (group["damp"], group["relative_damp"]) == (None, 3e4)
    assert (group["graft"], group["prior"]) == (None, "adam")
    assert MFAC(mlp().parameters(), prior=None).param_groups[0]["graft"] == "adam"
    assert MFAC(mlp().parameters(), graft=None).param_groups[0]["prior"] is None


def digits_problem(model: Callable[[], torch.nn.Module], flatten: bool):
    train, _ = load_digits()
    inputs = train.inputs.reshape(len(train), -1) if flatten else train.inputs
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(len(train), (64,), generator=generator) for _ in range(STEPS)]

    def losses(make_optimizer) -> list[float]:
        torch.manual_seed(0)
        net = model()
        optimizer = make_optimizer(net.parameters())
        out = []
        for index in batches:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(inputs[index]), train.targets[index])
            loss.backward()
            optimizer.step()
            out.append(loss.item())
        return out

    return losses


def llama_problem():
    setup = dataclasses.replace(lm.QUICK, hidden_size=32, seq_len=32, batch_size=4)
    corpus = load_stdlib_corpus(setup.corpus_bytes)

    def losses(make_optimizer) -> list[float]:
        model = lm.new_model(corpus, setup)
        optimizer = make_optimizer(model.parameters())
        generator = torch.Generator().manual_seed(1)
        return [lm.train_step(model, optimizer, corpus, setup, generator) for _ in range(STEPS)]

    return losses


def mlp_problem():
    """The conformance table's MLP fitting one batch of its data."""

    def losses(make_optimizer) -> list[float]:
        model = mlp()
        optimizer = make_optimizer(model.parameters())
        out = []
        for _ in range(STEPS):
            optimizer.zero_grad()
            out.append(backward(model, 0).item())
            optimizer.step()
        return out

    return losses


PROBLEMS = {
    "logistic": lambda: digits_problem(lambda: torch.nn.Linear(64, 10), flatten=True),
    "digits CNN": lambda: digits_problem(digits_cnn, flatten=False),
    "tiny Llama": llama_problem,
    "MLP": mlp_problem,
}


def drop(losses: list[float], span: int = 10) -> float:
    """How much the loss fell: the mean of the first ``span`` steps less that of the last."""
    return (sum(losses[:span]) - sum(losses[-span:])) / span


BENCHMARKS = {name: PROBLEMS[name] for name in ("logistic", "digits CNN", "tiny Llama")}


@pytest.mark.parametrize("problem", BENCHMARKS.values(), ids=BENCHMARKS.keys())
def test_defaults_train_the_benchmark_problems_at_least_half_as_well_as_adam_s(problem):
    losses = problem()
    adam = drop(losses(torch.optim.Adam))
    mfac = drop(losses(MFAC))
    assert adam > 0
    assert mfac > 0.5 * adam, f"M-FAC's loss fell by {mfac:.4f}, Adam's by {adam:.4f}"


@pytest.mark.parametrize("problem", PROBLEMS.values(), ids=PROBLEMS.keys())
@pytest.mark.parametrize("window", WINDOWS.values(), ids=WINDOWS.keys())
def test_defaults_train_every_problem_without_raising(problem, window):
    """With either window; at 1% a model this small keeps a handful of entries per
    gradient (7 of the MLP's 51), so only the fall of the loss is asked for."""
    losses = problem()(lambda params: MFAC(params, **window))
    assert all(loss == loss for loss in losses)
    assert drop(losses) > 0
