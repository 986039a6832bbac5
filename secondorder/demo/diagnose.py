"""``secondorder diagnose``: the curvature of a digits CNN, trained here or loaded, with figures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from .._workloads.data import Split, load_digits
from .._workloads.models import digits_cnn
from .._workloads.report import text_table
from .._workloads.training import train_classifier
from ..curvature import HessianOperator, hutchinson_trace, spectral_density, top_eigenvalues
from ..diagnostics import CurvatureMonitor, plot_metrics, plot_spectral_density
from .optimizers import OPTIMIZERS


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
    runs, iters = (3, 10) if quick else (8, 40)
    loss_fn = nn.functional.cross_entropy
    model = digits_cnn()
    summary: dict = {"samples": samples}

    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        summary["checkpoint"] = str(checkpoint)
    else:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose from {sorted(OPTIMIZERS)}")
        torch.manual_seed(0)
        monitor = CurvatureMonitor(
            model, loss_fn, (train.inputs[:128], train.targets[:128]), every=5 if quick else 10,
            writer=out / "metrics.csv", num_matvecs=6 if quick else 30,
            lanczos_iters=5 if quick else 20,
        )  # fmt: skip
        monitor.compute(0)
        result = train_classifier(
            optimizer, model, OPTIMIZERS[optimizer], train, test, epochs=epochs, batch_size=64,
            show_progress=show_progress, on_step=monitor.step,
        )  # fmt: skip
        torch.save(model.state_dict(), out / "model.pt")
        _plot(plot_metrics, out / "metrics.csv", out / "metrics.png")
        summary["trained"] = {
            "optimizer": optimizer,
            "epochs": epochs,
            "test_accuracy": result.test_accuracy,
        }

    model.eval()
    held = Split(train.inputs[:samples], train.targets[:samples])
    # one bar per long loop: Lanczos and quadrature have theirs, so none per product
    op = HessianOperator(model, loss_fn, None, list(held.batches(128)))
    generator = torch.Generator().manual_seed(0)
    timings = {}

    start = time.perf_counter()
    trace = hutchinson_trace(op, num_matvecs, generator=generator)
    timings["hessian_trace"] = time.perf_counter() - start
    start = time.perf_counter()
    top = top_eigenvalues(op, top_k, generator=generator, progress=show_progress)
    timings["top_eigenvalues"] = time.perf_counter() - start
    start = time.perf_counter()
    density = spectral_density(op, runs, iters, generator=generator, progress=show_progress)
    timings["spectral_density"] = time.perf_counter() - start
    _plot(
        plot_spectral_density, density, out / "density.png", eigenvalues=top.eigenvalues,
        title=f"Hessian spectral density, digits CNN, {len(held)} images",
    )  # fmt: skip

    summary |= {
        "parameters": op.dim,
        "hessian_trace": {
            "value": trace.value, "std_error": trace.std_error, "num_matvecs": trace.num_matvecs,
        },
        "top_eigenvalues": {
            "values": top.eigenvalues.tolist(), "residual_norms": top.residual_norms.tolist(),
            "converged": top.converged, "num_matvecs": top.num_matvecs,
        },
        "spectral_density": {
            "num_runs": runs, "num_iters": iters, "sigma": density.sigma,
            "trace_estimate": density.spectral_sum(lambda x: x),
            "num_matvecs": density.num_matvecs,
        },
        "seconds": timings,
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    rows = [
        [
            "Hessian trace (Hutch++)",
            f"{trace.value:.2f} ± {trace.std_error:.2f}",
            trace.num_matvecs,
        ],
        [
            f"top {top_k} eigenvalues (Lanczos)",
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
    print(f"\nHessian of the digits CNN ({op.dim} parameters) on {len(held)} training images")
    print(text_table(["quantity", "value", "products"], rows))
    print(f"written to {out}/")
    return summary


def _plot(plot, *args, **kwargs) -> None:
    try:
        plot(*args, **kwargs)
    except ImportError as error:
        print(f"figure skipped: {error}")
