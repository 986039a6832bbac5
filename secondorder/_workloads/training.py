"""Training and evaluation loops shared by the demo sections."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .._progress import progress
from .data import Split


@dataclass
class RunResult:
    """What one training run produced."""

    name: str
    step_losses: list[float] = field(default_factory=list)
    train_loss: float = float("nan")
    test_loss: float = float("nan")
    test_accuracy: float = float("nan")
    seconds: float = float("nan")
    step_seconds: list[float] = field(default_factory=list)  # each step's wall time
    state_bytes: int = 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimiser's per-parameter state, nested ones included,
    each storage counted once, and of whatever MFAC's gradient window holds outside that
    state (its spare row). The window's rows are in the state, so adding the window's
    ``nbytes`` to the state's would count them twice."""
    optimizer.state_dict()  # MFAC refreshes its state's references to the live buffers
    storages: dict[int, int] = {}

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for state in optimizer.state.values():
        visit(state)
    outside = 0
    try:
        window = getattr(optimizer, "window", None)
    except RuntimeError:  # MFAC before its first gradient
        window = None
    if window is not None:
        shared = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in window.state_dict().values()
            if isinstance(t, torch.Tensor)
        }
        outside = window.nbytes - sum(shared.values())
        storages.update(shared)
    return sum(storages.values()) + max(outside, 0)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split``."""
    model.eval()
    logits = model(split.inputs)
    loss = nn.functional.cross_entropy(logits, split.targets).item()
    accuracy = (logits.argmax(1) == split.targets).float().mean().item()
    return loss, accuracy


def train_classifier(
    name: str,
    model: nn.Module,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    train: Split,
    test: Split,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    show_progress: bool = True,
    on_step: Callable[[int], object] | None = None,
) -> RunResult:
    """Train with cross-entropy on shuffled mini-batches; time the training only.

    ``on_step(step)`` is called after each optimiser step (``step`` counts from 1),
    outside the timed training; the model may be in train mode.
    """
    optimizer = make_optimizer(list(model.parameters()))
    generator = torch.Generator().manual_seed(seed)
    result = RunResult(name)
    steps_per_epoch = -(-len(train) // batch_size)
    bar = progress(range(epochs * steps_per_epoch), desc=name, enabled=show_progress)
    ticks = iter(bar)
    callback_seconds = 0.0
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for inputs, targets in train.batches(batch_size, generator):
            step_start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            result.step_losses.append(loss.item())
            result.step_seconds.append(time.perf_counter() - step_start)
            next(ticks, None)
            if on_step is not None:
                callback_start = time.perf_counter()
                on_step(len(result.step_losses))
                callback_seconds += time.perf_counter() - callback_start
    result.seconds = time.perf_counter() - start - callback_seconds
    if hasattr(bar, "close"):
        bar.close()
    result.state_bytes = optimizer_state_bytes(optimizer)
    result.train_loss, _ = evaluate(model, train)
    result.test_loss, result.test_accuracy = evaluate(model, test)
    return result
