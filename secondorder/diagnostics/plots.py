"""Figures of curvature diagnostics, written as PNG files (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..curvature.spectrum import SpectralDensity

__all__ = ["plot_metrics", "plot_spectral_density", "read_metrics"]


def read_metrics(path: str | Path) -> dict[str, list[float]]:
    """The columns of a :class:`~.CurvatureMonitor` CSV file as lists of floats.

    Returns:
        ``{column name: its values}``, in the file's order.

    Raises:
        ValueError: the file holds a header but no rows.
    """
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return {name: [float(row[name]) for row in rows] for name in rows[0]}


def plot_metrics(
    runs: str | Path | Mapping[str, str | Path],
    out: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    title: str = "Curvature during training",
) -> Path:
    """One panel per metric against the step, one line per run that logged it.

    Runs that logged different metrics each appear in the panels of theirs;
    ``hessian_trace`` gets a band of ± its standard error. Needs matplotlib (the ``plot``
    extra); pyplot's state is left alone.

    Args:
        runs: a monitor CSV file, or ``{label: CSV file}`` to compare runs.
        out: the PNG file to write (its folder is created).
        metrics: the panels; by default every metric column any run has (not ``seconds``),
            in the order they first appear.
        title: the figure's title.

    Returns:
        ``out``, as a ``Path``.

    Raises:
        ValueError: a metric asked for is in no run, or a file holds no rows.
        ImportError: matplotlib is not installed.
    """
    if not isinstance(runs, Mapping):
        runs = {"": runs}
    tables = {label: read_metrics(path) for label, path in runs.items()}
    chosen = panels(tables, metrics)
    columns = min(len(chosen), 2)
    rows = math.ceil(len(chosen) / columns)
    figure = _figure(figsize=(5.2 * columns, 3.4 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax, (metric, labels) in zip(axes.flat, chosen.items(), strict=False):
        for label in labels:
            table = tables[label]
            (line,) = ax.plot(table["step"], table[metric], marker=".", label=label or None)
            error = table.get(f"{metric}_std_error")
            if error is not None:
                low = [v - e for v, e in zip(table[metric], error, strict=True)]
                high = [v + e for v, e in zip(table[metric], error, strict=True)]
                ax.fill_between(table["step"], low, high, color=line.get_color(), alpha=0.2)
        ax.set(title=metric.replace("_", " "), xlabel="step")
        ax.grid(alpha=0.3)
        if len(tables) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(chosen) :]:
        ax.set_visible(False)
    figure.suptitle(title)
    return _save(figure, out)


def panels(
    tables: Mapping[str, Mapping[str, list[float]]], metrics: Sequence[str] | None
) -> dict[str, list[str]]:
    """``{metric: labels of the runs that logged it}`` for each panel of :func:`plot_metrics`.

    ``metrics=None`` takes every metric column of any run; a metric no run has is an error."""
    if metrics is None:
        metrics = list(
            dict.fromkeys(
                column
                for table in tables.values()
                for column in table
                if column not in ("step", "seconds") and not column.endswith("_std_error")
            )
        )
    chosen = {metric: [label for label, t in tables.items() if metric in t] for metric in metrics}
    missing = [metric for metric, labels in chosen.items() if not labels]
    if missing:
        have = sorted({c for t in tables.values() for c in t})
        raise ValueError(f"no run has a column {missing[0]!r}; the runs have {have}")
    return chosen


def plot_spectral_density(
    density: SpectralDensity,
    out: str | Path,
    *,
    eigenvalues: torch.Tensor | Sequence[float] | None = None,
    title: str = "Spectral density",
) -> Path:
    """The density on a log scale, so that the bulk and the outliers both show.

    Args:
        density: from :func:`~secondorder.curvature.spectral_density`.
        out: the PNG file to write (its folder is created).
        eigenvalues: marked as vertical lines (e.g. from
            :func:`~secondorder.curvature.top_eigenvalues`).
        title: the figure's title.

    Returns:
        ``out``, as a ``Path``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    figure = _figure(figsize=(6.4, 4.0))
    ax = figure.subplots()
    floor = 1e-12 * float(density.density.max())
    ax.semilogy(density.grid.numpy(), density.density.clamp_min(floor).numpy())
    for value in [] if eigenvalues is None else [float(v) for v in eigenvalues]:
        ax.axvline(value, color="tab:red", alpha=0.5, linewidth=1)
    ax.set(
        title=title,
        xlabel="eigenvalue",
        ylabel=f"density (Gaussian σ = {density.sigma:.3g})",
        ylim=(max(floor, 1e-6 * float(density.density.max())), None),
    )
    ax.grid(alpha=0.3)
    return _save(figure, out)


def _figure(figsize: tuple[float, float]):
    """A matplotlib ``Figure`` not attached to pyplot: no backend is chosen or changed."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'secondorder[plot]'") from error
    return Figure(figsize=figsize)


def _save(figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    return out
