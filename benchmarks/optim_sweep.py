"""Where the demo's optimiser settings come from, and how M-FAC compares when every method is tuned.

    python benchmarks/optim_sweep.py --part cnn        # the digits CNN of the demo (15 epochs)
    python benchmarks/optim_sweep.py --part logistic   # logistic regression, 3 seeds
    python benchmarks/optim_sweep.py --part sparse     # dense against sparse (EFCP) M-FAC
    python benchmarks/optim_sweep.py --part tune --task llama300    # the comparison's sweep
    python benchmarks/optim_sweep.py --part final --task llama300   # its seeds at the best points
    python benchmarks/optim_sweep.py --part report                  # its tables
    python benchmarks/optim_sweep.py --part long                    # 3,000 steps, the best
    python benchmarks/optim_sweep.py --part final --task llama-heldout  # the held-out check

cnn       each optimiser of the demo over a small grid, on the demo's CNN and data split.
logistic  multinomial logistic regression on the raw digits (a convex problem): SGD, SGD with
          momentum and M-FAC, each at the best of its grid, mean over 3 seeds, 2 epochs.
sparse    dense M-FAC against the sparse window at 1%, 5% and 10% density, with and without
          error feedback, at the dense optimiser's tuned lr and damp: the CNN (5 seeds, test
          accuracy and loss), the logistic regression (3 seeds) and the tiny Llama of the
          low-rank benchmark against AdamW (3 seeds, 300 steps; --llama-steps).
tune      the comparison of issue 15, step 1: every optimiser family over a coarse grid (3-4
          learning rates; 3 relative dampings for M-FAC), one seed, scored on a validation
          split (digits: 20% of the training images; the tiny Llama: the first half of the
          held-out text). Tasks: llama300, llama1000, llama3000 (warm-up then cosine), cnn
          (the demo's, 15 epochs), logistic (2 epochs). Appends to runs/sweep/tune-<task>.jsonl
          and skips what is already there, so an interrupted sweep resumes. The families:
          the first comparison's (AdamW, SGD with momentum, GaLore, M-FAC's variants) and
          the entries of FAMILIES (Muon with AdamW, heavyball's SOAP, and the library's
          newer classes once they exist), each skipped with a message where it cannot run.
final     step 2: each family at its best point, seeds 1..3 (1..5 on the CNN), trained on the
          whole training split and scored on held-out data (digits: the test images; Llama:
          the second half of the held-out text). Appends to runs/sweep/final-<task>.jsonl.
report    the tables of both steps, from the .jsonl files.
long      the 3,000-step Llama (3 seeds) for the --family given (repeatable), or for the
          three best families of the 1,000-step held-out results (300 if those are missing)
          and AdamW: each tuned around its shorter pick (a third, once and three times its
          rate), then held out.
llama-heldout  a check on data and a model the sweep never saw: the reference manual's
          prose (pydoc's topics) instead of Python source, a Llama of 3 layers of 96 instead
          of 2 of 128, 500 steps. Not tuned: --part final runs each family at its
          llama1000 pick (llama300's where that sweep has not run).
window    how many gradients grafted M-FAC needs: its tuned setting of the 300-step Llama at
          num_grads 16, 64 and 256 (seed 0, validation split; runs/sweep/window-llama300.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import secondorder.optim
from secondorder._workloads import language_model as lm
from secondorder._workloads.data import (
    Split,
    TextCorpus,
    load_digits,
    load_stdlib_corpus,
    load_stdlib_prose,
)
from secondorder._workloads.models import digits_cnn
from secondorder._workloads.peers import heavyball, heavyball_soap, muon_with_adamw
from secondorder._workloads.report import format_bytes, markdown_row, markdown_table
from secondorder._workloads.training import train_classifier
from secondorder.demo import lowrank
from secondorder.optim import MFAC, DCTAdamW, GaLoreAdamW


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
            p, lr=lr, damp=damp, num_grads=n, graft=None
        )
    print(markdown_table(["optimiser", "train loss", "test accuracy"], []))
    for name, make in grid.items():
        torch.manual_seed(0)
        r = train_classifier(
            name, digits_cnn(), make, train, test, epochs=15, batch_size=64, show_progress=False
        )
        print(markdown_row([name, f"{r.train_loss:.4f}", f"{r.test_accuracy:.4f}"]), flush=True)


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
                lambda p, lr=lr, damp=damp, n=n: MFAC(p, lr=lr, damp=damp, num_grads=n, graft=None),
            )
            for (lr, damp), n in itertools.product(
                [(0.1, 0.01), (0.3, 0.03), (0.3, 0.1), (1, 0.1), (1, 0.3), (0.2, 0.02)], (16, 32)
            )
        ],
    }
    print(markdown_table(["optimiser", "best setting", "mean final training loss (3 seeds)"], []))
    for family, settings in families.items():
        scored = [
            (statistics.mean(logistic_loss(make, s) for s in range(3)), label)
            for label, make in settings
        ]
        loss, label = min(scored)
        print(markdown_row([family, label, f"{loss:.4f}"]), flush=True)


def mean_std(values: list[float], digits: int = 4) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def sparse_variants(lr: float, damp: float, num_grads: int) -> dict[str, Callable]:
    """Dense M-FAC and its sparse windows, all at the dense optimiser's lr and damp."""
    variants = {
        "MFAC dense": lambda p: MFAC(p, lr=lr, damp=damp, num_grads=num_grads, graft=None),
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
                graft=None,
            )
    return variants


def window_bytes(make: Callable, model: torch.nn.Module) -> int:
    return make(list(model.parameters())).window.nbytes


def sparse_cnn(seeds: int = 5) -> None:
    train, test = load_digits()
    variants = sparse_variants(lr=0.05, damp=0.1, num_grads=64)  # the demo's tuned MFAC
    header = ["optimiser", "test accuracy", "test loss", "window bytes"]
    print(markdown_table(header, []), flush=True)
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
        row = [name, mean_std(accuracies), mean_std(losses), f"{nbytes:,}"]
        print(markdown_row(row), flush=True)


def sparse_logistic(seeds: int = 3) -> None:
    train, test = load_digits()
    variants = sparse_variants(lr=0.2, damp=0.02, num_grads=32)  # the tuned MFAC of --part logistic
    header = ["optimiser", "final training loss", "test accuracy", "window bytes"]
    print(markdown_table(header, []), flush=True)
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
        row = [name, mean_std(losses), mean_std(accuracies), f"{window_bytes(make, model):,}"]
        print(markdown_row(row), flush=True)


def sparse_llama(seeds: int = 3, steps: int = 300) -> None:
    """AdamW at its best rate of the low-rank benchmark's sweep; M-FAC at the best point of a
    15-point grid (lr 1e-3 to 0.3, damp 1e-4 to 0.1, num_grads 64; issue 15's figures)."""

    def mfac(**options):
        def build(model, setup, lr):
            settings = {"graft": None, "lr": lr, "damp": 0.03, "num_grads": 64} | options
            return model, MFAC(model.parameters(), **settings)

        return build

    runs = {
        "AdamW": (lowrank.OPTIMIZERS["AdamW"][0], 1e-3),
        "MFAC dense": (mfac(), 0.03),
        "MFAC sparse 1%": (mfac(density=0.01), 0.03),
        "MFAC sparse 1%, no error feedback": (mfac(density=0.01, error_feedback=False), 0.03),
    }
    base = dataclasses.replace(lm.LMSetup(), steps=steps)
    corpus = load_stdlib_corpus(base.corpus_bytes)
    header = [f"optimiser ({steps} steps)", "lr", "valid loss (nats/byte)", "tokens/s",
              "optimiser state"]  # fmt: skip
    print(markdown_table(header, []), flush=True)
    for name, (build, lr) in runs.items():
        results = [
            lm.train_lm(
                name, build, lr, corpus, dataclasses.replace(base, seed=seed), show_progress=False
            )
            for seed in range(seeds)
        ]
        losses = [r.valid_loss for r in results]
        speed = statistics.median(r.tokens_per_second for r in results)
        state = results[0].state_bytes
        row = [name, f"{lr:g}", mean_std(losses, 3), f"{speed:,.0f}", f"{state / 2**20:.2f} MiB"]
        print(markdown_row(row), flush=True)


# ---------------------------------------------------------------------------- the comparison
SWEEP_DIR = Path("runs/sweep")
#: the relative dampings M-FAC is swept over (λ = ρ · mean squared gradient entry); grafted
#: M-FAC prefers more (a first sweep's best points lay at its top edge, 1e3 to 1e5)
RHOS = (10.0, 100.0, 1000.0, 10000.0)
GRAFTED_RHOS = (100.0, 1000.0, 10000.0)
GRAFTED_MOMENTA = (0.0, 0.9)


def galore_groups(params: list[torch.nn.Parameter], rank: int) -> list[dict]:
    """Matrices (and conv kernels) in a rank group, the rest plain, as GaLore is used."""
    matrices = [p for p in params if p.dim() >= 2 and min(p.shape[0], p[0].numel()) > rank]
    chosen = {id(p) for p in matrices}
    others = [p for p in params if id(p) not in chosen]
    return [{"params": others}, {"params": matrices, "rank": rank, "update_proj_gap": 50}]


def lowrank_llama_groups(model: torch.nn.Module, settings: dict) -> list[dict]:
    """The attention and MLP matrices at ``settings``' rank (32), refresh period (50) and
    ``on_refresh`` (rotate), the rest plain."""
    low_rank = {"rank": 32, "update_proj_gap": 50, "on_refresh": "rotate"}
    return lm.low_rank_groups(model, **{k: settings.get(k, v) for k, v in low_rank.items()})


def scaled_groups(groups: list[dict], scale: float) -> list[dict]:
    """``galore_groups`` with ``scale`` on the low-rank group."""
    return [{**group, "scale": scale} if "rank" in group else group for group in groups]


#: learning rates per task and family: AdamW, SGD+momentum, GaLore, plain and grafted M-FAC
LEARNING_RATES = {
    "llama": {
        "AdamW": (5e-4, 1e-3, 2e-3, 5e-3),
        "SGD+momentum": (0.03, 0.1, 0.3, 1.0),
        "GaLoreAdamW": (1e-3, 3e-3, 1e-2),
        "MFAC": (1e-3, 1e-2, 1e-1),
        "grafted": (2e-3, 5e-3, 1e-2),
    },
    "cnn": {
        "AdamW": (3e-4, 1e-3, 3e-3),
        "SGD+momentum": (0.03, 0.1, 0.3),
        "GaLoreAdamW": (1e-3, 3e-3, 1e-2),
        "MFAC": (0.01, 0.05, 0.2),  # the demo's earlier absolute damp=0.1 at lr 0.05 was ρ≈1e4
        "grafted": (1e-3, 3e-3, 1e-2),
    },
    "logistic": {
        "AdamW": (1e-2, 3e-2, 1e-1),
        "SGD+momentum": (0.3, 1.0, 3.0),
        "GaLoreAdamW": (1e-2, 3e-2, 1e-1),
        "MFAC": (0.03, 0.1, 0.3, 1.0),
        "grafted": (1e-2, 3e-2, 1e-1),
    },
}


@dataclasses.dataclass(frozen=True)
class Family:
    """An optimiser family of the comparison, as one entry of :data:`FAMILIES`.

    ``build(model, settings)`` makes the optimiser; ``rates`` are its learning rates per
    kind of task ("llama", "cnn", "logistic"; a kind left out is not run); ``others`` are
    the further settings crossed with each rate; ``missing()`` says why the family cannot
    run here (a peer not installed, a class not written yet), or ``None`` when it can.
    """

    build: Callable[[torch.nn.Module, dict], torch.optim.Optimizer]
    rates: dict[str, tuple[float, ...]]
    others: tuple[dict, ...] = ({},)
    missing: Callable[[], str | None] = lambda: None

    def grid(self, kind: str) -> list[dict]:
        return [
            {"lr": lr, **other} for lr, other in itertools.product(self.rates[kind], self.others)
        ]


def ours(name: str):
    """``secondorder.optim.<name>``, or ``None`` while the library has no such class."""
    return getattr(secondorder.optim, name, None)


#: the learning rates of the peers and of the library's newer families (issue 20)
PEER_RATES = (1e-3, 3e-3, 1e-2)

#: every family beyond the original grids: a new one is one entry here. Peers and newer
#: classes of the library are skipped, with a message, where they are missing. Everything
#: runs without weight decay, as the sweep's AdamW does.
FAMILIES: dict[str, Family] = {
    # Muon on the hidden matrices, AdamW (same lr) on embeddings, norms and the output layer;
    # the logistic regression has no hidden matrix
    "Muon": Family(
        lambda model, s: muon_with_adamw(model, **s),
        {"llama": PEER_RATES, "cnn": PEER_RATES},
    ),
    "heavyball SOAP": Family(
        lambda model, s: heavyball_soap(model.parameters(), weight_decay=0.0, **s),
        {"llama": PEER_RATES, "cnn": PEER_RATES, "logistic": (1e-2, 3e-2, 1e-1)},
        missing=lambda: (
            None
            if heavyball()
            else "heavyball is not installed (pip install --no-deps heavyball==3.2.1)"
        ),
    ),
    "SOAP": Family(
        lambda model, s: ours("SOAP")(model.parameters(), weight_decay=0.0, **s),
        {"llama": PEER_RATES, "cnn": PEER_RATES, "logistic": (1e-2, 3e-2, 1e-1)},
        missing=lambda: None if ours("SOAP") else "secondorder.optim has no SOAP yet",
    ),
    # SOAP refreshing its bases every 2 steps (heavyball's first period) instead of 10
    # (settings beyond lr, such as betas, rank or another precondition_frequency, pass through)
    "SOAP, refresh every 2": Family(
        lambda model, s: ours("SOAP")(
            model.parameters(), weight_decay=0.0, **{"precondition_frequency": 2, **s}
        ),
        {"llama": (3e-3, 1e-2)},
        missing=lambda: None if ours("SOAP") else "secondorder.optim has no SOAP yet",
    ),
    # SOAP in DCT-II bases chosen by the Grams' energy: no eigendecomposition
    "SOAP dct, refresh every 2": Family(
        lambda model, s: ours("SOAP")(
            model.parameters(), weight_decay=0.0, precondition_frequency=2, basis="dct", **s
        ),
        {"llama": (3e-3, 1e-2)},
        missing=lambda: None if ours("SOAP") else "secondorder.optim has no SOAP yet",
    ),
    # GaLore with the plain parameters (embeddings, norms, output) at AdamW's rate and the
    # low-rank step ``scale`` times larger: at 1,000 steps GaLore's pick (3e-3 for both)
    # gave the plain parameters three times AdamW's best rate
    "GaLoreAdamW, scaled": Family(
        lambda model, s: GaLoreAdamW(
            scaled_groups(galore_groups(list(model.parameters()), 32), s["scale"]), lr=s["lr"]
        ),
        {"llama": (1e-3,)},
        others=({"scale": 3.0}, {"scale": 10.0}),
    ),
    # GaLore as its reference trains Llamas: only the attention and MLP matrices projected
    # (the "GaLoreAdamW" family above projects every matrix, embeddings and output included)
    # (rank, update_proj_gap and on_refresh may be given in the settings)
    "GaLoreAdamW, attention and MLP": Family(
        lambda model, s: GaLoreAdamW(lowrank_llama_groups(model, s), lr=s["lr"]),
        {"llama": PEER_RATES},
    ),
    # DCT bases chosen every step, the same matrices: no basis kept, no SVD
    "DCTAdamW": Family(
        lambda model, s: DCTAdamW(lm.low_rank_groups(model, rank=32), **s),
        {"llama": PEER_RATES},
    ),
    # SOAP's one-sided top-32 eigenvectors: GaLore's moments with SOAP's running Gram
    "SOAP rank 32": Family(
        lambda model, s: ours("SOAP")(model.parameters(), weight_decay=0.0, rank=32, **s),
        {"llama": (3e-3, 1e-2)},
        missing=lambda: None if ours("SOAP") else "secondorder.optim has no SOAP yet",
    ),
}


def available_families(kind: str) -> dict[str, Family]:
    """The entries of :data:`FAMILIES` that can run on a task of ``kind``; a message for each
    missing one."""
    chosen = {}
    for name, family in FAMILIES.items():
        reason = family.missing()
        if reason is not None:
            print(f"skipping {name}: {reason}", flush=True)
        elif kind in family.rates:
            chosen[name] = family
    return chosen


def families(task: str) -> dict[str, list[dict]]:
    """Each optimiser family's grid of settings for ``task``. For the 1,000-step Llama, the
    300-step best of each family and one learning rate on either side of it (the best rate
    moves with the budget), when the 300-step sweep has run; its whole grid otherwise. The
    3,000-step Llama does the same around the 1,000-step best (the 300-step one if the
    1,000-step sweep has not run)."""
    kind = task_kind(task)
    grid = original_families(task)
    grid |= {name: family.grid(kind) for name, family in available_families(kind).items()}
    shorter = {
        "llama1000": best_settings("llama300"),
        "llama3000": best_settings("llama1000") or best_settings("llama300"),
    }.get(task, {})
    for family, best in shorter.items():
        if family in grid:
            grid[family] = [{**best, "lr": best["lr"] * factor} for factor in (1 / 3, 1.0, 3.0)]
    if task == "llama1000" and "MFAC grafted (adam)" in shorter:
        # grafted M-FAC stayed 0.04 behind AdamW there: three more points near its pick
        best = shorter["MFAC grafted (adam)"]
        grid["MFAC grafted (adam)"] += [
            {**best, "lr": lr, "relative_damp": rho}
            for lr, rho in ((3e-3, 1e3), (5e-3, 1e4), (3e-3, 1e4))
        ]
    return grid


def original_families(task: str) -> dict[str, list[dict]]:
    """The grids of the first comparison (issue 15): AdamW, SGD with momentum, GaLore and
    M-FAC's variants."""
    rates = LEARNING_RATES[task_kind(task)]
    window = {"num_grads": 64}
    # Adam's first moment is in the grafted norm, so M-FAC's own momentum on top is swept:
    # without it was better on the tiny Llama (2.058 at lr 5e-3, 2.135 with 0.9 at lr 3e-3;
    # seed 0), with it on the CNN (0.069 against 0.074 at lr 1e-2, ρ 1e4)
    grafted_grid = list(itertools.product(rates["grafted"], GRAFTED_RHOS, GRAFTED_MOMENTA))
    grid = {
        "AdamW": [{"lr": lr} for lr in rates["AdamW"]],
        "SGD+momentum": [{"lr": lr} for lr in rates["SGD+momentum"]],
        "GaLoreAdamW": [{"lr": lr} for lr in rates["GaLoreAdamW"]],
        "MFAC": [
            {"lr": lr, "relative_damp": rho, **window}
            for lr, rho in itertools.product(rates["MFAC"], RHOS)
        ],
        "MFAC grafted (adam)": [
            {"lr": lr, "relative_damp": rho, "graft": "adam", "momentum": mu, **window}
            for lr, rho, mu in grafted_grid
        ],
        "MFAC grafted (adam), sparse 1%": [
            {"lr": lr, "relative_damp": rho, "density": 0.01, "graft": "adam", "momentum": mu}
            | window
            for lr, rho, mu in grafted_grid
        ],
        # M-FAC with Adam's diagonal as its prior (issue 20): lr on Adam's scale
        "MFAC prior=adam": [
            {"lr": lr, "relative_damp": rho, "prior": "adam", "num_grads": 32}
            for lr, rho in itertools.product((1e-3, 3e-3), (1e3, 1e4, 3e4))
        ],
    }
    if task == "cnn":  # the first CNN sweep's absolute dampings, which relative ones missed
        grid["MFAC, absolute damping"] = [
            {"lr": lr, "damp": damp, **window}
            for lr, damp in ((0.02, 0.03), (0.05, 0.1), (0.1, 0.3))
        ]
        grid["MFAC grafted (adam), absolute damping"] = [
            {"lr": lr, "damp": damp, "graft": "adam", "momentum": 0.0, **window}
            for lr, damp in itertools.product((3e-3, 1e-2, 3e-2), (0.03, 0.1, 0.3))
        ]
    return grid


def make_optimizer(family: str, settings: dict, model: torch.nn.Module, task: str):
    if family in FAMILIES:
        return FAMILIES[family].build(model, settings)
    params = list(model.parameters())
    if family == "AdamW":
        return torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)
    if family == "SGD+momentum":
        return torch.optim.SGD(params, lr=settings["lr"], momentum=0.9)
    if family == "GaLoreAdamW":
        rank = 32 if task.startswith("llama") else 4
        return GaLoreAdamW(galore_groups(params, rank), lr=settings["lr"])
    return MFAC(params, **({"graft": None} | settings))  # plain unless the family grafts


@dataclasses.dataclass
class Outcome:
    """What one run of the comparison measured."""

    loss: float  # validation or held-out loss (nats per byte for the Llama)
    accuracy: float | None
    seconds_per_step: float  # the mean, first steps (and any compilation in them) included
    state_bytes: int
    median_step_seconds: float  # the steady step: a compiling first step does not move it


@dataclasses.dataclass(frozen=True)
class LlamaTask:
    """A tiny-Llama task: its budget, the model (``LMSetup`` fields beyond the budget), its
    text, and, for a check that is not tuned itself, the tasks whose validation picks it
    runs (the first that has been tuned)."""

    steps: int
    model: tuple[tuple[str, int], ...] = ()
    corpus: Callable[[lm.LMSetup], TextCorpus] = lambda setup: load_stdlib_corpus(
        setup.corpus_bytes
    )
    settings_from: tuple[str, ...] = ()


LLAMA_TASKS = {
    "llama300": LlamaTask(300),
    "llama1000": LlamaTask(1000),
    "llama3000": LlamaTask(3000),
    # the held-out check: English prose instead of Python source, a narrower and deeper
    # model (3 layers of 96, 3 heads), 500 steps; the settings come from the code tasks
    "llama-heldout": LlamaTask(
        500,
        model=(
            ("hidden_size", 96),
            ("num_layers", 3),
            ("num_heads", 3),
            ("intermediate_size", 256),
        ),
        corpus=lambda setup: load_stdlib_prose(),
        settings_from=("llama1000", "llama300"),
    ),
}


def task_kind(task: str) -> str:
    return "llama" if task in LLAMA_TASKS else task


def tuned_on(task: str) -> str:
    """The task whose tuning records pick ``task``'s settings: ``task`` itself unless it is
    a check that borrows them."""
    sources = LLAMA_TASKS[task].settings_from if task in LLAMA_TASKS else ()
    for source in sources:
        if (SWEEP_DIR / f"tune-{source}.jsonl").exists():
            return source
    return sources[-1] if sources else task


def run_llama(family: str, settings: dict, task: str, seed: int, split: str) -> Outcome:
    spec = LLAMA_TASKS[task]
    setup = dataclasses.replace(
        lm.LMSetup(), steps=spec.steps, warmup=spec.steps // 10, seed=seed, **dict(spec.model)
    )
    full = spec.corpus(setup)
    half = len(full.valid) // 2
    held_out = full.valid[:half] if split == "valid" else full.valid[half:]
    corpus = TextCorpus(full.train, held_out, full.files)

    def build(model, setup, lr):
        return model, make_optimizer(family, {**settings, "lr": lr}, model, task)

    result = lm.train_lm(family, build, settings["lr"], corpus, setup, show_progress=False)
    return Outcome(
        result.valid_loss, None, result.seconds / spec.steps, result.state_bytes,
        statistics.median(result.step_seconds),
    )  # fmt: skip


def digits_splits(split: str) -> tuple[Split, Split]:
    """(training, scoring) images: 80/20 of the training images to tune, else train/test."""
    train, test = load_digits()
    if split == "test":
        return train, test
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(123))
    cut = int(0.8 * len(train))
    pick = lambda index: Split(train.inputs[index], train.targets[index])  # noqa: E731
    return pick(order[:cut]), pick(order[cut:])


def run_digits(family: str, settings: dict, task: str, seed: int, split: str) -> Outcome:
    train, scored = digits_splits(split)
    torch.manual_seed(seed)
    if task == "cnn":
        model, epochs, batch = digits_cnn(), 15, 64
    else:
        model, epochs, batch = (
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
            2,
            32,
        )
    run = train_classifier(
        family, model, lambda _: make_optimizer(family, settings, model, task), train, scored,
        epochs=epochs, batch_size=batch, seed=seed, show_progress=False,
    )  # fmt: skip
    steps = len(run.step_losses)
    return Outcome(
        run.test_loss, run.test_accuracy, run.seconds / steps, run.state_bytes,
        statistics.median(run.step_seconds),
    )  # fmt: skip


def run_one(family: str, settings: dict, task: str, seed: int, split: str) -> Outcome:
    if task in LLAMA_TASKS:
        return run_llama(family, settings, task, seed, split)
    return run_digits(family, settings, task, seed, split)


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def run_and_record(
    path: Path, family: str, settings: dict, task: str, seed: int, split: str, **extra
) -> None:
    done = {
        (r["family"], json.dumps(r["settings"], sort_keys=True), r["seed"])
        for r in read_records(path)
    }
    if (family, json.dumps(settings, sort_keys=True), seed) in done:
        return
    start = time.perf_counter()
    try:
        outcome = dataclasses.asdict(run_one(family, settings, task, seed, split))
    except (ValueError, RuntimeError) as error:  # a setting that diverges or is refused
        outcome = {"loss": float("nan"), "accuracy": None, "error": str(error)[:200]}
    record = {"task": task, "family": family, "settings": settings, "seed": seed, "split": split}
    append_record(path, record | extra | outcome | {"wall": time.perf_counter() - start})


def tune(task: str, only: list[str] | None) -> None:
    """The grid, then, while a family's best learning rate or damping lies on the edge of
    what was tried, one step further out along it (at most two steps each way)."""
    if tuned_on(task) != task:
        raise SystemExit(f"{task} is not tuned: it runs the picks of {tuned_on(task)}")
    path = SWEEP_DIR / f"tune-{task}.jsonl"
    for family, grid in families(task).items():
        if only is not None and family not in only:
            continue
        for settings in grid:
            run_and_record(path, family, settings, task, seed=0, split="valid")
        for _ in range(2):
            beyond = settings_beyond_the_edge(path, family)
            if not beyond:
                break
            for settings in beyond:
                run_and_record(path, family, settings, task, seed=0, split="valid")


#: how far a step beyond the grid goes, per setting
_STEP_OUT = {"lr": 3.0, "relative_damp": 10.0}


def settings_beyond_the_edge(path: Path, family: str) -> list[dict]:
    """For the family's best record: each swept setting at the largest (smallest) value
    tried, moved one step up (down), the others kept."""
    records = [r for r in read_records(path) if r["family"] == family]
    best = min(records, key=score)["settings"]
    out = []
    for key, factor in _STEP_OUT.items():
        if key not in best:
            continue
        tried = sorted({r["settings"][key] for r in records if r["settings"].get(key) is not None})
        if len(tried) < 2:
            continue
        if best[key] == tried[-1]:
            out.append({**best, key: best[key] * factor})
        elif best[key] == tried[0]:
            out.append({**best, key: best[key] / factor})
    return out


def score(record: dict) -> float:
    loss = record["loss"]
    return loss if loss == loss else float("inf")  # NaN (diverged) ranks last


def best_settings(task: str) -> dict[str, dict]:
    """Each family's setting of lowest validation loss in the tuning records (of the task
    whose picks ``task`` borrows, for a held-out check)."""
    best: dict[str, dict] = {}
    for record in read_records(SWEEP_DIR / f"tune-{tuned_on(task)}.jsonl"):
        family = record["family"]
        if family not in best or score(record) < score(best[family]):
            best[family] = record
    return {family: record["settings"] for family, record in best.items()}


def final(task: str, only: list[str] | None) -> None:
    seeds = range(1, 6) if task == "cnn" else range(1, 4)
    path = SWEEP_DIR / f"final-{task}.jsonl"
    source = {} if tuned_on(task) == task else {"tuned_on": tuned_on(task)}
    for family, settings in best_settings(task).items():
        if only is None or family in only:
            for seed in seeds:
                run_and_record(path, family, settings, task, seed=seed, split="test", **source)


def best_families(task: str, count: int = 3) -> list[str]:
    """The ``count`` families of lowest mean held-out loss at their validation picks."""
    picks = best_settings(task)
    losses: dict[str, list[float]] = {}
    for record in read_records(SWEEP_DIR / f"final-{task}.jsonl"):
        if record["settings"] == picks.get(record["family"]):
            losses.setdefault(record["family"], []).append(score(record))
    return sorted(losses, key=lambda family: statistics.mean(losses[family]))[:count]


def long_run(only: list[str] | None) -> None:
    """The 3,000-step Llama for ``only``, or for the three best families of the longest
    budget with held-out results and AdamW: tuned around their shorter picks, then held out."""
    if only is None:
        shorter = "llama1000" if (SWEEP_DIR / "final-llama1000.jsonl").exists() else "llama300"
        only = list(dict.fromkeys([*best_families(shorter), "AdamW"]))
    print(f"3,000 steps: {', '.join(only)}", flush=True)
    tune("llama3000", only)
    final("llama3000", only)


#: the window sizes of the ``window`` part (the comparison runs at 64)
WINDOW_SIZES = (16, 64, 256)


def window_sizes(task: str = "llama300") -> None:
    """Grafted M-FAC's tuned setting of ``task`` at each of WINDOW_SIZES gradients."""
    family = "MFAC grafted (adam)"
    best = best_settings(task).get(family)
    if best is None:
        raise SystemExit(f"run --part tune --task {task} first: no {family} record")
    path = SWEEP_DIR / f"window-{task}.jsonl"
    for num_grads in WINDOW_SIZES:
        run_and_record(path, family, {**best, "num_grads": num_grads}, task, 0, "valid")
    rows = [
        [str(r["settings"]["num_grads"]), f"{r['loss']:.4f}",
         f"{r['seconds_per_step'] * 1e3:.1f} ms", format_bytes(r["state_bytes"])]
        for r in read_records(path)
    ]  # fmt: skip
    print(f"\n### {task}: {family} at {describe(best)}, by window size\n")
    print(markdown_table(["num_grads", "validation loss", "s/step", "optimiser state"], rows))


def describe(settings: dict) -> str:
    names = {"relative_damp": "ρ", "num_grads": "m", "momentum": "μ"}
    skip = {"graft", "density"}
    return ", ".join(
        f"{names.get(k, k)}={v:g}" if isinstance(v, float | int) else f"{names.get(k, k)}={v}"
        for k, v in settings.items()
        if k not in skip
    )


def step_time(records: list[dict]) -> str:
    """The median over seeds of each run's steady (median) step; the mean step of records
    from before the median was kept, marked so."""
    if all("median_step_seconds" in r for r in records):
        return f"{statistics.median(r['median_step_seconds'] for r in records) * 1e3:.1f} ms"
    return f"{statistics.median(r['seconds_per_step'] for r in records) * 1e3:.1f} ms (mean)"


def held_out_rows(task: str, finals: list[dict]) -> list[list[str]]:
    """One row per (family, setting) evaluated on held-out seeds. Every setting that was a
    family's best at some point keeps its row; the current best, the one validation picks,
    comes first in its family and the others are marked. A check's records are picks of the
    task they were tuned on (recorded as ``tuned_on``), named beside the setting."""
    picks = {source: best_settings(source) for source in {r.get("tuned_on", task) for r in finals}}

    def is_pick(record: dict) -> bool:
        return record["settings"] == picks[record.get("tuned_on", task)].get(record["family"])

    by_setting: dict[tuple[str, str], list[dict]] = {}
    for record in finals:
        key = (record["family"], json.dumps(record["settings"], sort_keys=True))
        by_setting.setdefault(key, []).append(record)
    order = list(dict.fromkeys(record["family"] for record in finals))
    rows = []
    for (family, _), records in sorted(
        by_setting.items(),
        key=lambda item: (order.index(item[0][0]), not is_pick(item[1][0])),
    ):
        chosen = is_pick(records[0])
        source = f" ({records[0]['tuned_on']}'s pick)" if "tuned_on" in records[0] else ""
        losses = [r["loss"] for r in records]
        accuracies = [r["accuracy"] for r in records if r.get("accuracy") is not None]
        rows.append(
            [family if chosen else f"{family} (not chosen by validation)",
             describe(records[0]["settings"]) + source,
             f"{mean_std(losses)} ({len(records)} seeds)",
             mean_std(accuracies) if len(accuracies) > 1 else "—",
             step_time(records), format_bytes(records[0]["state_bytes"])]
        )  # fmt: skip
    return rows


def tuning_rows(records: list[dict], every_setting: bool) -> list[list[str]]:
    """Every tuning record, or each family's best with the number of settings tried."""
    if every_setting:
        return [[r["family"], describe(r["settings"]), f"{r['loss']:.4f}"] for r in records]
    rows = []
    for family in dict.fromkeys(r["family"] for r in records):
        tried = [r for r in records if r["family"] == family]
        best = min(tried, key=score)
        rows.append([family, f"{describe(best['settings'])} (best of {len(tried)})",
                     f"{best['loss']:.4f}"])  # fmt: skip
    return rows


def report(every_setting: bool = False) -> None:
    tasks = sorted(
        {path.stem.split("-", 1)[1] for pattern in ("tune-*.jsonl", "final-*.jsonl")
         for path in SWEEP_DIR.glob(pattern)}
    )  # fmt: skip
    for task in tasks:
        tuning = read_records(SWEEP_DIR / f"tune-{task}.jsonl")
        if tuning:
            print(f"\n### {task}: tuning (seed 0, validation split)\n")
            rows = tuning_rows(tuning, every_setting)
            print(markdown_table(["optimiser", "setting", "validation loss"], rows))
        finals = read_records(SWEEP_DIR / f"final-{task}.jsonl")
        if finals:
            print(f"\n### {task}: held-out, mean ± std over seeds\n")
            header = [
                "optimiser",
                "setting",
                "held-out loss",
                "accuracy",
                "s/step (median)",
                "optimiser state",
            ]
            print(markdown_table(header, held_out_rows(task, finals)))


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
            "tune",
            "final",
            "report",
            "window",
            "long",
            "all",
        ],
        default="all",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llama-steps", type=int, default=300)
    parser.add_argument("--task", choices=[*LLAMA_TASKS, "cnn", "logistic"])
    parser.add_argument(
        "--family",
        action="append",
        help="only this optimiser family (tune, final, long; repeatable)",
    )
    parser.add_argument(
        "--every-setting", action="store_true", help="report: every tuning run, not each best"
    )
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
    if args.part in ("tune", "final"):
        if args.task is None:
            parser.error(f"--part {args.part} needs --task")
        (tune if args.part == "tune" else final)(args.task, args.family)
    if args.part == "report":
        report(args.every_setting)
    if args.part == "window":
        window_sizes()
    if args.part == "long":
        long_run(args.family)


if __name__ == "__main__":
    main()
