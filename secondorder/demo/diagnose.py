"""``secondorder diagnose``: the curvature of a digits CNN, trained here or loaded, with figures."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._workloads.data import Split, load_digits
from .._workloads.models import digits_cnn
from .._workloads.report import text_table
from .._workloads.training import train_classifier
from ..curvature import (
    Eigenpairs,
    HessianOperator,
    SpectralDensity,
    TraceEstimate,
    hutchinson_trace,
    spectral_density,
    top_eigenvalues,
)
from ..diagnostics import CurvatureMonitor, plot_metrics, plot_spectral_density
from .optimizers import OPTIMIZERS


@dataclass
class Curvature:
    """What :func:`measure_curvature` found, and how long each estimate took."""

    parameters: int
    samples: int
    trace: TraceEstimate
    top: Eigenpairs
    density: SpectralDensity
    seconds: dict[str, float]


def run_diagnose(
    out: str | Path = "runs/diagnose",
    *,
    checkpoint: str | Path | None = None,
    optimizer: str = "SGD+momentum",
    epochs: int = 5,
    samples: int = 512,
    num_matvecs: int = 60,
    top_k: int = 5,
    quick: bool = False,
    show_progress: bool = True,
) -> dict:
    """Train (or load) the digits CNN, then measure its Hessian on ``samples`` training images.

    Writes to ``out``: ``model.pt`` (when trained here), ``metrics.csv`` and
    ``metrics.png`` (the curvature during training), ``density.png`` (the
    spectral density with the top eigenvalues marked) and ``summary.json``,
    which it also returns.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_digits()
    if quick:
        train = Split(train.inputs[:256], train.targets[:256])
        epochs, samples, num_matvecs, top_k = 1, 128, 9, 2
    model = digits_cnn()
    summary: dict = {"samples": samples}
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        summary["checkpoint"] = str(checkpoint)
    else:
        summary["trained"] = train_model(
            model, optimizer, train, test, epochs, out, quick=quick, show_progress=show_progress
        )
    held = Split(train.inputs[:samples], train.targets[:samples])
    runs, iters = (3, 10) if quick else (8, 40)
    curvature = measure_curvature(
        model, held, num_matvecs, top_k, runs, iters, show_progress=show_progress
    )
    summary |= summarise(curvature)
    write_report(out, curvature, summary)
    return summary


def train_model(
    model: nn.Module,
    optimizer: str,
    train: Split,
    test: Split,
    epochs: int,
    out: Path,
    *,
    quick: bool,
    show_progress: bool,
) -> dict:
    """Train ``model`` with one of the demo's optimisers while a :class:`CurvatureMonitor`
    logs sharpness and traces to ``out/metrics.csv``; save ``model.pt`` and ``metrics.png``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {sorted(OPTIMIZERS)}")
    torch.manual_seed(0)
    monitor = CurvatureMonitor(
        model, nn.functional.cross_entropy, (train.inputs[:128], train.targets[:128]),
        every=5 if quick else 10, writer=out / "metrics.csv", num_matvecs=6 if quick else 30,
        lanczos_iters=5 if quick else 20,
    )  # fmt: skip
    monitor.compute(0)
    result = train_classifier(
        optimizer, model, OPTIMIZERS[optimizer], train, test, epochs=epochs, batch_size=64,
        show_progress=show_progress, on_step=monitor.step,
    )  # fmt: skip
    torch.save(model.state_dict(), out / "model.pt")
    _plot(plot_metrics, out / "metrics.csv", out / "metrics.png")
    return {"optimizer": optimizer, "epochs": epochs, "test_accuracy": result.test_accuracy}


def measure_curvature(
    model: nn.Module,
    held: Split,
    num_matvecs: int,
    top_k: int,
    runs: int,
    iters: int,
    *,
    show_progress: bool,
) -> Curvature:
    """Hutch++ trace, Lanczos top eigenvalues and the SLQ density of the Hessian on ``held``."""
    model.eval()
    # one bar per long loop: Lanczos and quadrature have theirs, so none per product
    op = HessianOperator(model, nn.functional.cross_entropy, None, list(held.batches(128)))
    generator = torch.Generator().manual_seed(0)
    seconds = {}
    start = time.perf_counter()
    trace = hutchinson_trace(op, num_matvecs, generator=generator)
    seconds["hessian_trace"] = time.perf_counter() - start
    start = time.perf_counter()
    top = top_eigenvalues(op, top_k, generator=generator, progress=show_progress)
    seconds["top_eigenvalues"] = time.perf_counter() - start
    start = time.perf_counter()
    density = spectral_density(op, runs, iters, generator=generator, progress=show_progress)
    seconds["spectral_density"] = time.perf_counter() - start
    return Curvature(op.dim, len(held), trace, top, density, seconds)


def summarise(curvature: Curvature) -> dict:
    """The measurements as plain values, for ``summary.json``."""
    trace, top, density = curvature.trace, curvature.top, curvature.density
    return {
        "parameters": curvature.parameters,
        "hessian_trace": {
            "value": trace.value, "std_error": trace.std_error, "num_matvecs": trace.num_matvecs,
        },
        "top_eigenvalues": {
            "values": top.eigenvalues.tolist(), "residual_norms": top.residual_norms.tolist(),
            "converged": top.converged, "num_matvecs": top.num_matvecs,
        },
        "spectral_density": {
            "num_runs": density.nodes.shape[0], "num_iters": density.nodes.shape[1],
            "sigma": density.sigma, "trace_estimate": density.spectral_sum(lambda x: x),
            "num_matvecs": density.num_matvecs,
        },
        "seconds": curvature.seconds,
    }  # fmt: skip


def write_report(out: Path, curvature: Curvature, summary: dict) -> None:
    """``summary.json``, ``density.png`` and the table printed."""
    trace, top, density = curvature.trace, curvature.top, curvature.density
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(
        plot_spectral_density, density, out / "density.png", eigenvalues=top.eigenvalues,
        title=f"Hessian spectral density, digits CNN, {curvature.samples} images",
    )  # fmt: skip
    rows = [
        [
            "Hessian trace (Hutch++)",
            f"{trace.value:.2f} ± {trace.std_error:.2f}",
            trace.num_matvecs,
        ],
        [
            f"top {len(top.eigenvalues)} eigenvalues (Lanczos)",
            ", ".join(f"{v:.3f}" for v in top.eigenvalues.tolist())
            + ("" if top.converged else " (not converged)"),
            top.num_matvecs,
        ],
        [
            "trace from the density (SLQ)",
            f"{density.spectral_sum(lambda x: x):.2f}",
            density.num_matvecs,
        ],
    ]
    print(
        f"\nHessian of the digits CNN ({curvature.parameters} parameters) on "
        f"{curvature.samples} training images"
    )
    print(text_table(["quantity", "value", "products"], rows))
    print(f"written to {out}/")


def _plot(plot, *args, **kwargs) -> None:
    try:
        plot(*args, **kwargs)
    except ImportError as error:
        print(f"figure skipped: {error}")
