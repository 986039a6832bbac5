"""Curvature of the loss, measured on a held batch while a model trains."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._checks import check_positive_int
from ..curvature import (
    HessianOperator,
    empirical_fisher_diagonal,
    hutchinson_trace,
    top_eigenvalues,
)

__all__ = ["METRICS", "CurvatureMonitor"]

METRICS = ("hessian_trace", "top_eigenvalue", "fisher_trace", "grad_norm", "loss")
"""The metrics :class:`CurvatureMonitor` can measure (all but ``"loss"`` by default)."""
DEFAULT_METRICS = ("hessian_trace", "top_eigenvalue", "fisher_trace", "grad_norm")


class CurvatureMonitor:
    """Logs curvature metrics of ``loss_fn`` on held data every ``every`` steps of training.

    Call :meth:`step` after each optimiser step; on steps divisible by
    ``every`` it computes the chosen ``metrics`` on ``data`` with the model in
    eval mode (its mode is restored after), appends a row to :attr:`history`,
    and logs it. The cost of a call is bounded, whatever the model or the stage
    of training, and paid only on those steps:

    - ``"hessian_trace"``: Hutch++ with ``num_matvecs`` Hessian-vector products
      (three batched passes over ``data``); its standard error is logged as
      ``hessian_trace_std_error``.
    - ``"top_eigenvalue"``: the sharpness, largest Hessian eigenvalue, by Lanczos:
      at most ``lanczos_iters + 1`` products, stopping early at relative residual
      ``lanczos_tol``; the true residual ``‖Hx − λx‖`` (a bound on the error of λ)
      is logged as ``top_eigenvalue_residual``.
    - ``"fisher_trace"``: the exact trace of the empirical Fisher, ``(1/N) Σ_i ‖∇ℓ_i‖²``:
      one pass of per-sample gradients.
    - ``"grad_norm"`` and ``"loss"``: ``‖∇L‖`` and ``L``: one backward pass (shared).

    Each row also records ``seconds``, the wall time of the call.

    Args:
        model: the model being trained (its parameters are read, never written).
        loss_fn: ``loss_fn(outputs, targets)``, the mean over a batch.
        data: the held data: one ``(inputs, targets)`` batch or a list of them. Keep it
            small: every product is a pass over it.
        every: compute on steps divisible by this.
        metrics: any of :data:`METRICS`.
        writer: where rows go besides :attr:`history`: ``None``; a path, for a CSV
            file (rewritten with a header at construction); or a TensorBoard
            ``SummaryWriter`` (scalars under ``curvature/``), in which case the
            CSV goes to ``curvature.csv`` in its ``log_dir``.
        params: the parameters to measure with respect to (``None``: all that require grad
            at each measurement, so a layer frozen or unfrozen during training leaves or
            joins the measurement).
        num_matvecs, lanczos_iters, lanczos_tol: the cost bounds above.
        seed: seeds the probe vectors, so runs are reproducible.

    Raises:
        ValueError: ``metrics`` is empty or names one not in :data:`METRICS`; ``every``,
            ``num_matvecs`` or ``lanczos_iters`` is not a positive integer, or
            ``num_matvecs < 3`` with ``"hessian_trace"`` (Hutch++ needs three); ``data``
            holds no batches.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        data: tuple[Any, Any] | Sequence[tuple[Any, Any]],
        *,
        every: int = 100,
        metrics: Iterable[str] = DEFAULT_METRICS,
        writer: str | Path | Any | None = None,
        params: Iterable[torch.Tensor] | None = None,
        num_matvecs: int = 30,
        lanczos_iters: int = 20,
        lanczos_tol: float = 1e-2,
        seed: int = 0,
    ) -> None:
        self.metrics = tuple(metrics)
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown or not self.metrics:
            raise ValueError(f"unknown or no metrics {unknown}; choose from {METRICS}")
        self.model = model
        self.loss_fn = loss_fn
        self.data = _as_batches(data)
        self.every = check_positive_int(every, "every")
        self.params = None if params is None else list(params)
        self.num_matvecs = check_positive_int(num_matvecs, "num_matvecs")
        if "hessian_trace" in self.metrics and num_matvecs < 3:
            raise ValueError(f"Hutch++ needs num_matvecs >= 3, got {num_matvecs}")
        self.lanczos_iters = check_positive_int(lanczos_iters, "lanczos_iters")
        self.lanczos_tol = lanczos_tol
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[dict[str, float]] = []
        self._hessian: HessianOperator | None = None

        self.columns = ["step"]
        for name in self.metrics:
            self.columns.append(name)
            if name == "hessian_trace":
                self.columns.append("hessian_trace_std_error")
            if name == "top_eigenvalue":
                self.columns.append("top_eigenvalue_residual")
        self.columns.append("seconds")

        # any object with SummaryWriter's add_scalar, flush and log_dir
        tensorboard: Any = writer if hasattr(writer, "add_scalar") else None
        self.tensorboard = tensorboard
        if tensorboard is not None:
            self.csv_path: Path | None = Path(tensorboard.log_dir) / "curvature.csv"
        else:
            self.csv_path = None if writer is None else Path(writer)
        if self.csv_path is not None:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            with self.csv_path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)

    def step(self, step: int) -> dict[str, float] | None:
        """Compute and log the metrics if ``step`` is a multiple of ``every``.

        Args:
            step: the training step just taken (the row's ``step`` column).

        Returns:
            The row :meth:`compute` logged (``{column: value}``), or ``None`` on the other
            steps.
        """
        if step % self.every != 0:
            return None
        return self.compute(step)

    def compute(self, step: int) -> dict[str, float]:
        """Compute and log the metrics now, labelled ``step``, whatever ``every`` says.

        Returns:
            The row appended to :attr:`history`: ``step``, each metric (with
            ``hessian_trace_std_error`` and ``top_eigenvalue_residual`` beside theirs) and
            ``seconds``.
        """
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            row = {"step": step, **self._measure()}
        finally:
            self.model.train(was_training)
        row["seconds"] = time.perf_counter() - start
        self.history.append(row)
        self._log(row)
        return row

    def _operator(self) -> HessianOperator:
        """The Hessian with respect to the parameters measured now, built (and checked for
        determinism) on first use and again when the parameters that require grad change."""
        params = self.params
        if params is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
        if self._hessian is None or list(map(id, self._hessian.params)) != list(map(id, params)):
            self._hessian = HessianOperator(self.model, self.loss_fn, params, self.data)
        return self._hessian

    def _measure(self) -> dict[str, float]:
        op = self._operator()
        values: dict[str, float] = {}
        if "hessian_trace" in self.metrics:
            estimate = hutchinson_trace(op, self.num_matvecs, generator=self.generator)
            values["hessian_trace"] = estimate.value
            values["hessian_trace_std_error"] = estimate.std_error
        if "top_eigenvalue" in self.metrics:
            top = top_eigenvalues(
                op, 1, tol=self.lanczos_tol, max_iter=self.lanczos_iters,
                generator=self.generator, progress=False,
            )  # fmt: skip
            values["top_eigenvalue"] = float(top.eigenvalues[0])
            values["top_eigenvalue_residual"] = float(top.residual_norms[0])
        if "fisher_trace" in self.metrics:
            diagonal = empirical_fisher_diagonal(  # inside a training loop: no bar of its own
                self.model, self.loss_fn, op.params, self.data, progress=False
            )
            values["fisher_trace"] = float(sum(d.sum() for d in diagonal))
        if "grad_norm" in self.metrics or "loss" in self.metrics:
            loss, gradient = op.loss_and_gradient()
            if "grad_norm" in self.metrics:
                values["grad_norm"] = float(gradient.norm())
            if "loss" in self.metrics:
                values["loss"] = float(loss)
        return values

    def _log(self, row: dict[str, float]) -> None:
        if self.csv_path is not None:
            with self.csv_path.open("a", newline="") as f:
                csv.writer(f).writerow([row.get(c, math.nan) for c in self.columns])
        if self.tensorboard is not None:
            for name in self.columns[1:]:
                self.tensorboard.add_scalar(f"curvature/{name}", row[name], row["step"])
            self.tensorboard.flush()


def _as_batches(data: Any) -> list[tuple[Any, Any]]:
    """One ``(inputs, targets)`` batch, or a sequence of them, as a list of batches."""
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        return [data]
    batches = list(data)
    if not batches:
        raise ValueError("data holds no batches")
    return batches
