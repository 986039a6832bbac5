"""``make demo`` / ``secondorder demo``: every capability of the library on real, embedded data.

Each section is a module with a ``TITLE`` and a ``run(report, quick=, show_progress=)``
function that prints its results and adds them to the markdown report.
"""

from __future__ import annotations

import time
from pathlib import Path

from .._workloads.report import Report
from . import curvature, lowrank, optimizers, pruning

SECTIONS = {
    "optimizers": optimizers,
    "curvature": curvature,
    "lowrank": lowrank,
    "pruning": pruning,
}


def run_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    sections: list[str] | None = None,
    show_progress: bool = True,
) -> Path:
    """Run the chosen sections (all by default) and return the path of ``report.md``."""
    chosen = list(SECTIONS) if sections is None else sections
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown demo sections {unknown}; choose from {sorted(SECTIONS)}")
    report = Report(Path(out), "secondorder demo")
    start = time.perf_counter()
    for name in chosen:
        SECTIONS[name].run(report, quick=quick, show_progress=show_progress)
    path = report.write()
    print(f"\nreport written to {path} ({time.perf_counter() - start:.0f} s)")
    return path
