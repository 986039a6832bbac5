"""Prune a digits classifier with OBS on the M-FAC inverse Fisher, against magnitude pruning.

    python examples/prune_digits.py                        # the MLP 64-128-10, about a minute on a CPU
    python examples/prune_digits.py --model cnn --sparsities 0.8 0.9 0.95 --gradual-epochs 0

Trains the model on scikit-learn's digits (seconds), then for every sparsity
prunes copies of it:

- one-shot: one ``prune()`` call, no fine-tuning;
- gradual: a few epochs of fine-tuning while the sparsity follows the cubic
  schedule, with the masks kept on the weights after every optimiser step.

Prints test accuracy per sparsity for both pruners and writes a plot.
(``secondorder prune`` runs the same comparison from the command line.)
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

from secondorder._workloads.data import load_digits
from secondorder._workloads.digits_pruning import Comparison, plot_sparsity_accuracy, train_dense
from secondorder._workloads.training import evaluate
from secondorder.prune import (
    MagnitudePruner,
    MFACPruner,
    cubic_sparsity_schedule,
    keep_masks_applied,
)


def make_pruner(method: str, model: nn.Module, batches: list) -> MFACPruner | MagnitudePruner:
    if method == "magnitude":
        return MagnitudePruner(model)  # every weight of linear and conv layers, ranked globally
    # One gradient per mini-batch of 16 images; the inverse Fisher on blocks of 128 weights.
    return MFACPruner(model, nn.functional.cross_entropy, batches, num_grads=64, progress=False)


def fine_tune_while_pruning(model, method, sparsity, train, batches, epochs: int) -> None:
    pruner = make_pruner(method, model, batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    keep_masks_applied(optimizer, model)  # pruned weights stay exactly zero
    steps = epochs * -(-len(train) // 32)
    schedule = cubic_sparsity_schedule(
        0.0, sparsity, start_step=0, end_step=steps // 2, frequency=10
    )
    step = 0
    for _ in range(epochs):
        for inputs, targets in train.batches(32, torch.Generator().manual_seed(step)):
            if schedule.is_pruning_step(step):
                pruner.prune(schedule(step), recompute_steps=1)  # small steps: one each
            model.train()
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
            step += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--gradual-epochs", type=int, default=4, help="0: one-shot only")
    parser.add_argument("--out", default="runs/prune_digits")
    args = parser.parse_args()

    train, test = load_digits()
    model, dense_accuracy = train_dense(args.model, train, test)
    batches = list(train.batches(16, torch.Generator().manual_seed(0)))
    print(f"digits {args.model}: dense test accuracy {dense_accuracy:.3f}")

    modes = ["one-shot"] + (["gradual"] if args.gradual_epochs > 0 else [])
    accuracy = {(method, mode): [] for mode in modes for method in ("M-FAC", "magnitude")}
    for sparsity in args.sparsities:
        for method, mode in accuracy:
            pruned = copy.deepcopy(model)
            if mode == "one-shot":
                make_pruner(method, pruned, batches).prune(sparsity)
            else:
                fine_tune_while_pruning(
                    pruned, method, sparsity, train, batches, args.gradual_epochs
                )
            accuracy[method, mode].append(evaluate(pruned, test)[1])
        row = "  ".join(
            f"{method} {mode}: {values[-1]:.3f}" for (method, mode), values in accuracy.items()
        )
        print(f"sparsity {sparsity:.2f}  {row}", flush=True)

    comparison = Comparison(args.model, dense_accuracy, args.sparsities, accuracy)
    figure = plot_sparsity_accuracy([comparison], Path(args.out) / "sparsity_accuracy.png")
    print(f"plot: {figure}" if figure else "no plot: install matplotlib (the plot extra)")


if __name__ == "__main__":
    main()
