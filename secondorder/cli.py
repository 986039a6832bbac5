"""The ``secondorder`` console script."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

DESCRIPTION = (
    "Second-order information for PyTorch on small real problems: a demo report, pruning "
    "with M-FAC, the curvature of a trained model, and the low-rank optimisers."
)
# The names the demo modules define, spelled here so that --help does not import torch;
# tests/test_cli.py checks that they agree.
SECTIONS = ("optimizers", "curvature", "lowrank", "pruning")
DIAGNOSE_OPTIMIZERS = ("AdamW", "SGD+momentum", "MFAC", "MFAC plain", "MFAC sparse 1%")
LOWRANK_OPTIMIZERS = ("AdamW", "GaLoreAdamW", "NaturalGaLore", "DCTAdamW", "SST")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, sections=args.sections, show_progress=not args.no_progress)


def _prune(args: argparse.Namespace) -> None:
    from .demo.pruning import prune_digits, prune_llama

    digits = [model for model in args.models if model != "llama"]
    if digits:
        prune_digits(
            digits,
            args.sparsities,
            out=args.out,
            gradual_epochs=0 if args.quick else args.gradual_epochs,
            train_epochs=1 if args.quick else args.train_epochs,
            show_progress=not args.no_progress,
        )
    if "llama" in args.models:
        prune_llama(
            out=args.out,
            quick=args.quick,
            cache_dir=None if args.quick else args.cache,
            show_progress=not args.no_progress,
        )


def _diagnose(args: argparse.Namespace) -> None:
    from .demo.diagnose import run_diagnose

    run_diagnose(
        args.out,
        checkpoint=args.checkpoint,
        optimizer=args.optimizer,
        epochs=args.epochs,
        samples=args.samples,
        num_matvecs=args.matvecs,
        top_k=args.top_k,
        quick=args.quick,
        show_progress=not args.no_progress,
    )


def _lowrank(args: argparse.Namespace) -> None:
    from ._workloads.language_model import QUICK, LMSetup
    from ._workloads.report import text_table
    from .demo.lowrank import OPTIMIZERS, compare, results_table

    setup = QUICK if args.quick else LMSetup(steps=args.steps, rank=args.rank)
    chosen = {name: OPTIMIZERS[name] for name in args.optimizers or OPTIMIZERS}
    results = compare(setup, optimizers=chosen, show_progress=not args.no_progress)
    print(text_table(*results_table(results)))


def _common_options() -> argparse.ArgumentParser:
    """The options every command takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--quick", action="store_true", help="tiny models and budgets (seconds), for smoke tests"
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument(
        "--threads",
        type=int,
        help="torch threads for the whole run (default: torch's choice; 1 is fastest for these "
        "small problems on a busy machine, see docs/benchmarks.md)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secondorder", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    common = [_common_options()]

    demo = commands.add_parser(
        "demo",
        parents=common,
        help="run every capability on embedded real data and write a report",
    )
    demo.add_argument("--out", default="runs/demo", help="folder for report.md and its figures")
    demo.add_argument(
        "--sections", nargs="+", choices=SECTIONS, help="only these sections (default: all)"
    )
    demo.set_defaults(handler=_demo)

    prune = commands.add_parser(
        "prune",
        parents=common,
        help="train a model, prune copies of it with every pruner, report the quality",
    )
    prune.add_argument(
        "--models",
        nargs="+",
        choices=["mlp", "cnn", "llama"],
        default=["mlp"],
        help="mlp, cnn: digits models, M-FAC against magnitude, one-shot and gradual; llama: a "
        "tiny Llama on the standard library's text, M-FAC OBS against SparseGPT, Wanda and "
        "magnitude at 50%%, 70%% and 2:4, held-out loss, time and memory of each call",
    )
    prune.add_argument(
        "--sparsities",
        nargs="+",
        type=float,
        default=[0.5, 0.7, 0.8, 0.9, 0.95],
        help="digits models only",
    )
    prune.add_argument(
        "--gradual-epochs",
        type=int,
        default=4,
        help="digits: epochs of fine-tuning for gradual pruning (0: one-shot only)",
    )
    prune.add_argument(
        "--train-epochs", type=int, default=30, help="digits: epochs of dense training"
    )
    prune.add_argument(
        "--out",
        default="runs/prune",
        help="folder for the table (table.md) and the plot (sparsity_accuracy.png)",
    )
    prune.add_argument(
        "--cache",
        default="runs/cache",
        help="folder where the trained Llama is kept and reused (llama only)",
    )
    prune.set_defaults(handler=_prune)

    diagnose = commands.add_parser(
        "diagnose",
        parents=common,
        help="Hessian trace, top eigenvalues and spectral density of a digits CNN, with plots",
    )
    diagnose.add_argument(
        "--out",
        default="runs/diagnose",
        help="folder for summary.json, density.png and, when trained here, model.pt, "
        "metrics.csv and metrics.png",
    )
    diagnose.add_argument(
        "--checkpoint", help="a state_dict of the digits CNN (e.g. model.pt of an earlier run)"
    )
    diagnose.add_argument(
        "--optimizer",
        default="SGD+momentum",
        choices=DIAGNOSE_OPTIMIZERS,
        help="optimiser of the demo that trains the model",
    )
    diagnose.add_argument("--epochs", type=int, default=5, help="epochs of training")
    diagnose.add_argument("--samples", type=int, default=512, help="training images measured on")
    diagnose.add_argument("--matvecs", type=int, default=60, help="products for the trace")
    diagnose.add_argument("--top-k", type=int, default=5, help="how many top eigenvalues")
    diagnose.set_defaults(handler=_diagnose)

    lowrank = commands.add_parser(
        "lowrank",
        parents=common,
        help="pretrain a tiny Llama on the standard library with AdamW and the low-rank optimisers",
    )
    lowrank.add_argument("--steps", type=int, default=300, help="training steps per optimiser")
    lowrank.add_argument(
        "--rank", type=int, default=32, help="rank of the attention and MLP matrices"
    )
    lowrank.add_argument(
        "--optimizers", nargs="+", choices=LOWRANK_OPTIMIZERS, help="only these (default: all)"
    )
    lowrank.set_defaults(handler=_lowrank)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads is not None:  # the one place the command line changes a global setting
        import torch

        torch.set_num_threads(args.threads)
    args.handler(args)


if __name__ == "__main__":
    main()
