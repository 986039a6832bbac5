"""The ``secondorder`` console script: its help, its choices, its progress bars, its outputs."""

import argparse

import pytest
from _bars import record_bars

from secondorder import cli


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices


def test_description_is_prose():
    description = cli.build_parser().description
    assert "``" not in description and "Second-order" in description


@pytest.mark.parametrize("command", ["demo", "prune", "diagnose", "lowrank"])
def test_every_option_has_help(command):
    for action in _subcommands()[command]._actions:
        assert action.help, f"{command} {action.option_strings} has no help"


def test_named_choices_are_the_demos_names():
    from secondorder.demo import SECTIONS
    from secondorder.demo.lowrank import OPTIMIZERS as LOWRANK
    from secondorder.demo.optimizers import OPTIMIZERS

    def choices(command, option):
        (action,) = [a for a in _subcommands()[command]._actions if option in a.option_strings]
        return list(action.choices)

    assert choices("demo", "--sections") == list(SECTIONS)
    assert choices("diagnose", "--optimizer") == list(OPTIMIZERS)
    assert choices("lowrank", "--optimizers") == list(LOWRANK)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["lowrank", "--optimizers", "Adam"])


def test_diagnose_opens_one_labelled_bar_per_long_loop(tmp_path, monkeypatch):
    """It opened a nested "HessianOperator" bar for every Lanczos product (36 here)."""
    bars = record_bars(monkeypatch)
    cli.main(["diagnose", "--quick", "--out", str(tmp_path)])
    assert [bar.desc for bar in bars.bars] == ["SGD+momentum", "Lanczos", "Lanczos quadrature"]
    assert not any(bar.nested for bar in bars.bars)
    written = {"summary.json", "density.png", "model.pt", "metrics.csv", "metrics.png"}
    assert written <= {path.name for path in tmp_path.iterdir()}  # what --out promises
