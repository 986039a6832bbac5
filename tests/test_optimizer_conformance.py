"""Every optimiser against the ``torch.optim`` contract and the tools around it.

Each test is one generic check, run on every row of :data:`_conformance.ROWS` (MFAC dense
and sparse, GaLoreAdamW, NaturalGaLore, DCTAdamW, SST). A strict ``xfail`` marks a row
that fails a check today, with the issue item that fixes it.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from _conformance import (
    assert_identical,
    assert_same_weights,
    backward,
    cases,
    loss_of,
    mlp,
    round_trip,
    snapshot,
    train,
)
from torch import nn

from secondorder.errors import NonFiniteError, SkippedStepWarning


def twins(row, **overrides):
    """Two identical models, each with its optimiser."""
    models = [mlp(), mlp()]
    return [(m, row.build(m.parameters(), **overrides)) for m in models]


def assert_twins_agree(first, second, steps: int = 3, start: int = 10) -> None:
    """Both pairs train ``steps`` more steps bit-identically, with identical state."""
    for model, optimizer in (first, second):
        train(model, optimizer, steps, first=start)
    assert_same_weights(first[0], second[0])
    assert_identical(first[1].state_dict(), second[1].state_dict())


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("row", cases("state_dict"))
def test_state_dict_through_torch_save_resumes_bit_identically(row, dtype):
    reference = mlp(dtype=dtype)
    train(reference, row.build(reference.parameters()), 5)

    interrupted = mlp(dtype=dtype)
    optimizer = row.build(interrupted.parameters())
    train(interrupted, optimizer, 3)
    saved = round_trip({"model": interrupted.state_dict(), "optimizer": optimizer.state_dict()})
    resumed = mlp(seed=5, dtype=dtype)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = row.build(resumed.parameters())
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train(resumed, resumed_optimizer, 2, first=3)
    assert_same_weights(reference, resumed)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("row", cases("dcp"))
def test_distributed_checkpoint_round_trip_in_one_process(row, tmp_path):
    """``get_state_dict`` → ``dcp.save`` → fresh model and optimiser → ``dcp.load`` →
    ``set_state_dict`` resumes bit-identically (DCP first steps a fresh optimiser once with
    zero gradients and lr 0 to create its state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    reference = mlp()
    train(reference, row.build(reference.parameters()), 5)

    interrupted = mlp()
    optimizer = row.build(interrupted.parameters())
    train(interrupted, optimizer, 3)
    model_state, optimizer_state = get_state_dict(interrupted, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp_path)

    resumed = mlp(seed=5)
    resumed_optimizer = row.build(resumed.parameters())
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp_path)
    set_state_dict(
        resumed,
        resumed_optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state,
    )
    train(resumed, resumed_optimizer, 2, first=3)
    assert_same_weights(reference, resumed)


def _bad_group_setting(row, state):
    state["param_groups"][-1]["lr"] = -1.0
    return state


def _missing_group(row, state):
    """One group fewer, the others with another lr (a half-load would show)."""
    state["param_groups"] = [{**g, "lr": g["lr"] / 2} for g in state["param_groups"][:-1]]
    return state


def _another_model(row, state):
    """The state of the same optimiser, with another lr, for a model of another width."""
    other = mlp(width=7)
    optimizer = row.build(other.parameters(), lr=row.settings["lr"] / 2)
    train(other, optimizer, 3)
    return optimizer.state_dict()


CORRUPTIONS = {
    "bad_group_setting": _bad_group_setting,
    "missing_group": _missing_group,
    "another_model": _another_model,
}


@pytest.mark.parametrize(("row", "corrupt"), cases("refused_load", CORRUPTIONS))
def test_a_refused_load_changes_nothing(row, corrupt):
    """A state_dict the optimiser cannot take raises ``ValueError``, and the optimiser then
    trains exactly as its twin that never saw it."""
    (model, optimizer), twin = twins(row)
    for m, o in ((model, optimizer), twin):
        train(m, o, 3)
    bad = corrupt(row, copy.deepcopy(optimizer.state_dict()))
    with pytest.raises(ValueError):
        optimizer.load_state_dict(bad)
    assert_twins_agree((model, optimizer), twin)


# ------------------------------------------------------------------ groups and gradients


@pytest.mark.parametrize("row", cases("add_param_group"))
def test_add_param_group_equals_building_with_every_group(row):
    whole, grown = mlp(), mlp()
    whole_optimizer = row.build(whole.parameters())
    grown_optimizer = row.build(grown[0].parameters())
    for group in row.group(list(grown[2].parameters())):
        grown_optimizer.add_param_group(group)
    train(whole, whole_optimizer, 4)
    train(grown, grown_optimizer, 4)
    assert_same_weights(whole, grown)


@pytest.mark.parametrize("row", cases("zero_grad"))
def test_zero_grad_set_to_none_then_step_changes_nothing(row):
    model = mlp()
    optimizer = row.build(model.parameters())
    train(model, optimizer, 2)
    backward(model, 2)
    optimizer.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    before = snapshot(model, optimizer)
    optimizer.step()
    assert_identical(snapshot(model, optimizer), before)


@pytest.mark.parametrize("row", cases("no_grad"))
def test_a_parameter_without_gradient_is_left_alone(row):
    model = mlp()
    unused = nn.Parameter(torch.randn(5, 4))  # requires grad, never reaches the loss
    optimizer = row.build([*model.parameters(), unused])
    kept = unused.detach().clone()
    train(model, optimizer, 4)
    assert torch.equal(unused, kept) and unused.grad is None
    state = optimizer.state.get(unused, {})  # nothing, or (MFAC) a step count still at zero
    assert set(state) <= {"step"} and float(state.get("step", 0)) == 0


@pytest.mark.parametrize("row", cases("unfrozen"))
def test_a_frozen_parameter_stays_put_and_trains_once_unfrozen(row):
    model = mlp()
    model[0].weight.requires_grad_(False)
    optimizer = row.build(model.parameters())
    frozen = model[0].weight.detach().clone()
    train(model, optimizer, 3)
    assert torch.equal(model[0].weight, frozen)
    model[0].weight.requires_grad_(True)
    train(model, optimizer, 3, first=3)
    assert not torch.equal(model[0].weight, frozen), "the unfrozen weight was never updated"


@pytest.mark.parametrize("row", cases("closure"))
def test_step_with_a_closure_equals_step_after_backward(row):
    (model, optimizer), (plain, plain_optimizer) = twins(row)
    for step in range(3):

        def closure(step=step):
            optimizer.zero_grad()
            return backward(model, step)

        loss = optimizer.step(closure)
        plain_optimizer.zero_grad()
        expected = backward(plain, step)
        plain_optimizer.step()
        assert torch.equal(loss, expected)
    assert_same_weights(model, plain)


def _cosine(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4, eta_min=1e-3)


def _one_cycle(optimizer):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=8)


#: the group settings LR schedulers write (OneCycleLR cycles momentum or betas too)
SCHEDULED = ("lr", "momentum", "betas")


@pytest.mark.parametrize("schedule", [_cosine, _one_cycle], ids=["cosine", "one_cycle"])
@pytest.mark.parametrize("row", cases("scheduler"))
def test_lr_schedulers_drive_every_step(row, schedule):
    """A scheduled run equals one whose group settings (lr, and momentum or betas for
    OneCycleLR) are set by hand to the same values before each step."""
    (model, optimizer), (manual, manual_optimizer) = twins(row)
    scheduler = schedule(optimizer)
    seen = set()
    for step in range(6):
        for group, copied in zip(
            optimizer.param_groups, manual_optimizer.param_groups, strict=True
        ):
            copied.update({k: group[k] for k in SCHEDULED if k in group})
            seen.add(float(group["lr"]))
        train(model, optimizer, 1, first=step)
        train(manual, manual_optimizer, 1, first=step)
        scheduler.step()
    assert len(seen) > 3
    assert_same_weights(model, manual)


@pytest.mark.parametrize("row", cases("hooks"))
def test_step_and_state_dict_hooks_fire(row):
    model = mlp()
    optimizer = row.build(model.parameters())
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("step_pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("step_post"))
    optimizer.register_state_dict_pre_hook(lambda *_: calls.append("state_dict_pre"))
    optimizer.register_state_dict_post_hook(lambda *_: calls.append("state_dict_post"))
    optimizer.register_load_state_dict_pre_hook(lambda *_: calls.append("load_pre"))
    optimizer.register_load_state_dict_post_hook(lambda *_: calls.append("load_post"))
    train(model, optimizer, 1)
    assert calls == ["step_pre", "step_post"]
    state = optimizer.state_dict()
    assert calls[2:] == ["state_dict_pre", "state_dict_post"]
    optimizer.load_state_dict(state)
    assert calls[4:] == ["load_pre", "load_post"]


# ------------------------------------------------------------------ precision and compilation


@pytest.mark.parametrize("row", cases("grad_scaler"))
def test_cpu_autocast_with_grad_scaler(row):
    """Scaled by a power of two, unscaled exactly: the same steps as without the scaler; an
    Inf gradient makes the scaler skip the step, leaving weights and state as they were."""
    (model, optimizer), (plain, plain_optimizer) = twins(row)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(3):
        for m, o in ((model, optimizer), (plain, plain_optimizer)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(m, step)
            if o is optimizer:
                scaler.scale(loss).backward()
                scaler.step(o)
                scaler.update()
            else:
                loss.backward()
                o.step()
    assert_same_weights(model, plain)

    before = snapshot(model, optimizer)
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, 3)
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**7
    assert_identical(snapshot(model, optimizer), before)


@pytest.mark.parametrize("row", cases("bf16"))
def test_bf16_weights_train_and_stay_bf16(row):
    model = mlp(dtype=torch.bfloat16)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = row.build(model.parameters())
    train(model, optimizer, 3)
    for p, before in zip(model.parameters(), start, strict=True):
        assert p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all())
        assert not torch.equal(p, before)


@pytest.mark.parametrize("row", cases("mixed_dtype"))
def test_float32_and_float64_weights_in_one_optimiser(row):
    model = mlp()
    model[2].double()
    model.forward = lambda x: model[2](model[1](model[0](x)).double())
    dtypes = [p.dtype for p in model.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = row.build(model.parameters())
    train(model, optimizer, 3)
    assert [p.dtype for p in model.parameters()] == dtypes
    for p, before in zip(model.parameters(), start, strict=True):
        assert bool(torch.isfinite(p).all()) and not torch.equal(p, before)


@pytest.mark.slow
@pytest.mark.parametrize("row", cases("compile"))
def test_compiled_model_trains_as_the_eager_one(row):
    (eager, eager_optimizer), (model, optimizer) = twins(row)
    compiled = torch.compile(model)
    train(eager, eager_optimizer, 3)
    train(compiled, optimizer, 3)
    for a, b in zip(eager.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("row", cases("non_finite"))
def test_a_non_finite_gradient_raises_and_changes_nothing(row, bad):
    (model, optimizer), twin = twins(row, nonfinite="raise")
    for m, o in ((model, optimizer), twin):
        train(m, o, 3)
    optimizer.zero_grad()
    backward(model, 3)
    model[2].bias.grad[0] = bad  # the last parameter: all others could have been stepped first
    with pytest.raises(NonFiniteError):
        optimizer.step()
    assert_twins_agree((model, optimizer), twin)


@pytest.mark.parametrize("row", cases("non_finite_skip"))
def test_skip_mode_skips_counts_and_warns(row):
    """nonfinite="skip" (GradScaler's convention): a step with an Inf gradient changes nothing
    but the count of skipped steps, which the state carries through a save, and a
    SkippedStepWarning at the 1st and 10th skip; clean steps go on as without skipping."""
    (model, optimizer), (twin_model, twin) = twins(row, nonfinite="skip")
    for m, o in ((model, optimizer), (twin_model, twin)):
        train(m, o, 3)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(SkippedStepWarning, match="skipped 1 step"):
        for skip in range(10):
            optimizer.zero_grad()
            backward(model, 3)
            model[2].bias.grad[0] = float("inf")
            if skip == 9:
                with pytest.warns(SkippedStepWarning, match="skipped 10 step"):
                    optimizer.step()
            else:
                optimizer.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    first = optimizer.param_groups[0]["params"][0]
    assert optimizer.state[first]["skipped_steps"] == 10
    saved = round_trip(optimizer.state_dict())
    resumed = row.build(mlp().parameters(), nonfinite="skip")
    resumed.load_state_dict(saved)
    assert resumed.state[resumed.param_groups[0]["params"][0]]["skipped_steps"] == 10
    train(model, optimizer, 2, first=3)
    train(twin_model, twin, 2, first=3)
    assert_same_weights(model, twin_model)
    with pytest.raises(ValueError, match="nonfinite must be 'raise', 'skip' or 'skip_on_device'"):
        row.build(mlp().parameters(), nonfinite="ignore")


def _complex_params():
    gen = torch.Generator().manual_seed(3)
    vector = nn.Parameter(torch.randn(5, generator=gen, dtype=torch.complex64))
    matrix = nn.Parameter(torch.randn(5, 4, generator=gen, dtype=torch.complex64))
    return vector, matrix


def _step_complex_and_real_views(row, complex_params):
    """In one group without ``rank`` (so a real view of a vector is not taken for a matrix)."""
    real_params = [nn.Parameter(torch.view_as_real(p.detach()).clone()) for p in complex_params]
    optimizers = [row.make([{"params": complex_params}]), row.make([{"params": real_params}])]
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        for p, q in zip(complex_params, real_params, strict=True):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            q.grad = torch.view_as_real(p.grad).clone()
        for optimizer in optimizers:
            optimizer.step()
    for p, q in zip(complex_params, real_params, strict=True):
        assert torch.equal(torch.view_as_real(p.detach()), q.detach())


@pytest.mark.parametrize("row", cases("complex"))
def test_complex_parameters_step_as_their_real_view_or_are_refused(row):
    """As ``torch.optim.AdamW``: a complex parameter steps exactly as the real tensor
    ``view_as_real`` gives; where the maths does not carry over (a low-rank projection of
    a complex matrix), the constructor refuses it."""
    vector, matrix = _complex_params()
    if row.complex_matrices:
        _step_complex_and_real_views(row, [vector, matrix])
        return
    with pytest.raises(ValueError, match="complex"):
        row.build([vector, matrix])
    _step_complex_and_real_views(row, [vector])


@pytest.mark.parametrize("row", cases("meta"))
def test_meta_parameters_are_refused_at_construction(row):
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(ValueError, match="meta"):
        row.build(model.parameters())


@pytest.mark.parametrize("row", cases("tensor_lr"))
def test_a_one_element_tensor_lr_steps_as_its_value(row):
    """As ``torch.optim``: any one-element tensor is a learning rate, used as its value (a
    scheduler updates it in place); a tensor of several elements is refused."""
    lr = row.settings["lr"]
    models = [mlp() for _ in range(3)]
    optimizers = [
        row.build(models[0].parameters(), lr=torch.tensor([lr])),
        row.build(models[1].parameters(), lr=torch.tensor([[lr]])),
        row.build(models[2].parameters(), lr=float(torch.tensor(lr))),
    ]
    for model, optimizer in zip(models, optimizers, strict=True):
        train(model, optimizer, 3)
    assert_same_weights(models[0], models[2])
    assert_same_weights(models[1], models[2])
    with pytest.raises(ValueError, match="1-element"):
        row.build(mlp().parameters(), lr=torch.tensor([lr, lr]))
    with pytest.raises(ValueError, match="1-element"):  # before params are read, as torch.optim
        row.cls(None, **{**row.settings, "lr": torch.tensor([lr, lr])})


# ------------------------------------------------------------------ copies


def _deepcopy(value):
    return copy.deepcopy(value)


def _pickle(value):
    return pickle.loads(pickle.dumps(value))


@pytest.mark.parametrize("duplicate", [_deepcopy, _pickle], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("row", cases("deepcopy"))
def test_a_copied_optimiser_steps_exactly_as_the_original(row, duplicate):
    model = mlp()
    optimizer = row.build(model.parameters())
    train(model, optimizer, 3)
    copied_model, copied_optimizer = duplicate((model, optimizer))
    assert_identical(copied_optimizer.state_dict(), optimizer.state_dict())
    assert_twins_agree((model, optimizer), (copied_model, copied_optimizer))
    assert_same_weights(model, copied_model)


# ------------------------------------------------------------------ several processes


@pytest.fixture(scope="module")
def two_process_verdicts(tmp_path_factory):
    """One launch of 2 gloo ranks runs every row's DCP round trip under DDP and FSDP2."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not built")
    from _conformance_workers import dcp_round_trips
    from _distributed_workers import launch

    folder = tmp_path_factory.mktemp("dcp")
    launch(dcp_round_trips, str(folder), timeout_s=120)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("row", "mode"), cases("dcp_two_processes", {"ddp": "ddp", "fsdp2": "fsdp2"})
)
def test_distributed_checkpoint_round_trip_on_two_processes(row, mode, two_process_verdicts):
    """As the one-process round trip, on 2 gloo ranks, each with half of every batch."""
    from _conformance_workers import verdict_path

    if mode == "fsdp2" and not row.fsdp2:
        pytest.skip(f"{row.name} does not step FSDP2-sharded parameters (documented)")
    for rank in range(2):
        verdict = verdict_path(two_process_verdicts, mode, row.name, rank).read_text()
        assert verdict == "ok", verdict


# ------------------------------------------------------------------ a Hugging Face Trainer


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=8,
    )
    return LlamaForCausalLM(config)


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        ids = torch.randint(0, 16, (6,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def _trainer_run(row, folder, resume_from=None):
    """4 steps of a tiny Llama in a Trainer, checkpointing after 2; returns the model."""
    from transformers import Trainer, TrainingArguments

    model = _tiny_llama()
    arguments = TrainingArguments(
        str(folder),
        max_steps=4,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    optimizer = row.build(model.parameters())
    trainer = Trainer(
        model=model, args=arguments, train_dataset=_Tokens(), optimizers=(optimizer, None)
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("row", cases("trainer"))
def test_a_transformers_trainer_resumes_from_its_checkpoint_bit_identically(row, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    whole = _trainer_run(row, tmp_path / "whole")
    resumed = _trainer_run(row, tmp_path / "resumed", tmp_path / "whole" / "checkpoint-2")
    assert_same_weights(whole, resumed)
