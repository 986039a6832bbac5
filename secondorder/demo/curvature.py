"""Demo section: sharpness and Hessian trace of the digits CNN while each optimiser trains it."""

from __future__ import annotations

import re

import torch
from torch import nn

from .._workloads.data import Split, load_digits
from .._workloads.models import digits_cnn
from .._workloads.report import Report, markdown_table, text_table
from .._workloads.training import train_classifier
from ..diagnostics import CurvatureMonitor, plot_metrics
from .optimizers import OPTIMIZERS

TITLE = "Curvature during training"


def run(report: Report, *, quick: bool, show_progress: bool) -> None:
    train, test = load_digits()
    if quick:
        train = Split(train.inputs[:256], train.targets[:256])
    held_size, epochs, every = (32, 1, 2) if quick else (256, 5, 10)
    num_matvecs, lanczos_iters = (6, 5) if quick else (30, 20)
    held = (train.inputs[:held_size], train.targets[:held_size])
    folder = report.out / "curvature"

    runs, rows, max_residual = {}, [], 0.0
    for name, make_optimizer in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = digits_cnn()
        runs[name] = folder / f"{re.sub(r'[^a-z0-9]+', '_', name.lower())}.csv"
        monitor = CurvatureMonitor(
            model, nn.functional.cross_entropy, held, every=every,
            metrics=("top_eigenvalue", "hessian_trace", "loss"), writer=runs[name],
            num_matvecs=num_matvecs, lanczos_iters=lanczos_iters,
        )  # fmt: skip
        monitor.compute(0)
        result = train_classifier(
            name, model, make_optimizer, train, test, epochs=epochs, batch_size=64,
            show_progress=show_progress, on_step=monitor.step,
        )  # fmt: skip
        history = monitor.history
        max_residual = max([max_residual] + [row["top_eigenvalue_residual"] for row in history])
        peak = max(history, key=lambda row: row["top_eigenvalue"])
        last = history[-1]
        rows.append(
            [
                name,
                f"{history[0]['top_eigenvalue']:.2f}",
                f"{peak['top_eigenvalue']:.2f} (step {peak['step']})",
                f"{last['top_eigenvalue']:.2f}",
                f"{last['hessian_trace']:.1f} ± {last['hessian_trace_std_error']:.1f}",
                f"{result.test_accuracy:.4f}",
                f"{sum(row['seconds'] for row in history):.1f}",
            ]
        )

    header = [
        "optimiser",
        "sharpness at init",
        "peak sharpness",
        "final sharpness",
        "final Hessian trace",
        "test accuracy",
        "curvature time (s)",
    ]
    print(f"\n{TITLE} (held batch of {held_size} training images, every {every} steps)")
    print(text_table(header, rows))
    try:
        figure = plot_metrics(
            runs, report.out / "curvature.png",
            metrics=["top_eigenvalue", "hessian_trace"],
            title=f"Digits CNN, held batch of {held_size} training images",
        )  # fmt: skip
    except ImportError:
        figure = None
    report.section(
        TITLE,
        f"The same digits CNN and initialisation trained by each optimiser of the "
        f"optimiser section for {epochs} epochs of batches of 64; every {every} steps the "
        f"`CurvatureMonitor` measures, on a fixed held batch of {held_size} training "
        f"images in eval mode, the sharpness (largest Hessian eigenvalue, Lanczos, at "
        f"most {lanczos_iters + 1} products; the largest residual ‖Hx − λx‖, a bound on "
        f"its error, was {max_residual:.2g}) and the Hessian trace (Hutch++, {num_matvecs} "
        f"products; ± one standard error). Per-step values are in "
        f"`curvature/*.csv`.\n\n" + markdown_table(header, rows) + "\n\n"
        + report.figure(figure, "sharpness and Hessian trace during training"),
    )  # fmt: skip
