"""The pruning scripts run end to end on the real digits (smoke tests; quality is in the benchmark)."""

import re

from _bars import record_bars

from secondorder._workloads import llama_pruning as llm_pruning
from secondorder._workloads.report import Report
from secondorder.cli import main
from secondorder.demo import pruning


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
    assert llm_pruning.TITLE in text
    assert "| method | 50% | 70% | 2:4 |" in text
    assert "| SparseGPT | 2:4 |" in text
    assert (tmp_path / "llama_pruning.png").exists()


def test_cli_prune(tmp_path, capsys, monkeypatch):
    """Prints and writes the table and the plot (--out promises both), with one labelled
    progress bar per long loop and none nested (there were 16 "M-FAC gradients" bars)."""
    bars = record_bars(monkeypatch)
    main(
        [
            *("prune", "--models", "mlp", "--sparsities", "0.5", "--gradual-epochs", "0"),
            *("--train-epochs", "1", "--out", str(tmp_path)),
        ]
    )
    out = capsys.readouterr().out
    assert "M-FAC one-shot" in out and "0.50" in out
    assert (tmp_path / "sparsity_accuracy.png").exists()
    table = (tmp_path / "table.md").read_text()
    assert "| sparsity | M-FAC one-shot | magnitude one-shot |" in table and "| 0.50 |" in table
    assert [bar.desc for bar in bars.bars] == ["mlp", "digits mlp: pruning"]
    assert not any(bar.nested for bar in bars.bars)


def test_cli_prune_llama_quick(tmp_path, capsys):
    main(["prune", "--models", "llama", "--quick", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    for method in llm_pruning.METHODS:
        assert method in out
    for method, (pattern, _) in llm_pruning.QUANTIZATIONS.items():
        assert re.search(rf"^ *{re.escape(method)} +{re.escape(pattern)} +\d\.\d{{3}}$", out, re.M)
    table = (tmp_path / "llama_pruning.md").read_text()
    assert "| M-FAC (layer) | 70% |" in table and "peak memory" in table
    assert "| GPTQ | 4-bit g128 |" in table and "| SparseGPT + GPTQ | 50% + 4-bit g128 |" in table
    assert (tmp_path / "llama_pruning.png").exists()
    assert not (tmp_path / "cache").exists()  # --quick trains in seconds and caches nothing
