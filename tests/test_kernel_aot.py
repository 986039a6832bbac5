"""Every Triton kernel variant the library launches, compiled ahead of time for sm_80 and
sm_90 on this CPU-only machine (``benchmarks/kernel_aot.py``): it compiles, ``ptxas`` reports
no spills, and the window's rows are read with vector loads in every pass.

The interpreter the other kernel tests run in accepts things the compiler rejects and says
nothing about the machine code; this is the check that does. It runs in a subprocess, since
``TRITON_INTERPRET=1`` (set for the tests) replaces the kernels by interpreted ones. Cold,
the compilations take a minute or two on the 2-core development machine; Triton caches them
(``~/.triton/cache``), and a warm run takes a few seconds.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "kernel_aot.py"


@pytest.fixture(scope="module")
def records():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    result = subprocess.run(
        [sys.executable, str(TOOL), "--json"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if result.returncode == 3:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def name(record):
    return (
        f"{record['kernel']} {record['storage']}/{record['vector']} {record['switch']} "
        f"sm_{record['sm']}"
    )


def test_every_variant_compiles_for_both_architectures(records):
    kernels = {"dot_kernel", "combine_kernel", "gather_dot_kernel", "scatter_kernel"}
    assert {r["kernel"] for r in records} == kernels
    for sm in (80, 90):
        ours = [r for r in records if r["sm"] == sm]
        assert len(ours) == len(records) // 2
        # every storage dtype with every vector dtype, both switches of the dense kernels
        dot = {
            (r["storage"], r["vector"], r["switch"]) for r in ours if r["kernel"] == "dot_kernel"
        }
        assert len(dot) == 4 * 2 * 2
    failed = [f"{name(r)}: {r['error']}" for r in records if "error" in r]
    assert not failed, "\n".join(failed)


def test_no_variant_spills(records):
    spilling = [
        f"{name(r)}: {r['registers']} registers, spills {r['spill_stores']}/{r['spill_loads']} B"
        for r in records
        if "error" not in r and (r["spill_stores"] or r["spill_loads"])
    ]
    assert not spilling, "\n".join(spilling)


def test_the_rows_are_read_with_vector_loads_only(records):
    """``G`` in both dense passes, ``values`` and ``indices`` in both sparse ones; the sparse
    gathers ``x[indices]`` are exempt."""
    scalar = []
    for r in records:
        if "error" in r:
            continue
        for operand in r["rows"]:
            kinds = r["loads"].get(operand)
            assert kinds, f"{name(r)}: no load of {operand} found in the PTX"
            plain = {k: n for k, n in kinds.items() if ".v2." not in k and ".v4." not in k}
            if plain:
                scalar.append(f"{name(r)}: {operand} {plain}")
        assert "?" not in r["loads"], f"{name(r)}: a load traced to no argument"
    assert not scalar, "scalar loads of the window's rows:\n" + "\n".join(scalar)
