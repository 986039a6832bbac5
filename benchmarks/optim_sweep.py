"""Where the demo's optimiser settings come from, and how M-FAC compares when every method is tuned.

    python benchmarks/optim_sweep.py --part cnn        # the digits CNN of the demo (15 epochs)
    python benchmarks/optim_sweep.py --part logistic   # logistic regression, 3 seeds

cnn       each optimiser of the demo over a small grid, on the demo's CNN and data split.
logistic  multinomial logistic regression on the raw digits (a convex problem): SGD, SGD with
          momentum and M-FAC, each at the best of its grid, mean over 3 seeds, 2 epochs.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from secondorder.demo.data import load_digits
from secondorder.demo.models import digits_cnn
from secondorder.demo.training import train_classifier
from secondorder.optim import MFAC


def cnn_sweep() -> None:
    train, test = load_digits()
    grid = {f"AdamW lr={lr}": lambda p, lr=lr: torch.optim.AdamW(p, lr=lr) for lr in (3e-3, 1e-3)}
    grid["SGD lr=0.1 momentum=0.9"] = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    mfac_grid = [
        (1e-3, 1e-6, 64),
        (1e-2, 1e-2, 64),
        (0.02, 0.03, 64),
        (0.05, 0.1, 64),
        (0.05, 0.1, 128),
    ]
    for lr, damp, n in mfac_grid:
        grid[f"MFAC lr={lr} damp={damp} num_grads={n}"] = lambda p, lr=lr, damp=damp, n=n: MFAC(
            p, lr=lr, damp=damp, num_grads=n
        )
    print("| optimiser | train loss | test accuracy |\n|---|---|---|")
    for name, make in grid.items():
        torch.manual_seed(0)
        r = train_classifier(
            name, digits_cnn(), make, train, test, epochs=15, batch_size=64, show_progress=False
        )
        print(f"| {name} | {r.train_loss:.4f} | {r.test_accuracy:.4f} |", flush=True)


def logistic_loss(make, seed: int, epochs: int = 2) -> float:
    """Final training loss of multinomial logistic regression on the raw digits."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    run = train_classifier(
        "logistic",
        model,
        make,
        *load_digits(),
        epochs=epochs,
        batch_size=32,
        seed=seed,
        show_progress=False,
    )
    return run.train_loss


def logistic_sweep() -> None:
    families = {
        "SGD": [
            (f"lr={lr}", lambda p, lr=lr: torch.optim.SGD(p, lr=lr)) for lr in (1, 2, 3, 5, 10)
        ],
        "SGD + momentum 0.5": [
            (f"lr={lr}", lambda p, lr=lr: torch.optim.SGD(p, lr=lr, momentum=0.5))
            for lr in (1, 2, 3, 5)
        ],
        "MFAC": [
            (
                f"lr={lr} damp={damp} num_grads={n}",
                lambda p, lr=lr, damp=damp, n=n: MFAC(p, lr=lr, damp=damp, num_grads=n),
            )
            for (lr, damp), n in itertools.product(
                [(0.1, 0.01), (0.3, 0.03), (0.3, 0.1), (1, 0.1), (1, 0.3), (0.2, 0.02)], (16, 32)
            )
        ],
    }
    print("| optimiser | best setting | mean final training loss (3 seeds) |\n|---|---|---|")
    for family, settings in families.items():
        scored = [
            (statistics.mean(logistic_loss(make, s) for s in range(3)), label)
            for label, make in settings
        ]
        loss, label = min(scored)
        print(f"| {family} | {label} | {loss:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["cnn", "logistic", "all"], default="all")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("cnn", "all"):
        cnn_sweep()
    if args.part in ("logistic", "all"):
        logistic_sweep()


if __name__ == "__main__":
    main()
