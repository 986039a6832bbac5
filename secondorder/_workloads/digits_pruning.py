"""Pruning small digits classifiers: train a dense model, prune copies of it one-shot or
gradually with M-FAC OBS and magnitude, measure test accuracy. Shared by ``secondorder
prune``, the demo's pruning section, ``examples/prune_digits.py`` and
``benchmarks/prune_bench.py``."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._progress import progress
from ..prune import MagnitudePruner, MFACPruner, Pruner, cubic_sparsity_schedule, keep_masks_applied
from .data import Split, load_digits
from .models import digits_cnn, digits_mlp
from .training import evaluate, train_classifier

MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": digits_mlp, "cnn": digits_cnn}
METHODS = ("M-FAC", "magnitude")
# Each M-FAC gradient is the mean over a mini-batch of this many training images.
PRUNE_BATCH = 16


def train_dense(
    kind: str,
    train: Split,
    test: Split,
    *,
    epochs: int = 30,
    seed: int = 0,
    show_progress: bool = False,
) -> tuple[nn.Module, float]:
    """Train the digits ``"mlp"`` (64-128-10) or ``"cnn"`` with AdamW; return it and its test accuracy."""
    torch.manual_seed(seed)
    model = MODELS[kind]()
    result = train_classifier(
        kind, model, lambda params: torch.optim.AdamW(params, lr=2e-3), train, test,
        epochs=epochs, batch_size=32, seed=seed, show_progress=show_progress,
    )  # fmt: skip
    return model, result.test_accuracy


def pruning_batches(train: Split, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training set in shuffled mini-batches of ``PRUNE_BATCH``: the data M-FAC draws gradients from."""
    return list(train.batches(PRUNE_BATCH, torch.Generator().manual_seed(seed)))


def make_pruner(
    method: str,
    model: nn.Module,
    train: Split,
    *,
    seed: int = 0,
    show_progress: bool = False,
    **options,
) -> Pruner:
    """``"M-FAC"`` (cross-entropy, :func:`pruning_batches`) or ``"magnitude"``; ``options`` go to the pruner."""
    if method == "magnitude":
        return MagnitudePruner(model, **options)
    loss = nn.functional.cross_entropy
    return MFACPruner(model, loss, pruning_batches(train, seed), progress=show_progress, **options)


@dataclass(frozen=True)
class OneShot:
    """What one ``prune()`` call did to a copy of the model: test accuracy and loss, seconds."""

    accuracy: float
    loss: float
    seconds: float


def one_shot(
    model: nn.Module, method: str, sparsity: float, train: Split, test: Split, **options
) -> OneShot:
    """Prune a copy of ``model`` by one ``prune(sparsity)`` call and evaluate it on ``test``."""
    pruned = copy.deepcopy(model)
    prune_options = {k: options.pop(k) for k in ("recompute_steps", "n_m") if k in options}
    pruner = make_pruner(method, pruned, train, **options)
    start = time.perf_counter()
    pruner.prune(sparsity, **prune_options)
    seconds = time.perf_counter() - start
    loss, accuracy = evaluate(pruned, test)
    return OneShot(accuracy, loss, seconds)


def gradual(
    model: nn.Module,
    method: str,
    sparsity: float,
    train: Split,
    test: Split,
    *,
    epochs: int = 4,
    prune_every: int = 10,
    seed: int = 0,
    show_progress: bool = False,
    **options,
) -> float:
    """Accuracy of a copy of ``model`` pruned while fine-tuning, on the cubic schedule.

    AdamW fine-tunes for ``epochs``; the sparsity rises from 0 to ``sparsity``
    over the first half of the steps, one ``prune()`` every ``prune_every``
    steps, and the masks are kept on the weights after each optimiser step.
    Each ``prune()`` takes one step; ``options`` go to the pruner.
    """
    model = copy.deepcopy(model)
    pruner = make_pruner(method, model, train, seed=seed, show_progress=show_progress, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    keep_masks_applied(optimizer, model)
    steps_per_epoch = -(-len(train) // 32)
    schedule = cubic_sparsity_schedule(0.0, sparsity, 0, epochs * steps_per_epoch // 2, prune_every)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        for inputs, targets in train.batches(32, generator):
            if schedule.is_pruning_step(step):
                pruner.prune(schedule(step), recompute_steps=1)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
            step += 1
    return evaluate(model, test)[1]


@dataclass
class Comparison:
    """Test accuracy per sparsity for each method and mode (``"one-shot"``, ``"gradual"``)."""

    model: str
    dense_accuracy: float
    sparsities: list[float]
    accuracy: dict[tuple[str, str], list[float]]

    def header(self) -> list[str]:
        return ["sparsity", *(f"{method} {mode}" for method, mode in self.accuracy)]

    def rows(self) -> list[list[str]]:
        return [
            [f"{s:.2f}", *(f"{values[i]:.3f}" for values in self.accuracy.values())]
            for i, s in enumerate(self.sparsities)
        ]


def compare(
    kind: str,
    sparsities: Sequence[float],
    *,
    gradual_epochs: int = 0,
    train_epochs: int = 30,
    mfac_options: dict | None = None,
    seed: int = 0,
    show_progress: bool = False,
) -> Comparison:
    """Train the digits ``kind`` model, then prune copies to each sparsity with both methods.

    One-shot always, with ``MFACPruner``'s defaults unless ``mfac_options`` (pruner
    arguments and ``recompute_steps``) says otherwise; gradual (with
    ``gradual_epochs`` of fine-tuning) when ``gradual_epochs > 0``.
    """
    train, test = load_digits()
    model, dense = train_dense(
        kind, train, test, epochs=train_epochs, seed=seed, show_progress=show_progress
    )
    options = {method: dict(mfac_options or {}) if method == "M-FAC" else {} for method in METHODS}
    modes = ["one-shot", "gradual"] if gradual_epochs > 0 else ["one-shot"]
    runs = [(method, mode, s) for mode in modes for method in METHODS for s in sparsities]
    accuracy: dict[tuple[str, str], list[float]] = {}
    # one bar over every pruned copy; the pruners themselves stay silent
    for method, mode, s in progress(runs, desc=f"digits {kind}: pruning", enabled=show_progress):
        if mode == "one-shot":
            result = one_shot(model, method, s, train, test, **options[method]).accuracy
        else:
            settings = {k: v for k, v in options[method].items() if k != "recompute_steps"}
            result = gradual(
                model, method, s, train, test, epochs=gradual_epochs, seed=seed, **settings
            )
        accuracy.setdefault((method, mode), []).append(result)
    return Comparison(kind, dense, list(sparsities), accuracy)


def plot_sparsity_accuracy(comparisons: Sequence[Comparison], path: Path) -> Path | None:
    """Test accuracy against sparsity, one panel per model; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, panels = plt.subplots(
        1, len(comparisons), figsize=(5.2 * len(comparisons), 3.8), squeeze=False
    )
    for axes, comparison in zip(panels[0], comparisons, strict=True):
        for (method, mode), values in comparison.accuracy.items():
            axes.plot(
                comparison.sparsities, values, "-" if mode == "one-shot" else "--", marker="o",
                color=f"C{METHODS.index(method)}", label=f"{method} {mode}",
            )  # fmt: skip
        axes.axhline(comparison.dense_accuracy, color="grey", lw=0.8, label="dense")
        axes.set(
            title=f"digits {comparison.model}",
            xlabel="sparsity",
            ylabel="test accuracy",
            ylim=(0, 1),
        )
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
