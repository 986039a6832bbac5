"""The demo's report: a markdown file with tables and PNG figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .._checks import format_bytes as format_bytes  # the benchmarks' byte counts too


def markdown_row(cells: Sequence[object]) -> str:
    """One row of a markdown table: print ``markdown_table(header, [])`` first, then each row
    as it is measured."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = [markdown_row(header), "|" + "---|" * len(header)]
    lines += [markdown_row(row) for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(
    curves: dict[str, Sequence[float]],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    smooth: int = 1,
    logy: bool = False,
) -> Path | None:
    """Line plot of named curves (a running mean over ``smooth`` points); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for name, values in curves.items():
        values = running_mean(values, smooth)
        axes.plot(range(1, len(values) + 1), values, label=name)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


class Report:
    """Sections of markdown collected by the demo and written to ``out/report.md``."""

    def __init__(self, out: Path, title: str) -> None:
        self.out = out
        self.parts = [f"# {title}\n"]
        out.mkdir(parents=True, exist_ok=True)

    def section(self, title: str, body: str) -> None:
        self.parts.append(f"## {title}\n\n{body.strip()}\n")

    def figure(self, path: Path | None, caption: str) -> str:
        if path is None:
            return "_(figure skipped: install matplotlib, the `plot` extra)_"
        return f"![{caption}]({path.relative_to(self.out).as_posix()})"

    def write(self) -> Path:
        path = self.out / "report.md"
        path.write_text("\n".join(self.parts))
        return path
