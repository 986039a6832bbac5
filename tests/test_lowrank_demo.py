"""The low-rank demo section, its CLI command and its data run, quickly."""

import torch

from secondorder._workloads.data import load_stdlib_corpus
from secondorder._workloads.report import Report
from secondorder.cli import main
from secondorder.demo import SECTIONS, lowrank


def test_stdlib_corpus_is_fixed_and_split():
    corpus = load_stdlib_corpus(100_000, valid_fraction=0.2)
    again = load_stdlib_corpus(100_000, valid_fraction=0.2)
    assert len(corpus.train) == 80_000 and len(corpus.valid) == 20_000
    assert torch.equal(corpus.train, again.train) and corpus.files == again.files
    assert list(corpus.files) == sorted(corpus.files)
    inputs, targets = corpus.batch("valid", 3, 16, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (3, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the next bytes
    assert int(corpus.train.max()) < corpus.vocab_size


def test_quick_demo_section_writes_its_table(tmp_path, capsys):
    assert SECTIONS["lowrank"] is lowrank
    report = Report(tmp_path, "test")
    lowrank.run(report, quick=True, show_progress=False)
    text = report.write().read_text()
    for name in ("AdamW", "GaLoreAdamW", "NaturalGaLore", "DCTAdamW", "SST"):
        assert f"| {name} |" in text
    assert "valid loss" in capsys.readouterr().out


def test_cli_lowrank_quick(capsys):
    main(["lowrank", "--quick", "--optimizers", "DCTAdamW", "--no-progress"])
    out = capsys.readouterr().out
    assert "DCTAdamW" in out and "GaLoreAdamW" not in out
