"""Host synchronisations per optimiser step, counted by instrumenting the calls that make them.

    python benchmarks/host_syncs.py            # the tables of docs/benchmarks.md
    python benchmarks/host_syncs.py --where    # and where each one comes from
    python benchmarks/host_syncs.py --part projected   # one of them (mfac, projected)

On a GPU, reading a tensor's value on the host waits for every kernel queued before it:
``Tensor.item``, ``tolist``, ``cpu``, ``numpy``, and ``bool``/``float``/``int``/``index``
of a tensor. Copying host data to the device with ``torch.tensor(data, device=...)`` waits
too (PyTorch synchronises the stream after a blocking host-to-device copy). Both are
counted here on any device, by wrapping those calls, so that a CPU-only machine counts
what a GPU would wait for; reads of tensors that live on the CPU whatever the model's
device (none, in MFAC's step) would be listed apart.

Each configuration trains a small MLP with MFAC until the window is full, then counts
the syncs of every further step, and reports steady-state steps and the steps where the
small system is refactored separately (with the rank-2 update, every ``num_grads``
updates; below the rank-2 threshold, every step is a refactorisation, and the steady
state). ``tests/test_host_syncs.py`` fails if a steady-state step gains a sync.

The projected part does the same for GaLoreAdamW, DCTAdamW, NaturalGaLore and SST on the
same MLP (its two matrices at rank 4, refreshed every 4 steps; DCTAdamW also with its
default, a refresh every step), under ``nonfinite="raise"`` and ``"skip_on_device"``:
the first step, steady steps, refresh steps (SST: round boundaries) and, for
``"skip_on_device"``, the steps that read the count of skipped steps, apart.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch

from secondorder._workloads.host_syncs import (
    CONFIGS,
    GAP,
    PROJECTED,
    Sync,
    projected_configs,
    projected_syncs_per_step,
    syncs_per_step,
)


def _describe(steps: list[list[Sync]]) -> str:
    if not steps:
        return "-"
    counts = sorted({len(s) for s in steps})
    return "/".join(map(str, counts))


def _sources(steps: list[list[Sync]]) -> str:
    if not steps:
        return ""
    sources = Counter(f"{s.kind} at {s.where}" for s in steps[0])
    return "; ".join(f"{n}x {what}" if n > 1 else what for what, n in sources.items())


def _mfac_table(where: bool) -> None:
    print(f"# torch {torch.__version__}, MFAC(num_grads=8) on a 20-32-5 MLP, {sys.platform}\n")
    header = [
        "configuration",
        "first step",
        "filling steps",
        "steady step, refactor policy",
        "steady step, rank-2 policy",
        "refactor step, rank-2 policy",
    ]
    if where:
        header.append("where (first step; steady step)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, settings in CONFIGS.items():
        refactoring = syncs_per_step(settings, "refactor")
        rank2 = syncs_per_step(settings, "rank2")
        cells = [
            name,
            _describe(refactoring.first),
            _describe(refactoring.filling),
            _describe(refactoring.steady),
            _describe(rank2.steady),
            _describe(rank2.refactor),
        ]
        if where:
            cells.append(f"{_sources(refactoring.first)}; {_sources(rank2.steady)}")
        print("| " + " | ".join(cells) + " |")


def _projected_table(where: bool) -> None:
    if not PROJECTED:
        PROJECTED.update(projected_configs())
    print(
        f"\n# torch {torch.__version__}, the same MLP, matrices at rank 4 refreshed every {GAP} "
        f"steps, skip_report_every=7, {sys.platform}\n"
    )
    header = ["optimiser", "nonfinite", "first step", "steady step", "refresh step"]
    header.append("steady step reading the skip count")
    if where:
        header.append("where (steady step; refresh step)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in PROJECTED:
        for nonfinite in ("raise", "skip_on_device"):
            steps = projected_syncs_per_step(name, nonfinite)
            cells = [
                name,
                f"`{nonfinite}`",
                _describe(steps.first),
                _describe(steps.steady),
                _describe(steps.refresh),
                _describe(steps.report),
            ]
            if where:
                cells.append(f"{_sources(steps.steady) or '-'}; {_sources(steps.refresh) or '-'}")
            print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--where", action="store_true", help="list where each sync comes from")
    parser.add_argument("--part", choices=("all", "mfac", "projected"), default="all")
    args = parser.parse_args()
    if args.part in ("all", "mfac"):
        _mfac_table(args.where)
    if args.part in ("all", "projected"):
        _projected_table(args.where)


if __name__ == "__main__":
    main()
