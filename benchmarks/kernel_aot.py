"""Compile every Triton kernel variant the library launches, ahead of time, without a GPU.

    python benchmarks/kernel_aot.py            # a table: registers, spills, global loads
    python benchmarks/kernel_aot.py --json     # the same records as JSON (tests/test_kernel_aot.py)

Triton compiles on a CPU-only machine: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", capability, 32))`` returns the PTX, and the wheel's ``ptxas -v``
reports registers and spills. Each variant is what a launch from
:mod:`secondorder.kernels` would compile: the dtypes of the window's storage and of the
vectors (every pair a window can have: storage float16, bfloat16, float32 or float64,
vectors float32 or float64), the ``WRITE`` / ``HAS_X`` switch, the wrappers' block sizes
(their rule, :func:`~secondorder.kernels.dense_window.dot_blocks`, and their defaults
elsewhere, read from the wrappers so that this stays what they launch), and the
divisibility Triton's launcher specialises on: a pointer whose address, or an integer
whose value, is divisible by 16 is compiled as such. The windows pad their rows to a
multiple of 16 elements (:data:`secondorder.kernels.ROW_ALIGNMENT`), so the row length
and stride, and the buffers they allocate, are divisible; ``n`` and the slot being written
vary from step to step and are compiled unspecialised.

Each global load in the PTX is traced back, through the registers that form its address,
to the kernel argument whose pointer it starts from, so the loads are counted per operand:
``G`` (dense) and ``values`` / ``indices`` (sparse) are the window's rows, which must be
loaded with vector instructions (``ld.global.v4`` / ``.v2``); the sparse kernels' gathers
``x[indices]`` are scattered by nature and load one element at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ARCHS = (80, 90)
CANNOT_COMPILE = 3  # the exit status when Triton or ptxas is missing
STORAGE = ("float16", "bfloat16", "float32", "float64")
VECTORS = ("float32", "float64")
_TYPE = {
    "float16": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32",
    "float64": "fp64",
    "int32": "i32",
}


@dataclass
class Variant:
    kernel: str  # the JIT function's name in its module
    module: str  # "dense_window" or "sparse_window"
    storage: str
    vector: str
    switch: str  # "WRITE" / "HAS_X" / "" and its value, for the table
    signature: dict[str, str]
    constexprs: dict[str, object]
    divisible: list[str]  # arguments the launcher specialises as divisible by 16
    rows: list[str]  # the window's row operands: their loads must be vectorised
    gathers: list[str] = field(default_factory=list)  # loads exempt from the rule


def ptxas_path() -> Path | None:
    """The ``ptxas`` shipped in the Triton wheel, or ``None``."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _defaults(fn) -> dict[str, object]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def variants() -> list[Variant]:
    """Every variant the library's wrappers launch (see the module docstring)."""
    import torch

    from secondorder.kernels import dense_window, sparse_window
    from secondorder.kernels.dense_window import _TL_ACC
    from secondorder.kernels.reference import accumulation_dtype

    combine = _defaults(dense_window.combine)
    gather = _defaults(sparse_window.gather_dots)
    scatter = _defaults(sparse_window.scatter_combine)
    out: list[Variant] = []

    def add(kernel, module, storage, vector, switch, arguments, constexprs, divisible, rows, **kw):
        types = iter(arguments)
        names = getattr(module, kernel).arg_names
        signature = {a: "constexpr" if a in constexprs else next(types) for a in names}
        assert next(types, None) is None, f"{kernel}: more argument types than arguments"
        module = module.__name__.rsplit(".", 1)[1]
        out.append(
            Variant(
                kernel,
                module,
                storage,
                vector,
                switch,
                signature,
                constexprs,
                divisible,
                rows,
                **kw,
            )
        )

    for storage in STORAGE:
        for vector in VECTORS:
            acc = accumulation_dtype(getattr(torch, storage), getattr(torch, vector))
            acc_name = str(acc).removeprefix("torch.")
            s, v, a = (f"*{_TYPE[t]}" for t in (storage, vector, acc_name))
            ints = ["i32"] * 4
            dot = dense_window.dot_blocks(acc)
            for write in (True, False):
                add(
                    "_dot_kernel", dense_window, storage, vector, f"WRITE={write}",
                    [s, v, a, *ints],
                    {"WRITE": write, "ACC": _TL_ACC[acc], "BLOCK_N": dot["block_n"],
                     "BLOCK_D": dot["block_d"], "CHUNKS": dot["chunks"]},
                    # the slot is passed as 0 when nothing is written
                    ["G", "x", "partial", "d", "stride_row"] + ([] if write else ["write_row"]),
                    ["G"],
                )  # fmt: skip
            for has_x in (True, False):
                add(
                    "_combine_kernel", dense_window, storage, vector, f"HAS_X={has_x}",
                    [s, a, v if has_x else a, a, a, *ints[:3]],
                    {"HAS_X": has_x, "ACC": _TL_ACC[acc], "BLOCK_N": combine["block_n"],
                     "BLOCK_D": combine["block_d"]},
                    ["G", "c", "x", "scale", "out", "d", "stride_row"],
                    ["G"],
                )  # fmt: skip
            # the sparse window gathers from its vectors (dtype) and from the new row, which
            # it spreads into a dense vector of the accumulation dtype
            for x_type, x_name in dict.fromkeys(((v, vector), (a, acc_name))):
                add(
                    "_gather_dot_kernel", sparse_window, storage, x_name, "",
                    [s, "*i32", x_type, a, *ints[:3]],
                    {"ACC": _TL_ACC[acc], "BLOCK_N": gather["block_n"],
                     "BLOCK_K": gather["block_k"], "CHUNKS": gather["chunks"]},
                    ["values", "indices", "x", "partial", "k", "stride_row"],
                    ["values", "indices"],
                    gathers=["x"],
                )  # fmt: skip
            add(
                "_scatter_kernel", sparse_window, storage, vector, "",
                [s, "*i32", a, a, *ints[:3]],
                {"ACC": _TL_ACC[acc], "BLOCK_N": scatter["block_n"], "BLOCK_K": scatter["block_k"]},
                ["values", "indices", "c", "out", "k", "stride_row"],
                ["values", "indices"],
            )  # fmt: skip
    # the same (kernel, dtypes, switch) may come from two vector dtypes with one
    # accumulation dtype; compile each distinct signature once
    unique: dict[tuple, Variant] = {}
    for variant in out:
        key = (variant.kernel, tuple(variant.signature.values()), variant.switch)
        unique.setdefault(key, variant)
    return list(unique.values())


_PARAM = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[(\w+)_param_(\d+)\]")
_LOAD = re.compile(r"ld\.global((?:\.\w+)*)\s+(\{[^}]*\}|%\w+),\s*\[\s*(%\w+)")
_DEF = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s+(%\w+)\s*,(.*);")
_REG = re.compile(r"%\w+")


def loads_by_operand(ptx: str, arguments: list[str]) -> dict[str, Counter]:
    """``{argument: Counter(load instruction → count)}`` over the global loads of ``ptx``.

    ``arguments`` are the kernel's non-constexpr arguments, in order (PTX parameter ``i``
    is ``arguments[i]``; Triton appends scratch pointers after them). A load is credited to
    every pointer argument its address is computed from, through any chain of register
    definitions but not through a loaded value: ``x[indices[j]]`` is a load of ``x``."""
    sources: dict[str, set[str]] = {}
    params: dict[str, int] = {}
    loaded: set[str] = set()
    for line in ptx.splitlines():
        if m := _PARAM.search(line):
            params[m.group(1)] = int(m.group(3))
            continue
        if m := _LOAD.search(line):
            loaded.update(_REG.findall(m.group(2)))
            continue
        if (m := _DEF.match(line)) and not m.group(1).startswith(("st.", "atom.", "red.")):
            sources.setdefault(m.group(2), set()).update(_REG.findall(m.group(3)))
    pointers = {
        int(i) for i in re.findall(r"\.param \.u64 \.ptr \.global \.align \d+ \w+_param_(\d+)", ptx)
    }

    def bases(register: str) -> set[int]:
        found, stack, seen = set(), [register], set()
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            if r in params:
                if params[r] in pointers:
                    found.add(params[r])
                continue
            if r in loaded:
                continue
            stack.extend(sources.get(r, ()))
        return found

    counts: dict[str, Counter] = {}
    for m in _LOAD.finditer(ptx):
        kind = "ld.global" + m.group(1)
        for index in bases(m.group(3)) or {-1}:
            name = arguments[index] if 0 <= index < len(arguments) else "?"
            counts.setdefault(name, Counter())[kind] += 1
    return counts


def is_vector(kind: str) -> bool:
    return ".v2." in kind + "." or ".v4." in kind + "." or ".v8." in kind + "."


def _keep_ptxas_log(backend=None, stages=None, options=None, language=None, capability=None):
    """A Triton stages hook: the cubin stage (``ptxas -v`` on the PTX, the ptxas Triton picks
    for the architecture, with its flags) keeps its log in the kernel's metadata, so that a
    cached compilation has it too and ``ptxas`` runs once per variant."""
    if backend is None:  # Triton asks for a cache key: the log makes a different artefact
        return "keep_ptxas_log", "1"
    from triton import knobs

    make_cubin = stages["cubin"]

    def cubin(src, metadata):
        log = io.StringIO()
        with contextlib.redirect_stdout(log), knobs.nvidia.scope():
            knobs.nvidia.dump_ptxas_log = True
            binary = make_cubin(src, metadata)
        metadata["ptxas_log"] = log.getvalue()
        return binary

    stages["cubin"] = cubin
    return None


def compile_variant(variant: Variant, capability: int) -> dict:
    """Compile one variant for ``sm_<capability>``; its registers, spills and loads."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import secondorder.kernels.dense_window as dense
    import secondorder.kernels.sparse_window as sparse

    fn = getattr(dense if variant.module == "dense_window" else sparse, variant.kernel)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in variant.divisible}
    record = {
        "kernel": variant.kernel.strip("_"),
        "storage": variant.storage,
        "vector": variant.vector,
        "switch": variant.switch,
        "sm": capability,
        "rows": variant.rows,
        "gathers": variant.gathers,
    }
    knobs.runtime.add_stages_inspection_hook = _keep_ptxas_log
    try:
        compiled = triton.compile(
            ASTSource(
                fn=fn, signature=variant.signature, constexprs=variant.constexprs, attrs=attrs
            ),
            target=GPUTarget("cuda", capability, 32),
        )
    except Exception as error:  # a compile error is a result to report, not a crash
        return record | {"error": f"{type(error).__name__}: {error}"[:2000]}
    ptx = compiled.asm["ptx"]
    log = compiled.metadata.ptxas_log
    arguments = [a for a, t in variant.signature.items() if t != "constexpr"]
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return record | {
        "target": re.search(r"\.target (sm_\w+)", ptx).group(1),
        "ptx_version": re.search(r"\.version (\S+)", ptx).group(1),
        "num_warps": compiled.metadata.num_warps,
        "registers": int(registers.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "loads": {name: dict(c) for name, c in sorted(loads_by_operand(ptx, arguments).items())},
    }


def _compile_star(job: tuple[Variant, int]) -> dict:
    return compile_variant(*job)


def compile_all(jobs: int | None = None, archs: tuple[int, ...] = ARCHS) -> list[dict]:
    """Every variant for every architecture, ``jobs`` compilations at a time."""
    work = [(variant, arch) for arch in archs for variant in variants()]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [compile_variant(*job) for job in work]
    import multiprocessing

    # fork: the workers inherit the imported triton and torch instead of importing again
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_star, work, chunksize=2))


def _summary(loads: dict[str, dict[str, int]]) -> str:
    parts = []
    for name, kinds in loads.items():
        text = ", ".join(
            f"{count} {kind.removeprefix('ld.global.')}" for kind, count in kinds.items()
        )
        parts.append(f"{name}: {text}")
    return "; ".join(parts)


def table(records: list[dict]) -> str:
    """One row per variant: registers and spills per architecture, and the global loads per
    operand in the PTX (the same for every architecture here; both shown where not)."""
    archs = sorted({r["sm"] for r in records})
    by_variant: dict[tuple, dict[int, dict]] = {}
    for r in records:
        by_variant.setdefault((r["kernel"], r["storage"], r["vector"], r["switch"]), {})[
            r["sm"]
        ] = r
    header = [
        "kernel",
        "storage / vectors",
        "switch",
        "registers (" + " / ".join(f"sm_{a}" for a in archs) + ")",
        "spills (B)",
        "global loads per operand (static count in the PTX)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (kernel, storage, vector, switch), per_arch in by_variant.items():
        ours = [per_arch[a] for a in archs]
        errors = [r["error"].splitlines()[0] for r in ours if "error" in r]
        if errors:
            cells = ["**error**", "", errors[0]]
        else:
            spilled = sum(r["spill_stores"] + r["spill_loads"] for r in ours)
            loads = {_summary(r["loads"]) for r in ours}
            cells = [
                " / ".join(str(r["registers"]) for r in ours),
                str(spilled),
                " — ".join(f"sm_{r['sm']}: {_summary(r['loads'])}" for r in ours)
                if len(loads) > 1
                else loads.pop(),
            ]
        lines.append("| " + " | ".join([kernel, f"{storage} / {vector}", switch, *cells]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compilations")
    parser.add_argument("--sm", type=int, nargs="+", default=list(ARCHS))
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    if ptxas_path() is None:
        print("Triton or its ptxas is not installed", file=sys.stderr)
        sys.exit(CANNOT_COMPILE)
    records = compile_all(args.jobs, tuple(args.sm))
    if args.json:
        json.dump(records, sys.stdout)
    else:
        import triton

        print(f"# triton {triton.__version__}, {len(records)} compilations\n")
        print(table(records))


if __name__ == "__main__":
    main()
