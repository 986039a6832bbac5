"""The ``secondorder`` console script."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, sections=args.sections, show_progress=not args.no_progress)


def _lowrank(args: argparse.Namespace) -> None:
    from .demo.lowrank import OPTIMIZERS, QUICK, LMSetup, compare, results_table
    from .demo.report import text_table

    unknown = sorted(set(args.optimizers or []) - set(OPTIMIZERS))
    if unknown:
        raise SystemExit(f"unknown optimisers {unknown}; choose from {sorted(OPTIMIZERS)}")
    setup = QUICK if args.quick else LMSetup(steps=args.steps, rank=args.rank)
    chosen = {name: OPTIMIZERS[name] for name in args.optimizers or OPTIMIZERS}
    results = compare(setup, optimizers=chosen, show_progress=not args.no_progress)
    print(text_table(*results_table(results)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secondorder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="run every capability on embedded real data and write a report"
    )
    demo.add_argument("--out", default="runs/demo", help="folder for report.md and its figures")
    demo.add_argument("--quick", action="store_true", help="a short run (seconds) for smoke tests")
    demo.add_argument("--sections", nargs="+", help="only these sections")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)

    lowrank = commands.add_parser(
        "lowrank",
        help="pretrain a tiny Llama on the standard library with AdamW and the low-rank optimisers",
    )
    lowrank.add_argument("--steps", type=int, default=300, help="training steps per optimiser")
    lowrank.add_argument(
        "--rank", type=int, default=32, help="rank of the attention and MLP matrices"
    )
    lowrank.add_argument("--optimizers", nargs="+", help="only these (default: all)")
    lowrank.add_argument(
        "--quick", action="store_true", help="a tiny run (seconds) for smoke tests"
    )
    lowrank.add_argument("--no-progress", action="store_true", help="no progress bars")
    lowrank.set_defaults(handler=_lowrank)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
