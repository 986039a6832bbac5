"""Smoke tests of the curvature demo section and of ``secondorder diagnose`` in quick mode."""

import json

from secondorder._workloads.report import Report
from secondorder.cli import main
from secondorder.demo import curvature
from secondorder.demo.optimizers import OPTIMIZERS
from secondorder.diagnostics import read_metrics


def test_demo_section_quick(tmp_path):
    report = Report(tmp_path, "test")
    curvature.run(report, quick=True, show_progress=False)
    text = report.write().read_text()
    assert f"## {curvature.TITLE}" in text and "curvature.png" in text
    assert (tmp_path / "curvature.png").exists()
    for name in OPTIMIZERS:
        assert name in text
    runs = sorted((tmp_path / "curvature").glob("*.csv"))
    assert len(runs) == len(OPTIMIZERS)
    for path in runs:
        metrics = read_metrics(path)
        assert metrics["step"] == [0.0, 2.0, 4.0]  # 4 steps of training, every 2
        assert all(value > 0 for value in metrics["top_eigenvalue"])


def test_diagnose_quick_trains_then_loads_a_checkpoint(tmp_path, capsys):
    main(["diagnose", "--quick", "--no-progress", "--out", str(tmp_path / "trained")])
    summary = json.loads((tmp_path / "trained" / "summary.json").read_text())
    assert summary["trained"]["optimizer"] == "SGD+momentum"
    assert len(summary["top_eigenvalues"]["values"]) == 2
    for name in ("model.pt", "metrics.csv", "metrics.png", "density.png"):
        assert (tmp_path / "trained" / name).exists(), name
    assert "Hessian trace (Hutch++)" in capsys.readouterr().out

    checkpoint = tmp_path / "trained" / "model.pt"
    main(["diagnose", "--quick", "--no-progress", "--checkpoint", str(checkpoint),
          "--out", str(tmp_path / "loaded")])  # fmt: skip
    loaded = json.loads((tmp_path / "loaded" / "summary.json").read_text())
    assert "trained" not in loaded and loaded["checkpoint"] == str(checkpoint)
    # Same weights, same data, same seed: the same top eigenvalues.
    assert loaded["top_eigenvalues"]["values"] == summary["top_eigenvalues"]["values"]
