import re

import pytest

from secondorder.cli import main
from secondorder.demo import run_demo


def test_quick_demo_from_the_command_line_writes_a_report(tmp_path, capsys):
    main(["demo", "--quick", "--no-progress", "--sections", "optimizers", "--out", str(tmp_path)])
    assert "report written to" in capsys.readouterr().out
    text = (tmp_path / "report.md").read_text()
    assert "| MFAC |" in text and "| AdamW |" in text
    sparse_row = next(line for line in text.splitlines() if line.startswith("| MFAC sparse 1% |"))
    assert re.search(r"\| [\d.]+ [KM]iB \|", sparse_row)  # its window's bytes beside its accuracy
    assert "Where M-FAC helps" in text and "Where it does not" in text
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown demo sections"):
        run_demo(tmp_path, sections=["nonsense"])
