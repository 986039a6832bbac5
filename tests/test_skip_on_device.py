"""``nonfinite="skip_on_device"``: a step whose gradients hold NaN or Inf is skipped on the
device (every write masked by ``found_inf``), counted there, and reported every
``skip_report_every`` steps; a step that is taken is the step ``"raise"`` takes, bit for bit
(on a CPU). ``tests/test_host_syncs.py`` counts what it spares the host.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from _conformance import assert_identical, backward, mlp, round_trip, snapshot
from torch import nn

from secondorder.errors import SkippedStepWarning
from secondorder.nn import to_spectral
from secondorder.optim import MFAC, SST, DCTAdamW, GaLoreAdamW, NaturalGaLore

GAP = 3  # refreshes (SST: round boundaries) at step counts 0, 3, 6, ...


def _groups(params, gap=GAP):
    params = list(params)
    return [
        {"params": [p for p in params if p.dim() < 2]},
        {"params": [p for p in params if p.dim() >= 2], "rank": 2, "update_proj_gap": gap},
    ]


#: name → (model → (model, optimizer)); the model may be converted (SST's spectral mode)
OPTIMISERS: dict[str, Callable[..., tuple[nn.Module, torch.optim.Optimizer]]] = {
    "GaLoreAdamW": lambda m, **kw: (m, GaLoreAdamW(_groups(m.parameters()), lr=0.02, **kw)),
    "NaturalGaLore": lambda m, **kw: (
        m,
        NaturalGaLore(_groups(m.parameters()), lr=0.02, history=3, damp=1e-3, **kw),
    ),
    # DCTAdamW's default: the columns are chosen again every step, a refresh masked on the device
    "DCTAdamW": lambda m, **kw: (m, DCTAdamW(_groups(m.parameters(), gap=1), lr=0.02, **kw)),
    "DCTAdamW-gap3": lambda m, **kw: (m, DCTAdamW(_groups(m.parameters()), lr=0.02, **kw)),
    "SST": lambda m, **kw: (m, SST(_groups(m.parameters()), lr=0.02, rewarmup_steps=2, **kw)),
    "SST-spectral": lambda m, **kw: (
        (spectral := to_spectral(m, 2)),
        SST(spectral, lr=0.02, update_proj_gap=GAP, rewarmup_steps=2, **kw),
    ),
}


def build(name, nonfinite="skip_on_device", dtype=torch.float32, **kw):
    model = mlp(dtype=dtype)
    return OPTIMISERS[name](model, weight_decay=0.01, nonfinite=nonfinite, **kw)


def poison(model: nn.Module, bad: float) -> None:
    """A NaN or Inf in the gradient of the last parameter (the others could be stepped first)."""
    params = [p for p in model.parameters() if p.grad is not None]
    params[-1].grad.view(-1)[0] = bad


def step(model, optimizer, batch: int, bad: float | None = None) -> list[warnings.WarningMessage]:
    """One step on ``batch`` (poisoned with ``bad``); the warnings it issued."""
    optimizer.zero_grad()
    backward(model, batch)
    if bad is not None:
        poison(model, bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    return [w for w in caught if issubclass(w.category, SkippedStepWarning)]


def counters_as_ints(value):
    """A state dict with its step counters as ints and without the skip count: what
    ``"raise"`` keeps."""
    if isinstance(value, dict):
        return {
            key: int(item)
            if key in ("step", "round_step") and isinstance(item, torch.Tensor)
            else counters_as_ints(item)
            for key, item in value.items()
            if key != "skipped_steps"
        }
    if isinstance(value, list):
        return [counters_as_ints(item) for item in value]
    return value


def assert_same_run(a, b) -> None:
    """Two (model, optimizer) pairs hold bit-identical weights and state (counters as ints)."""
    for (name, x), y in zip(a[0].named_parameters(), b[0].parameters(), strict=True):
        assert torch.equal(x, y), name
    assert_identical(counters_as_ints(a[1].state_dict()), counters_as_ints(b[1].state_dict()))


def skipped(optimizer) -> torch.Tensor:
    return optimizer.state[optimizer.param_groups[0]["params"][0]]["skipped_steps"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["steady", "refresh"])
@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_a_skipped_step_changes_nothing_and_the_next_ones_are_those_of_raise(name, where, bad):
    """The poisoned step leaves weights and state bit-identical but for the count of
    skipped steps; afterwards, through refreshes, the run is the run of ``"raise"`` on the
    same finite gradients, bit for bit."""
    on_device = build(name, skip_report_every=1000)
    reference = build(name, nonfinite="raise")
    spectral = name == "SST-spectral"  # its rounds end on the step whose count reaches GAP
    first_bad = GAP + (1 if where == "steady" else 0) - (1 if spectral else 0)
    for batch in range(first_bad):
        step(*on_device, batch)
        step(*reference, batch)
    before = snapshot(*on_device)
    assert not step(*on_device, first_bad, bad)  # reported at the interval only
    after = snapshot(*on_device)
    assert int(skipped(on_device[1])) == 1
    for state in (before["optimizer"]["state"], after["optimizer"]["state"]):
        state[0].pop("skipped_steps", None)
    assert_identical(after, before)
    assert_same_run(on_device, reference)
    for batch in range(first_bad + 1, first_bad + 2 * GAP + 1):  # two more refreshes
        step(*on_device, batch)
        step(*reference, batch)
    assert_same_run(on_device, reference)
    assert int(skipped(on_device[1])) == 1


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_skips_are_reported_every_so_many_steps_and_survive_a_checkpoint(name):
    """A skip is counted on the device and reported when the count is read, every
    ``skip_report_every`` steps: at most one warning per interval, none if nothing was
    skipped in it. The count goes through ``torch.save`` / ``torch.load(weights_only=True)``
    and the resumed optimiser does not report the old skips again."""
    model, optimizer = build(name, skip_report_every=4)
    for call, bad in enumerate([None, float("nan"), float("nan"), None, None, None, None, None]):
        warned = step(model, optimizer, call, bad)
        if call == 3:  # the 4th step reads the count: two skips since the last read
            assert len(warned) == 1
            assert "skipped 2 step(s)" in str(warned[0].message)
            assert "2 of them in the last 4 steps" in str(warned[0].message)
        else:
            assert not warned, call
    count = skipped(optimizer)
    assert isinstance(count, torch.Tensor) and count.dtype == torch.int64 and int(count) == 2

    saved = round_trip({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    resumed_model, resumed = build(name, skip_report_every=4)
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["optimizer"])
    assert int(skipped(resumed)) == 2
    for call in range(8, 12):  # in step with the original, and silent: no new skip
        assert not step(model, optimizer, call)
        assert not step(resumed_model, resumed, call)
    assert_same_run((model, optimizer), (resumed_model, resumed))
    assert step(resumed_model, resumed, 12, float("inf")) == []
    warned = [w for call in range(13, 16) for w in step(resumed_model, resumed, call)]
    assert len(warned) == 1 and "skipped 3 step(s)" in str(warned[0].message)


@pytest.mark.parametrize("name", ["GaLoreAdamW", "SST"])
def test_bf16_weights_are_left_bit_identical_by_a_skipped_step(name):
    model, optimizer = build(name, dtype=torch.bfloat16)
    for batch in range(4):
        step(model, optimizer, batch)
    before = snapshot(model, optimizer)
    step(model, optimizer, 4, float("nan"))
    after = snapshot(model, optimizer)
    for state in (before["optimizer"]["state"], after["optimizer"]["state"]):
        state[0].pop("skipped_steps", None)
    assert_identical(after, before)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("name", ["GaLoreAdamW", "DCTAdamW-gap3", "SST", "SST-spectral"])
def test_a_state_moves_between_policies(name):
    """A state saved under ``"raise"`` loads under ``"skip_on_device"`` (its counters become
    device tensors) and back (ints again); either way the run goes on as it would have."""
    reference = build(name, nonfinite="raise")
    for batch in range(4):
        step(*reference, batch)
    saved = round_trip({"model": reference[0].state_dict(), "optimizer": reference[1].state_dict()})
    on_device = build(name)
    on_device[0].load_state_dict(saved["model"])
    on_device[1].load_state_dict(saved["optimizer"])
    state = next(s for s in on_device[1].state.values() if "step" in s)
    assert isinstance(state["step"], torch.Tensor)
    for batch in range(4, 8):
        step(*reference, batch)
        step(*on_device, batch)
    assert_same_run(on_device, reference)

    saved = round_trip({"model": on_device[0].state_dict(), "optimizer": on_device[1].state_dict()})
    back = build(name, nonfinite="raise")
    back[0].load_state_dict(saved["model"])
    back[1].load_state_dict(saved["optimizer"])
    state = next(s for s in back[1].state.values() if "step" in s)
    assert isinstance(state["step"], int)
    for batch in range(8, 11):
        step(*reference, batch)
        step(*back, batch)
    assert_same_run(back, reference)


def test_mfac_refuses_it_and_says_why():
    with pytest.raises(ValueError, match="MFAC does not support nonfinite='skip_on_device'"):
        MFAC(mlp().parameters(), nonfinite="skip_on_device")


def test_layerwise_refuses_it():
    with pytest.raises(ValueError, match="cannot be combined with layerwise=True"):
        GaLoreAdamW(mlp().parameters(), layerwise=True, nonfinite="skip_on_device")


def test_skip_report_every_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="skip_report_every"):
        GaLoreAdamW(mlp().parameters(), nonfinite="skip_on_device", skip_report_every=0)


@pytest.mark.filterwarnings("ignore::secondorder.errors.SkippedStepWarning")
@pytest.mark.parametrize("nonfinite", ["skip", "skip_on_device"])
@pytest.mark.parametrize("cls", [GaLoreAdamW, SST])
def test_a_skipped_first_step_of_a_claimed_first_parameter_is_not_its_first_step(cls, nonfinite):
    """The count of skips lives in the first parameter's state; when that parameter is a
    matrix the optimiser steps its own way and its first step is skipped, its state holds
    the count alone, and its next step still starts from step 0 (it raised KeyError)."""
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(6, 4, generator=gen))
    bias = nn.Parameter(torch.randn(6, generator=gen))
    groups = [{"params": [weight], "rank": 2, "update_proj_gap": 2}, {"params": [bias]}]
    optimizer = cls(groups, lr=0.1, nonfinite=nonfinite)
    weight.grad, bias.grad = torch.full_like(weight, float("nan")), torch.ones_like(bias)
    optimizer.step()
    assert set(optimizer.state[weight]) == {"skipped_steps"}
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert int(optimizer.state[weight]["step"]) == 1
    assert int(optimizer.state[weight]["skipped_steps"]) == 1


def test_a_subclass_that_does_not_mask_its_claimed_steps_is_decided_on_the_host():
    """An AdamWCore subclass written without the policy in mind (docs/architecture.md's
    signSGD on matrices) writes its claimed parameters directly: under skip_on_device its
    steps are decided on the host, so a NaN step still changes nothing."""
    from secondorder.optim.adamw_core import AdamWCore
    from secondorder.optim.functional import decoupled_decay_

    class SignMatrices(AdamWCore):
        def __init__(self, params, **kw):
            adamw = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
            super().__init__(params, {"lr": 0.1, **adamw}, **kw)

        def _claims(self, p, group):
            return p.dim() >= 2

        def _apply(self, p, group, prepared):
            decoupled_decay_(p, group["lr"], group["weight_decay"])
            p.add_(p.grad.sign(), alpha=-group["lr"])

    model = mlp()
    optimizer = SignMatrices(model.parameters(), nonfinite="skip_on_device")
    step(model, optimizer, 0)
    before = snapshot(model, optimizer)
    model.zero_grad()
    backward(model, 1)
    model[0].weight.grad[0, 0] = float("nan")
    optimizer.step()
    after = snapshot(model, optimizer)
    for state in (before["optimizer"]["state"], after["optimizer"]["state"]):
        state[0].pop("skipped_steps", None)
    assert_identical(after, before)
    assert int(skipped(optimizer)) == 1
