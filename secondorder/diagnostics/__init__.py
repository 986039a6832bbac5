"""Curvature diagnostics during training: a monitor for the training loop, and its plots."""

from .monitor import METRICS, CurvatureMonitor
from .plots import plot_metrics, plot_spectral_density, read_metrics

__all__ = ["METRICS", "CurvatureMonitor", "plot_metrics", "plot_spectral_density", "read_metrics"]
