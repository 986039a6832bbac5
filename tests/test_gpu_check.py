"""``benchmarks/gpu_check.py --dry-run``: every GPU check of the library, run on the CPU at
tiny sizes with the Triton kernels interpreted, so that the command stays ready for the
next GPU. Run as a user runs it (a subprocess, which also keeps its ``TRITON_INTERPRET=1``
out of this process): one row per kernel, per optimiser and per check, none failed; what
only a device can tell says "needs CUDA"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import secondorder.optim
from secondorder import kernels
from secondorder.kernels import reference

pytestmark = pytest.mark.slow  # two runs of the script: about 50 s on the development CPU

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

KERNELS = "Triton kernels against their torch twins"
WINDOWS = "M-FAC window step against the memory-bandwidth floor"
SYNCS = "Host synchronisations per steady step"
SKIP = 'A NaN step: nonfinite="skip_on_device" against torch.amp.GradScaler'
STEPS = "One optimiser step on a Llama-shaped model"
PRUNING = "SparseGPT and GPTQ on one layer against the authors' routines"
GRAD_SCALER = "torch.optim.AdamW(fused=True) + GradScaler"


def dry_run(out: Path, *args: str) -> str:
    """The report the dry run prints (and writes to ``out``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SECONDORDER_KERNELS")}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # this checkout
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_text() in result.stdout
    return result.stdout


def tables(report: str) -> dict[str, dict[str, list[str]]]:
    """Each table of the report by its title: its rows by their first cell."""
    found = {}
    for section in report.split("\n## ")[1:]:
        title, *lines = section.splitlines()
        rows = [line.strip("|").split(" | ") for line in lines if line.startswith("| ")]
        found[title] = {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows[1:]}
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, dict[str, list[str]]]:
    return tables(dry_run(tmp_path_factory.mktemp("gpu_check") / "report.md"))


def kernel_names() -> list[str]:
    return [name for name in kernels.__all__ if callable(getattr(reference, name, None))]


def test_every_check_has_its_table_and_no_row_failed(report):
    assert list(report) == [KERNELS, WINDOWS, SYNCS, SKIP, STEPS, PRUNING]
    for title, rows in report.items():
        for label, cells in rows.items():
            assert not cells[-1].startswith(("error", "skipped")), (title, label, cells[-1])


def test_one_row_per_kernel_each_interpreted_and_within_tolerance(report):
    rows = report[KERNELS]
    assert set(rows) == set(kernel_names()) == {
        "row_dots", "write_row_and_dot", "combine", "gather_dots", "scatter_combine"
    }  # fmt: skip
    for cells in rows.values():
        assert cells[0] == "triton, interpreted"
        assert cells[4] == "ok"
        assert "needs CUDA" in cells[-1]


def test_the_windows_dense_bf16_and_sparse_at_both_sizes(report):
    rows = report[WINDOWS]
    assert len(rows) == 1 + 3 * 2  # the copy, then three windows at each of two sizes
    for label, cells in rows.items():
        if label.startswith(("float32", "bfloat16", "sparse")):
            assert cells[1] == "triton, interpreted" and "needs CUDA" in cells[-1], label
            assert float(cells[4]) > 0  # step / floor


def test_one_row_per_optimizer_in_each_optimizer_check(report):
    names = list(secondorder.optim.__all__)
    assert list(report[SYNCS]) == names
    assert list(report[SKIP]) == [*names, GRAD_SCALER]
    assert list(report[STEPS]) == ["torch.optim.AdamW(fused=True)", *names]
    for cells in report[STEPS].values():
        assert float(cells[1]) > 0 and cells[3] == "needs CUDA"  # the peak: a device's


def test_a_nan_step_is_skipped_bit_for_bit(report):
    """Every optimiser that accepts skip_on_device, and torch's GradScaler recipe, leave
    weights and state as a run without the step; MFAC refuses the setting."""
    for label, cells in report[SKIP].items():
        if cells[-1].startswith("not supported"):
            assert label == "MFAC"
            continue
        assert cells[:2] == ["yes", "yes"], label
    assert report[SYNCS]["MFAC"][1].startswith("not supported")
    for label, cells in report[SYNCS].items():
        assert cells[0].replace("/", "").isdigit(), label


def test_pruning_rows_say_what_was_not_given(report):
    rows = report[PRUNING]
    assert list(rows) == ["SparseGPT, 50%", "GPTQ, 4 bits"]
    assert rows["SparseGPT, 50%"][1] == "reference not given"
    try:
        import secondorder.quantize  # noqa: F401
    except ImportError:
        assert rows["GPTQ, 4 bits"][-1].startswith("not available in this build")
    else:
        assert rows["GPTQ, 4 bits"][1] == "reference not given"


def test_rows_past_the_time_budget_are_skipped_not_dropped(tmp_path):
    skipped = tables(dry_run(tmp_path / "report.md", "--budget", "0"))
    assert list(skipped) == [KERNELS, WINDOWS, SYNCS, SKIP, STEPS, PRUNING]
    assert set(skipped[KERNELS]) == set(kernel_names())
    assert list(skipped[SYNCS]) == list(secondorder.optim.__all__)
    for rows in skipped.values():
        for cells in rows.values():
            assert cells[-1] == "skipped: time budget"
