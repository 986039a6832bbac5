"""Every GPU figure of the library in one command, kept runnable on the CPU.

    python benchmarks/gpu_check.py                 # on one CUDA device, at most ~8 minutes
    python benchmarks/gpu_check.py --dry-run       # the same on the CPU, tiny sizes, Triton interpreted
    python benchmarks/gpu_check.py --sparsegpt-ref ~/sparsegpt --gptq-ref ~/gptq

Writes a markdown report (``--out``) and prints it. The checks, one table each:

1. every Triton kernel of :mod:`secondorder.kernels` (each function with a torch twin in
   ``secondorder.kernels.reference``) against its twin at sizes that are multiples of no
   block, through the public dispatch, saying which implementation ran;
2. the dense window's step (``update_solve`` of a full ``SlidingWindowMFAC``) at
   ``n = 1024, d = 1e6`` and ``1e7`` against the floor ``2·n·d·b / B`` (two reads of the
   window at the copy bandwidth ``B`` measured in the same run), bfloat16 storage beside
   float32, and the sparse window at 1% beside them;
3. host synchronisations per steady step of every optimiser of ``secondorder.optim``,
   counted as ``benchmarks/host_syncs.py`` counts them, on the device;
4. ``nonfinite="skip_on_device"`` with a NaN step: weights and state bit-identical to a
   run that skipped the step, beside ``torch.amp.GradScaler`` with a fused AdamW;
5. one step of every optimiser against ``torch.optim.AdamW(fused=True)`` on a Llama-shaped
   model (GaLore's 60M configuration, as ``lowrank_bench.py --part memory``), with the peak
   device memory of each;
6. SparseGPT and GPTQ on one 4096 x 4096 layer, timed against the authors' routines run on
   the same device, when their checkouts are given (IST-DASLab/sparsegpt, IST-DASLab/gptq).

Each row is computed on its own: an error is written into its row and the other rows
still run; once the time budget (``--budget``) is spent, the rows left say
``skipped: time budget``. ``--dry-run`` runs every row on the CPU at tiny sizes, the
kernels and windows through the Triton interpreter (``TRITON_INTERPRET=1``), so that the
script keeps working while no GPU is at hand (``tests/test_gpu_check.py``); what only a
device can tell says ``needs CUDA``, and the dry run's figures measure nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import io
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from timing import peak_bytes, synchronize, timed, timed_side_by_side
from torch import nn

from secondorder._workloads.host_syncs import counting_syncs
from secondorder._workloads.host_syncs import model as small_mlp

NEEDS_CUDA = "needs CUDA"


# ----------------------------------------------------------------------------- sizes
@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of one run: the device run's, or the dry run's (tiny)."""

    dense_kernel: tuple[int, int, int]  # rows allocated, rows in use, length
    sparse_kernel: tuple[int, int, int, int]  # rows allocated, rows in use, entries, length
    window_rows: int
    window_dims: tuple[int, ...]
    copy_bytes: int  # of the copy that measures the bandwidth
    llama: dict[str, int]
    llama_rank: int
    mfac_rows: int  # num_grads of MFAC on the Llama
    layer: int  # SparseGPT / GPTQ on a layer x layer weight
    tokens: int  # calibration tokens of that layer
    group_size: int
    step_budget: float  # seconds spent timing one contender
    repeats: int


FULL = Sizes(
    dense_kernel=(37, 29, 1_000_003),
    sparse_kernel=(37, 29, 10_007, 1_000_003),
    window_rows=1024,
    window_dims=(10**6, 10**7),
    copy_bytes=1 << 30,
    llama={"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376,
           "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8},
    llama_rank=128,
    mfac_rows=64,
    layer=4096,
    tokens=4096,
    group_size=128,
    step_budget=2.0,
    repeats=10,
)  # fmt: skip

DRY = Sizes(
    dense_kernel=(7, 5, 301),
    sparse_kernel=(7, 5, 19, 301),
    window_rows=4,
    window_dims=(301, 1000),
    copy_bytes=1 << 22,
    llama={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 24,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2},
    llama_rank=4,
    mfac_rows=4,
    layer=64,
    tokens=128,
    group_size=32,
    step_budget=0.0,
    repeats=2,
)  # fmt: skip


# ----------------------------------------------------------------------------- the report
@dataclasses.dataclass
class Table:
    """One check: a title, what it shows, and rows whose first cell names the row and whose
    last cell holds notes (an error, a skip)."""

    title: str
    header: list[str]
    text: str = ""
    rows: list[list[str]] = dataclasses.field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.text:
            lines += [self.text, ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        lines += [
            "| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in self.rows
        ]
        return "\n".join(lines)


class Report:
    """The tables so far, written to ``out`` after every row (a run cut short keeps them)."""

    def __init__(self, title: str, out: Path, budget: float) -> None:
        self.title = title
        self.out = out
        self.budget = budget
        self.started = time.perf_counter()
        self.tables: list[Table] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def table(self, title: str, header: list[str], text: str = "") -> Table:
        table = Table(title, header, text)
        self.tables.append(table)
        return table

    def row(self, table: Table, label: str, check: Callable[[], list[str]]) -> None:
        """Add the row ``label`` of ``table``, whose other cells ``check`` computes."""
        cells = self._cells(len(table.header) - 2, check)
        table.rows.append([label, *cells])
        print(f"[{self.elapsed():6.1f} s] {table.title}: {label}: {cells[-1] or 'done'}",
              file=sys.stderr, flush=True)  # fmt: skip
        self.write()

    def _cells(self, width: int, check: Callable[[], list[str]]) -> list[str]:
        """``check()`` (``width`` figures, then the notes) unless the budget is spent; an
        exception fills the notes with its message and the figures with dashes."""
        if self.elapsed() > self.budget:
            return ["-"] * width + ["skipped: time budget"]
        try:
            cells = check()
            if len(cells) != width + 1:
                raise ValueError(f"the check gave {len(cells)} cells for {width + 1} columns")
            return cells
        except Exception as error:  # one failing row must not stop the rest
            return ["-"] * width + [f"error: {describe(error)}"]
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def failed(self, part: str, error: Exception) -> None:
        """A check that failed outside its rows."""
        self.table(f"{part}: failed", ["check", "notes"]).rows.append(
            [part, f"error: {describe(error)}"]
        )
        self.write()

    def markdown(self) -> str:
        parts = [self.title] + [table.markdown() for table in self.tables]
        parts.append(f"Total time: {self.elapsed():.0f} s (budget {self.budget:.0f} s).")
        return "\n\n".join(parts) + "\n"

    def write(self) -> str:
        """Write the report as it stands; returns the text written."""
        text = self.markdown()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(text)
        return text


def describe(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def power_of_ten(number: int) -> str:
    """``1e7`` for 10**7; other numbers as they are."""
    exponent = round(math.log10(number))
    return f"1e{exponent}" if number == 10**exponent else str(number)


def ms(seconds: float) -> str:
    """Milliseconds, three significant digits."""
    return f"{seconds * 1e3:.3g}"


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Environment variables set for the duration (``SECONDORDER_KERNELS`` is read per call)."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def kernel_path(tensor: torch.Tensor) -> str:
    """Which implementation the dispatch of :mod:`secondorder.kernels` runs for ``tensor``."""
    from secondorder import kernels

    if kernels.backend(tensor) == "torch":
        return "torch twin"
    return "triton, compiled" if tensor.is_cuda else "triton, interpreted"


# ----------------------------------------------------------------------------- 1. kernels
#: (storage dtype, vector dtype) pairs each kernel is checked with, as in its tests
DENSE_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                (torch.float16, torch.float32), (torch.float64, torch.float64)]  # fmt: skip
SPARSE_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                 (torch.float64, torch.float64)]  # fmt: skip
SPARSE_KERNELS = ("gather_dots", "scatter_combine")


def kernel_names() -> list[str]:
    """The kernels: every public function of :mod:`secondorder.kernels` with a torch twin."""
    from secondorder import kernels
    from secondorder.kernels import reference

    return [name for name in kernels.__all__ if callable(getattr(reference, name, None))]


def tolerance(expected: torch.Tensor, terms: int) -> tuple[float, float]:
    """``(rtol, atol)``: the kernels' tests' (``tests/test_dense_kernels.py``: 2e-5 in
    float32, 1e-12 in float64), with ``atol`` at least ``4·ε·√terms`` times the outputs'
    root mean square: the rounding of a sum of ``terms`` products grows like ``ε·√terms``
    times its partial sums, which are the size of its result, whatever the order of the
    additions (a sum of a million float32 products is not within 2e-5 of the same sum in
    another order)."""
    rtol = 1e-12 if expected.dtype == torch.float64 else 2e-5
    rms = float(expected.double().square().mean().sqrt()) if expected.numel() else 0.0
    return rtol, max(rtol, 4 * torch.finfo(expected.dtype).eps * math.sqrt(terms) * rms)


def worst_error(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float:
    """``max |a − e| / (atol + rtol·|e|)``: at most 1 within tolerance (NaN counts as inf)."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(f"got {actual.dtype} {tuple(actual.shape)}, expected "
                             f"{expected.dtype} {tuple(expected.shape)}")  # fmt: skip
    ratio = (actual - expected).abs() / (atol + rtol * expected.abs())
    return float(torch.nan_to_num(ratio, nan=math.inf).max()) if ratio.numel() else 0.0


Case = tuple[Callable[[Callable], torch.Tensor], Callable, int]


def dense_case(name: str, sizes: Sizes, storage, vector, device) -> Case:
    """The call of kernel ``name`` or of its twin on a window whose unused rows are NaN, the
    twin, and the number of products each output sums."""
    from secondorder.kernels import reference

    rows, used, dim = sizes.dense_kernel
    gen = torch.Generator(device).manual_seed(0)
    G = torch.randn(rows, dim, generator=gen, device=device).to(storage)
    G[used:] = float("nan")  # rows not in use must never be read
    x = torch.randn(dim, generator=gen, device=device, dtype=vector)
    c = torch.randn(used, generator=gen, device=device, dtype=vector)
    if name == "row_dots":
        return (lambda f: f(G, x, used)), reference.row_dots, dim
    if name == "combine":
        return (lambda f: f(G, c, used, x, -0.75)), reference.combine, used + 1
    if name == "write_row_and_dot":
        # each side writes its own copy; the row written must be x rounded, bit for bit
        def call(f):
            window = G.clone()
            window[used // 2] = float("nan")  # the slot overwritten may hold anything
            dots = f(window, used // 2, x, used)
            if not torch.equal(window[used // 2], x.to(storage)):
                raise AssertionError("the row written is not x rounded to the window's dtype")
            return dots

        return call, reference.write_row_and_dot, dim
    raise KeyError(f"no inputs are defined for the kernel {name!r}: add them to gpu_check.py")


def sparse_case(name: str, sizes: Sizes, storage, vector, device) -> Case:
    """As :func:`dense_case`, on a sparse window whose unused rows point far outside ``x``."""
    from secondorder.kernels import reference

    rows, used, k, dim = sizes.sparse_kernel
    gen = torch.Generator(device).manual_seed(1)
    indices = torch.stack(
        [torch.randperm(dim, generator=gen, device=device)[:k] for _ in range(rows)]
    )
    indices[used:] = 2**30  # far outside every vector: rows not in use must never be read
    values = torch.randn(rows, k, generator=gen, device=device).to(storage)
    values[used:] = float("nan")
    indices = indices.to(torch.int32)
    x = torch.randn(dim, generator=gen, device=device, dtype=vector)
    c = torch.randn(used, generator=gen, device=device, dtype=vector)
    if name == "gather_dots":
        return (lambda f: f(values, indices, x, used)), reference.gather_dots, k
    scatter = reference.scatter_combine
    return (lambda f: f(values, indices, c, used, dim, x, -0.75)), scatter, used + 1


def check_kernel(name: str, sizes: Sizes, device: torch.device) -> list[str]:
    """Kernel ``name`` through the public dispatch against its twin, for each dtype pair."""
    from secondorder import kernels

    sparse = name in SPARSE_KERNELS
    pairs = SPARSE_DTYPES if sparse else DENSE_DTYPES
    path = kernel_path(torch.empty(0, device=device))
    worst, failed = 0.0, []
    for storage, vector in pairs:
        case = sparse_case if sparse else dense_case
        call, twin, terms = case(name, sizes, storage, vector, device)
        expected = call(twin)
        actual = call(getattr(kernels, name))
        synchronize(device)
        error = worst_error(actual, expected, *tolerance(expected, terms))
        worst = max(worst, error)
        if not error <= 1:
            failed.append(f"{str(storage)[6:]}/{str(vector)[6:]}")
    shape = sizes.sparse_kernel if sparse else sizes.dense_kernel
    verdict = "ok" if not failed else "FAIL: " + ", ".join(failed)
    if device.type == "cuda" and path != "triton, compiled":
        verdict = f"FAIL: the {path} ran, not the compiled kernel (is Triton installed?)"
    notes = "" if device.type == "cuda" else f"the compiled kernel {NEEDS_CUDA}"
    dtypes = ", ".join(f"{str(s)[6:]}/{str(v)[6:]}" for s, v in pairs)
    return [path, " x ".join(map(str, shape)), dtypes, f"{worst:.3g}", verdict, notes]


def kernels_part(report: Report, setting: Setting) -> None:
    table = report.table(
        "Triton kernels against their torch twins",
        ["kernel", "ran", "shape (m x n x [k x] d)", "storage/vector dtypes", "worst error / tolerance", "verdict", "notes"],
        "Through the public dispatch (`secondorder.kernels`); rows beyond those in use hold NaN "
        "and must not be read. Tolerance: the kernels' tests' (rtol and atol 2e-5 in float32, "
        "1e-12 in float64), atol at least 4·ε·√terms times the outputs' RMS (the rounding of "
        "a sum of that many terms); the row written by `write_row_and_dot` must be exact.",
    )  # fmt: skip
    with kernel_choice(setting):
        for name in kernel_names():
            report.row(
                table, name, lambda name=name: check_kernel(name, setting.sizes, setting.device)
            )


def kernel_choice(setting: Setting) -> contextlib.AbstractContextManager[None]:
    """The dry run asks for the Triton kernels on the CPU (interpreted); on a device the
    default dispatch must pick the compiled ones by itself."""
    return (
        environment(SECONDORDER_KERNELS="triton") if setting.dry_run else contextlib.nullcontext()
    )


# ----------------------------------------------------------------------------- 2. windows
def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read plus bytes written per second by ``dst.copy_(src)`` of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device=device)


def gradient_stream(dim: int, device: torch.device, count: int = 4096) -> Iterator[torch.Tensor]:
    """Endless gradients, no two alike within ``count``: overlapping slices of one random
    sequence, which cost nothing to hand out inside a timed step (a window of repeated
    gradients would be rank-deficient)."""
    sequence = torch.randn(dim + count, device=device)
    shift = 0
    while True:
        yield sequence[shift : shift + dim]
        shift = (shift + 1) % count


def window_row(kind: str, n: int, d: int, bandwidth: float, sizes: Sizes, device) -> list[str]:
    """Fill a window of ``kind`` (``float32``, ``bfloat16``, ``sparse 1%``) with ``n``
    gradients, then time ``update_solve`` on fresh ones."""
    from secondorder import kernels
    from secondorder.curvature import SlidingWindowMFAC, SparseSlidingWindowMFAC

    gradients = gradient_stream(d, device)
    if kind.startswith("sparse"):
        window: Any = SparseSlidingWindowMFAC(d, n, 1e-4, 0.01, device=device)
        # float32 values and int32 indices, rows padded as the kernels read them
        row_bytes = kernels.padded_width(window.k) * (4 + 4)
        what = f"2·n·k·(4 + 4) B, k = {window.k} (the gathers from x not counted)"
    else:
        storage = getattr(torch, kind)
        window = SlidingWindowMFAC(d, n, 1e-4, device=device, storage_dtype=storage)
        row_bytes = kernels.padded_width(d) * storage.itemsize
        what = "2·n·d·b"
    for _ in range(n):
        window.update(next(gradients))
    floor = 2 * n * row_bytes / bandwidth

    def step() -> None:
        window.update_solve(next(gradients))

    seconds = timed(step, budget=sizes.step_budget, max_repeats=sizes.repeats, device=device)
    path = kernel_path(torch.empty(0, device=device))
    notes = what if device.type == "cuda" else f"{what}; {NEEDS_CUDA} (CPU, tiny sizes)"
    return [
        format_bytes(window.nbytes),
        path,
        ms(floor),
        ms(seconds),
        f"{seconds / floor:.2f}",
        notes,
    ]


def check_copy(setting: Setting, measured: dict[str, float]) -> list[str]:
    measured["bandwidth"] = copy_bandwidth(setting.device, setting.sizes.copy_bytes)
    nbytes = setting.sizes.copy_bytes
    seconds = 2 * nbytes / measured["bandwidth"]
    return [format_bytes(nbytes), "torch copy_", "-", ms(seconds), "-",
            f"B = {measured['bandwidth'] / 1e9:.1f} GB/s (bytes read + written per second)"]  # fmt: skip


def windows_part(report: Report, setting: Setting) -> None:
    sizes, n = setting.sizes, setting.sizes.window_rows
    table = report.table(
        "M-FAC window step against the memory-bandwidth floor",
        ["window", "bytes held", "ran", "floor (ms)", "update_solve (ms)", "step / floor", "notes"],
        f"`update_solve` of a full window (damp 1e-4) on fresh gradients, best of up to "
        f"{sizes.repeats}. Floor: two reads of the window's rows at the copy bandwidth B of "
        "the first row (`dst.copy_(src)`, this run). Target: float32 at n = 1024, d = 1e7 "
        "within 1.25x the floor.",
    )
    measured: dict[str, float] = {}
    report.row(table, "copy (B of the floor)", lambda: check_copy(setting, measured))

    def check(kind: str, d: int) -> list[str]:
        if "bandwidth" not in measured:
            raise RuntimeError("the copy bandwidth was not measured")
        return window_row(kind, n, d, measured["bandwidth"], sizes, setting.device)

    with kernel_choice(setting):
        for d in sizes.window_dims:
            for kind in ("float32", "bfloat16", "sparse 1%"):
                label = f"{kind}, n = {n}, d = {power_of_ten(d)}"
                report.row(table, label, lambda k=kind, d=d: check(k, d))


# ----------------------------------------------------------------------------- optimisers
LOW_RANK = {"GaLoreAdamW", "DCTAdamW", "NaturalGaLore", "SST"}
NO_REFRESH = 10**6  # update_proj_gap: steady steps, no refresh in the check


def optimizer_names() -> list[str]:
    import secondorder.optim

    return list(secondorder.optim.__all__)


def matrix_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the ``nn.Linear`` layers but the output layer (``lm_head``)."""
    return [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith("lm_head")
    ]


def build_optimizer(
    name: str, model: nn.Module, rank: int, num_grads: int, **settings: Any
) -> tuple[torch.optim.Optimizer, str]:
    """Optimiser ``name`` of ``secondorder.optim`` for ``model`` with its recipe, and the
    recipe in words: the low-rank ones project the matrices (the rest plain AdamW), as the
    low-rank benchmarks do; MFAC's window holds ``num_grads`` gradients; any other (a new
    optimiser) gets all parameters in one group, with its defaults."""
    import secondorder.optim

    cls = getattr(secondorder.optim, name)
    if name in LOW_RANK:
        matrices = matrix_weights(model)
        chosen = {id(p) for p in matrices}
        groups = [
            {"params": [p for p in model.parameters() if id(p) not in chosen]},
            {"params": matrices, "rank": rank, "update_proj_gap": NO_REFRESH},
        ]
        return cls(groups, lr=1e-3, **settings), f"matrices at rank {rank}, between refreshes"
    if name == "MFAC":
        optimizer = cls(model.parameters(), lr=1e-3, num_grads=num_grads, **settings)
        return optimizer, f"num_grads = {num_grads}, full window"
    return cls(model.parameters(), lr=1e-3, **settings), "all parameters, defaults"


def warm_steps(optimizer: torch.optim.Optimizer) -> int:
    """Steps until an optimiser is in its steady state: a full window for MFAC."""
    window = getattr(optimizer, "window", None)
    return 3 if window is None else window.num_grads + 2


def fresh_gradients(params: list[torch.Tensor], gen: torch.Generator) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.normal_(generator=gen).mul_(1e-3)


@dataclasses.dataclass
class Run:
    """A model on the 20-32-5 MLP of ``host_syncs.py``, its optimiser, what one step calls
    and, for torch's mixed-precision recipe, the scaler of its loss."""

    model: nn.Module
    optimizer: Any
    step: Callable[[], object]
    scaler: torch.amp.GradScaler | None = None

    def backward(self, batch: int, device: torch.device) -> None:
        """Gradients of the loss on batch number ``batch`` (scaled, with a scaler)."""
        gen = torch.Generator().manual_seed(batch)
        inputs = torch.randn(16, 20, generator=gen).to(device)
        targets = torch.randint(0, 5, (16,), generator=gen).to(device)
        self.model.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(self.model(inputs), targets)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()


def our_run(name: str, device: torch.device, **settings: Any) -> Run:
    """Optimiser ``name`` on the MLP, its low-rank matrices at rank 4, MFAC's window of 4."""
    model = small_mlp().to(device)
    optimizer, _ = build_optimizer(name, model, 4, 4, **settings)
    return Run(model, optimizer, optimizer.step)


def grad_scaler_run(device: torch.device) -> Run:
    """``torch.optim.AdamW(fused=True)`` stepped by a ``torch.amp.GradScaler``: the step
    unscales inside the fused kernel and is skipped on the device when ``found_inf``."""
    model = small_mlp().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)

    def step() -> None:
        scaler.step(optimizer)
        scaler.update()

    return Run(model, optimizer, step, scaler)


# ----------------------------------------------------------------------------- 3. host syncs
STEADY = 2  # steady steps counted (each is profiled: a second or so on a CPU)


def count_steady_syncs(name: str, device: torch.device, **settings: Any) -> tuple[str, str]:
    """Host syncs of ``STEADY`` steady steps of optimiser ``name`` on the MLP (``a/b`` when they
    differ), and where the first one's come from."""
    run = our_run(name, device, **settings)
    warm = warm_steps(run.optimizer)
    counts, where = [], ""
    for batch in range(warm + STEADY):
        run.backward(batch, device)
        if batch < warm:
            run.step()
            continue
        with counting_syncs() as syncs:
            run.step()
        counts.append(len(syncs))
        where = where or "; ".join(sorted({f"{s.kind} at {s.where}" for s in syncs}))
    return "/".join(map(str, sorted(set(counts)))), where or "-"


def refusal(error: ValueError) -> str:
    """The first clause of an optimiser's refusal of a setting."""
    return f"not supported ({' '.join(str(error).split()).split(': ')[0][:120]})"


def check_syncs(name: str, device: torch.device) -> list[str]:
    raising, where = count_steady_syncs(name, device, nonfinite="raise")
    try:
        on_device, _ = count_steady_syncs(name, device, nonfinite="skip_on_device")
    except ValueError as error:  # MFAC keeps its window's bookkeeping on the host
        on_device = refusal(error)
    notes = (
        "" if device.type == "cuda" else f"counted on the CPU (what a GPU waits for); {NEEDS_CUDA}"
    )
    return [raising, on_device, where, notes]


def syncs_part(report: Report, setting: Setting) -> None:
    table = report.table(
        "Host synchronisations per steady step",
        ["optimiser", "nonfinite=raise", "nonfinite=skip_on_device", "where (raise)", "notes"],
        f"The 20-32-5 MLP of `benchmarks/host_syncs.py` on {setting.device}, {STEADY} steady "
        "steps each (MFAC: a full window of 4; the low-rank ones: rank 4, between "
        "refreshes), counted by `host_syncs.counting_syncs`; `a/b` when the steps differ.",
    )
    for name in optimizer_names():
        report.row(table, name, lambda name=name: check_syncs(name, setting.device))


# ----------------------------------------------------------------------------- 4. skip on device
def tensors_equal(a: Any, b: Any, ignore: frozenset[str] = frozenset({"skipped_steps"})) -> bool:
    """Whether two nested state dicts hold bit-identical tensors and equal values, the keys
    in ``ignore`` left out."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) - ignore
        return keys == set(b) - ignore and all(tensors_equal(a[k], b[k], ignore) for k in keys)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(
            tensors_equal(x, y, ignore) for x, y in zip(a, b, strict=True)
        )
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


def same_state(a: Run, b: Run) -> bool:
    weights = all(
        torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True)
    )
    return weights and tensors_equal(a.optimizer.state_dict(), b.optimizer.state_dict())


POISONED = 4  # the step whose gradients hold a NaN
LATER = 3  # steps compared after it


def poison(model: nn.Module) -> None:
    """A NaN in the gradient of the last parameter (the others could be stepped first)."""
    *_, last = (p for p in model.parameters() if p.grad is not None)
    last.grad.view(-1)[0] = float("nan")


def check_skip(new_run: Callable[[], Run], setting: Setting) -> list[str]:
    """Two runs of one recipe on the same batches: one steps on NaN gradients at step
    ``POISONED``, the other leaves that step out. Weights and state must be bit-identical
    right after and ``LATER`` steps on; then the NaN step's host syncs, and its time (the
    same NaN gradients, again and again)."""
    device, budget, repeats = setting.device, setting.sizes.step_budget, setting.sizes.repeats
    try:
        poisoned, skipping = new_run(), new_run()
    except ValueError as error:
        return ["-", "-", "-", "-", refusal(error)]
    for batch in range(POISONED + 1 + LATER):
        poisoned.backward(batch, device)
        skipping.backward(batch, device)
        if batch == POISONED:
            poison(poisoned.model)
            with counting_syncs() as syncs:
                poisoned.step()
            unchanged = same_state(poisoned, skipping)
        else:
            poisoned.step()
            skipping.step()
    later = same_state(poisoned, skipping)
    poisoned.backward(0, device)
    poison(poisoned.model)
    seconds = timed(poisoned.step, budget=budget, max_repeats=repeats, device=device)
    notes = "" if device.type == "cuda" else f"the time on a device {NEEDS_CUDA}"
    verdicts = ["yes" if unchanged else "NO", "yes" if later else "NO"]
    return [*verdicts, str(len(syncs)), ms(seconds), notes]


def skip_part(report: Report, setting: Setting) -> None:
    device = setting.device
    table = report.table(
        'A NaN step: nonfinite="skip_on_device" against torch.amp.GradScaler',
        ["recipe", "unchanged by the NaN step", f"same {LATER} steps later", "host syncs in the NaN step", "NaN step (ms)", "notes"],
        f"The MLP of `host_syncs.py` on {device}; step {POISONED} gets a NaN gradient. "
        "Compared bit for bit (weights, optimiser state but the count of skipped steps) with "
        "a run that leaves that step out.",
    )  # fmt: skip
    for name in optimizer_names():

        def on_device(name: str = name) -> Run:
            return our_run(name, device, nonfinite="skip_on_device")

        report.row(table, name, lambda new_run=on_device: check_skip(new_run, setting))
    report.row(
        table,
        "torch.optim.AdamW(fused=True) + GradScaler",
        lambda: check_skip(lambda: grad_scaler_run(device), setting),
    )


# ----------------------------------------------------------------------------- 5. optimiser steps
def llama(sizes: Sizes, device: torch.device) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``sizes.llama`` (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, **sizes.llama)).to(device)


def time_steps(
    build: Callable[[nn.Module], tuple[Any, str]], model: nn.Module, setting: Setting
) -> tuple[float, int | None, str]:
    """Best time of one steady step on fresh random gradients (drawn outside the timed
    region), the peak device memory of a step, and the recipe."""
    sizes, device = setting.sizes, setting.device
    params = list(model.parameters())
    optimizer, recipe = build(model)
    gen = torch.Generator(device).manual_seed(0)
    for _ in range(warm_steps(optimizer)):
        fresh_gradients(params, gen)
        optimizer.step()
    best, deadline = math.inf, time.perf_counter() + sizes.step_budget
    for repeat in range(sizes.repeats):
        fresh_gradients(params, gen)
        synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        if repeat >= 2 and time.perf_counter() > deadline:
            break
    fresh_gradients(params, gen)
    return best, peak_bytes(optimizer.step, device), recipe


def step_cells(
    build: Callable,
    model: Callable[[], nn.Module],
    setting: Setting,
    baseline: dict[str, float],
    is_baseline: bool = False,
) -> list[str]:
    """The cells of one optimiser; ``torch.optim.AdamW``'s row sets ``baseline``."""
    seconds, peak, recipe = time_steps(build, model(), setting)
    if is_baseline:
        baseline["seconds"] = seconds
    ratio = f"{seconds / baseline['seconds']:.2f}" if "seconds" in baseline else "-"
    memory = NEEDS_CUDA if peak is None else format_bytes(peak)
    return [recipe, ms(seconds), ratio, memory, ""]


def steps_part(report: Report, setting: Setting) -> None:
    config = ", ".join(f"{key}={value}" for key, value in setting.sizes.llama.items())
    table = report.table(
        "One optimiser step on a Llama-shaped model",
        ["optimiser", "recipe", "step (ms, best)", "/ AdamW fused", "peak memory in a step", "notes"],
        f"`LlamaForCausalLM` ({config}) on {setting.device}, random gradients, no forward "
        f"pass; best of up to {setting.sizes.repeats} steady steps. Peak: the allocator's "
        "high-water mark during one step (weights, gradients, state and temporaries).",
    )  # fmt: skip
    baseline: dict[str, float] = {}
    shared: dict[str, nn.Module] = {}

    def model() -> nn.Module:
        """The model, built once for every optimiser (building it takes longer than a step)."""
        if "model" not in shared:
            shared["model"] = llama(setting.sizes, setting.device)
        return shared["model"]

    def adamw(model: nn.Module) -> tuple[Any, str]:
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), "all parameters"

    report.row(
        table,
        "torch.optim.AdamW(fused=True)",
        lambda: step_cells(adamw, model, setting, baseline, True),
    )
    sizes = setting.sizes
    for name in optimizer_names():

        def build(model: nn.Module, name: str = name) -> tuple[Any, str]:
            return build_optimizer(name, model, sizes.llama_rank, sizes.mfac_rows)

        report.row(table, name, lambda build=build: step_cells(build, model, setting, baseline))


# ----------------------------------------------------------------------------- 6. SparseGPT, GPTQ
def layer_problem(setting: Setting) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``layer x layer`` weight and ``tokens`` calibration inputs whose features have
    unequal scales, as activations do."""
    size, device = setting.sizes.layer, setting.device
    gen = torch.Generator(device).manual_seed(0)
    weight = torch.randn(size, size, generator=gen, device=device) / math.sqrt(size)
    scales = 0.1 + torch.rand(size, generator=gen, device=device)
    inputs = torch.randn(setting.sizes.tokens, size, generator=gen, device=device) * scales
    return weight, inputs


def linear_layer(weight: torch.Tensor) -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    )
    with torch.no_grad():
        model[0].weight.copy_(weight)
    return model


def load_reference(folder: str | None, module: str) -> Any:
    """Module ``module`` of the authors' checkout in ``folder`` (it imports its own
    ``quant``); ``None`` without a folder. Their modules switch TF32 off on import, which
    is torch's default: the flags are put back as they were."""
    if folder is None:
        return None
    path = str(Path(folder).expanduser().resolve())
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    sys.path.insert(0, path)
    for name in (module, "quant"):
        sys.modules.pop(name, None)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return importlib.import_module(module)
    finally:
        sys.path.remove(path)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@contextlib.contextmanager
def quiet_reference(device: torch.device) -> Iterator[None]:
    """The references print as they go and end with ``torch.cuda.synchronize()``, which
    fails without CUDA: on the CPU (the dry run) it is made a no-op for the call."""
    original = torch.cuda.synchronize
    if device.type != "cuda":
        torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        torch.cuda.synchronize = original  # type: ignore[assignment]


def relative_output_error(weight: torch.Tensor, new: torch.Tensor, inputs: torch.Tensor) -> float:
    return float((inputs @ (weight - new).T).norm() / (inputs @ weight.T).norm())


def compare_layers(
    ours: Callable[[], torch.Tensor],
    reference: Callable[[], torch.Tensor] | None,
    agreement: Callable[[torch.Tensor, torch.Tensor], str],
    setting: Setting,
    flag: str,
) -> list[str]:
    """Ours and the reference, called in turn (best of up to 3 rounds after a warm-up);
    their agreement and output errors."""
    weight, inputs = layer_problem(setting)
    contenders = {"ours": ours} if reference is None else {"ours": ours, "reference": reference}
    results: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[], None]:
        return lambda: results.__setitem__(name, contenders[name]())

    best = timed_side_by_side(
        {name: keep(name) for name in contenders}, budget=0.0, max_rounds=3, device=setting.device
    )
    errors = {name: relative_output_error(weight, new, inputs) for name, new in results.items()}
    if reference is None:
        return [ms(best["ours"]), "reference not given", "-", "-", f"{errors['ours']:.4f} / -",
                f"reference not given ({flag} DIR)"]  # fmt: skip
    same = agreement(results["ours"], results["reference"])
    error_cells = f"{errors['ours']:.4f} / {errors['reference']:.4f}"
    notes = "" if setting.device.type == "cuda" else f"times {NEEDS_CUDA}"
    return [ms(best["ours"]), ms(best["reference"]), f"{best['ours'] / best['reference']:.2f}",
            same, error_cells, notes]  # fmt: skip


def check_sparsegpt(setting: Setting) -> list[str]:
    from secondorder.prune import SparseGPTPruner

    weight, inputs = layer_problem(setting)
    module = load_reference(setting.sparsegpt_ref, "sparsegpt")

    def ours() -> torch.Tensor:
        model = linear_layer(weight)
        SparseGPTPruner(model, [inputs], params=[model[0].weight], progress=False).prune(0.5)
        return model[0].weight.detach().clone()

    def reference() -> torch.Tensor:
        layer = linear_layer(weight)[0]
        with quiet_reference(setting.device):
            pruner = module.SparseGPT(layer)
            pruner.add_batch(inputs.unsqueeze(0), None)
            pruner.fasterprune(0.5, blocksize=128, percdamp=0.01)
        return layer.weight.detach().clone()

    def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"masks {float(((a != 0) == (b != 0)).float().mean()):.2%} equal"

    return compare_layers(
        ours, reference if module else None, agreement, setting, "--sparsegpt-ref"
    )


def check_gptq(setting: Setting) -> list[str]:
    try:
        quantize = importlib.import_module("secondorder.quantize")
    except ImportError as error:
        return ["-"] * 5 + [f"not available in this build ({error})"]
    weight, inputs = layer_problem(setting)
    module = load_reference(setting.gptq_ref, "gptq")
    group_size = setting.sizes.group_size

    def ours() -> torch.Tensor:
        model = linear_layer(weight)
        quantize.GPTQQuantizer(
            model, [inputs], bits=4, group_size=group_size, params=[model[0].weight], progress=False
        ).quantize()
        return model[0].weight.detach().clone()

    def reference() -> torch.Tensor:
        layer = linear_layer(weight)[0]
        with quiet_reference(setting.device):
            gptq = module.GPTQ(layer)
            gptq.quantizer = module.Quantizer()
            gptq.quantizer.configure(4, perchannel=True, sym=False, mse=False)
            gptq.add_batch(inputs.unsqueeze(0), None)
            gptq.fasterquant(blocksize=128, percdamp=0.01, groupsize=group_size)
        return layer.weight.detach().clone()

    def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
        close = (a - b).abs() <= 1e-5 * b.abs().max()
        return f"weights {float(close.float().mean()):.2%} equal"

    return compare_layers(ours, reference if module else None, agreement, setting, "--gptq-ref")


def pruning_part(report: Report, setting: Setting) -> None:
    size, tokens = setting.sizes.layer, setting.sizes.tokens
    table = report.table(
        "SparseGPT and GPTQ on one layer against the authors' routines",
        ["method", "ours (ms)", "reference (ms)", "ours / reference", "agreement", "output error ours / reference", "notes"],
        f"One {size} x {size} weight, {tokens} calibration tokens, on {setting.device}: "
        "calibration and compression in one call each, side by side, best of up to 3. "
        "SparseGPT at 50%; GPTQ at 4 bits, asymmetric per channel, groups of "
        f"{setting.sizes.group_size}. Output error: ‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖.",
    )  # fmt: skip
    report.row(table, "SparseGPT, 50%", lambda: check_sparsegpt(setting))
    report.row(table, "GPTQ, 4 bits", lambda: check_gptq(setting))


# ----------------------------------------------------------------------------- main
@dataclasses.dataclass(frozen=True)
class Setting:
    sizes: Sizes
    device: torch.device
    dry_run: bool
    sparsegpt_ref: str | None = None
    gptq_ref: str | None = None


def title(setting: Setting, argv: list[str]) -> str:
    import secondorder

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if setting.dry_run:
        what = ("DRY RUN on the CPU at tiny sizes, Triton interpreted "
                "(`TRITON_INTERPRET=1`): the figures measure nothing")  # fmt: skip
    else:
        props = torch.cuda.get_device_properties(setting.device)
        what = f"{props.name}, {format_bytes(props.total_memory)}, CUDA {torch.version.cuda}"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"# GPU check: {what}\n\n`python benchmarks/gpu_check.py {' '.join(argv)}`, {stamp}; "
        f"secondorder {secondorder.__version__}, torch {torch.__version__}, triton "
        f"{triton_version}, Python {platform.python_version()}."
    )


PARTS = {
    "kernels": kernels_part,
    "windows": windows_part,
    "syncs": syncs_part,
    "skip": skip_part,
    "steps": steps_part,
    "pruning": pruning_part,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="the CPU, tiny sizes, Triton interpreted"
    )
    parser.add_argument("--device", default="cuda", help="the CUDA device (default: cuda)")
    parser.add_argument("--budget", type=float, help="seconds before the rows left are skipped "
                        "(default 420; dry run 300)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="the report (default runs/gpu_check[_dry_run].md)")
    parser.add_argument("--sparsegpt-ref", metavar="DIR", help="a checkout of IST-DASLab/sparsegpt")
    parser.add_argument("--gptq-ref", metavar="DIR", help="a checkout of IST-DASLab/gptq")
    parser.add_argument("--part", choices=list(PARTS), action="append", help="only these checks")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton compiles the kernels
        device = torch.device("cpu")
        # one thread: on a shared machine a second one waits for a core at every tiny op
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run to check the script on the CPU")
    else:
        device = torch.device(args.device)
        if device.type != "cuda":
            parser.error(f"--device {args.device}: a CUDA device is needed (or --dry-run)")
        if device.index is None:  # set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    setting = Setting(DRY if args.dry_run else FULL, device, args.dry_run, args.sparsegpt_ref, args.gptq_ref)  # fmt: skip
    out = args.out or Path("runs") / ("gpu_check_dry_run.md" if args.dry_run else "gpu_check.md")
    budget = args.budget if args.budget is not None else (300.0 if args.dry_run else 420.0)
    report = Report(title(setting, sys.argv[1:] if argv is None else argv), out, budget)
    for name, part in PARTS.items():
        if args.part is None or name in args.part:
            try:
                part(report, setting)
            except Exception as error:  # the other checks still run
                report.failed(name, error)
    print(report.write(), end="")  # the very text written: the clock is read once
    print(f"(written to {out})", file=sys.stderr)


if __name__ == "__main__":
    main()
