"""Where the demo's optimiser settings come from, and how M-FAC compares when every method is tuned.

    python benchmarks/optim_sweep.py --part cnn        # the digits CNN of the demo (15 epochs)
    python benchmarks/optim_sweep.py --part logistic   # logistic regression, 3 seeds
    python benchmarks/optim_sweep.py --part sparse     # dense against sparse (EFCP) M-FAC

cnn       each optimiser of the demo over a small grid, on the demo's CNN and data split.
logistic  multinomial logistic regression on the raw digits (a convex problem): SGD, SGD with
          momentum and M-FAC, each at the best of its grid, mean over 3 seeds, 2 epochs.
sparse    dense M-FAC against the sparse window at 1%, 5% and 10% density, with and without
          error feedback, at the dense optimiser's tuned lr and damp: the CNN (5 seeds, test
          accuracy and loss), the logistic regression (3 seeds) and the tiny Llama of the
          low-rank benchmark against AdamW (3 seeds, 300 steps; --llama-steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
from collections.abc import Callable

import torch

from secondorder.demo import lowrank
from secondorder.demo.data import load_digits, load_stdlib_corpus
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


def mean_std(values: list[float], digits: int = 4) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def sparse_variants(lr: float, damp: float, num_grads: int) -> dict[str, Callable]:
    """Dense M-FAC and its sparse windows, all at the dense optimiser's lr and damp."""
    variants = {
        "MFAC dense": lambda p: MFAC(p, lr=lr, damp=damp, num_grads=num_grads),
    }
    for error_feedback in (True, False):
        for density in (0.01, 0.05, 0.1):
            name = f"MFAC sparse {density:.0%}" + ("" if error_feedback else ", no error feedback")
            variants[name] = lambda p, density=density, error_feedback=error_feedback: MFAC(
                p,
                lr=lr,
                damp=damp,
                num_grads=num_grads,
                density=density,
                error_feedback=error_feedback,
            )
    return variants


def window_bytes(make: Callable, model: torch.nn.Module) -> int:
    return make(list(model.parameters())).window.nbytes


def sparse_cnn(seeds: int = 5) -> None:
    train, test = load_digits()
    variants = sparse_variants(lr=0.05, damp=0.1, num_grads=64)  # the demo's tuned MFAC
    print("| optimiser | test accuracy | test loss | window bytes |\n|---|---|---|---|", flush=True)
    for name, make in variants.items():
        accuracies, losses = [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            run = train_classifier(
                name, digits_cnn(), make, train, test,
                epochs=15, batch_size=64, seed=seed, show_progress=False,
            )  # fmt: skip
            accuracies.append(run.test_accuracy)
            losses.append(run.test_loss)
        nbytes = window_bytes(make, digits_cnn())
        print(f"| {name} | {mean_std(accuracies)} | {mean_std(losses)} | {nbytes:,} |", flush=True)


def sparse_logistic(seeds: int = 3) -> None:
    train, test = load_digits()
    variants = sparse_variants(lr=0.2, damp=0.02, num_grads=32)  # the tuned MFAC of --part logistic
    print(
        "| optimiser | final training loss | test accuracy | window bytes |\n|---|---|---|---|",
        flush=True,
    )
    for name, make in variants.items():
        losses, accuracies = [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
            run = train_classifier(
                name, model, make, train, test,
                epochs=2, batch_size=32, seed=seed, show_progress=False,
            )  # fmt: skip
            losses.append(run.train_loss)
            accuracies.append(run.test_accuracy)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        print(
            f"| {name} | {mean_std(losses)} | {mean_std(accuracies)} | "
            f"{window_bytes(make, model):,} |",
            flush=True,
        )


def sparse_llama(seeds: int = 3, steps: int = 300) -> None:
    """AdamW at its best rate of the low-rank benchmark's sweep; M-FAC at the best point of a
    15-point grid (lr 1e-3 to 0.3, damp 1e-4 to 0.1, num_grads 64; issue 15's figures)."""

    def mfac(**options):
        def build(model, setup, lr):
            return model, MFAC(model.parameters(), lr=lr, damp=0.03, num_grads=64, **options)

        return build

    runs = {
        "AdamW": (lowrank.OPTIMIZERS["AdamW"][0], 1e-3),
        "MFAC dense": (mfac(), 0.03),
        "MFAC sparse 1%": (mfac(density=0.01), 0.03),
        "MFAC sparse 1%, no error feedback": (mfac(density=0.01, error_feedback=False), 0.03),
    }
    base = dataclasses.replace(lowrank.LMSetup(), steps=steps)
    corpus = load_stdlib_corpus(base.corpus_bytes)
    print(
        f"| optimiser ({steps} steps) | lr | valid loss (nats/byte) | tokens/s | "
        "optimiser state |\n|---|---|---|---|---|",
        flush=True,
    )
    for name, (build, lr) in runs.items():
        results = [
            lowrank.train_lm(
                name, build, lr, corpus, dataclasses.replace(base, seed=seed), show_progress=False
            )
            for seed in range(seeds)
        ]
        losses = [r.valid_loss for r in results]
        speed = statistics.median(r.tokens_per_second for r in results)
        state = results[0].state_bytes
        print(
            f"| {name} | {lr:g} | {mean_std(losses, 3)} | {speed:,.0f} | {state / 2**20:.2f} MiB |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part",
        choices=[
            "cnn",
            "logistic",
            "sparse",
            "sparse-cnn",
            "sparse-logistic",
            "sparse-llama",
            "all",
        ],
        default="all",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llama-steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("cnn", "all"):
        cnn_sweep()
    if args.part in ("logistic", "all"):
        logistic_sweep()
    if args.part in ("sparse", "sparse-cnn", "all"):
        print("\n## Sparse M-FAC on the digits CNN (5 seeds)\n")
        sparse_cnn()
    if args.part in ("sparse", "sparse-logistic", "all"):
        print("\n## Sparse M-FAC on the logistic regression (3 seeds)\n")
        sparse_logistic()
    if args.part in ("sparse", "sparse-llama", "all"):
        print("\n## Sparse M-FAC on the tiny Llama (3 seeds)\n")
        sparse_llama(steps=args.llama_steps)


if __name__ == "__main__":
    main()
