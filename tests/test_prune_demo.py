"""The pruning scripts run end to end on the real digits (smoke tests; quality is in the benchmark)."""

from secondorder.cli import main
from secondorder.demo import pruning
from secondorder.demo.report import Report


def test_demo_section_quick(tmp_path):
    report = Report(tmp_path, "demo")
    pruning.run(report, quick=True, show_progress=False)
    text = report.write().read_text()
    assert pruning.TITLE in text
    assert (
        "| sparsity | M-FAC one-shot | magnitude one-shot | M-FAC gradual | magnitude gradual |"
        in text
    )
    assert (tmp_path / "pruning.png").exists()


def test_cli_prune(tmp_path, capsys):
    main(
        [
            *("prune", "--models", "mlp", "--sparsities", "0.5", "--gradual-epochs", "0"),
            *("--train-epochs", "1", "--out", str(tmp_path), "--no-progress"),
        ]
    )
    out = capsys.readouterr().out
    assert "M-FAC one-shot" in out and "0.50" in out
    assert (tmp_path / "sparsity_accuracy.png").exists()
