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
    state_bytes: int = 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimiser's per-parameter state, nested ones included,
    and of MFAC's gradient window, which lives beside that state."""

    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0

    window = getattr(optimizer, "window", None)
    return sum(size(state) for state in optimizer.state.values()) + (window.nbytes if window else 0)


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
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            result.step_losses.append(loss.item())
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
