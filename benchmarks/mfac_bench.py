"""Speed and accuracy of the M-FAC estimators, side by side with their baselines.

    python benchmarks/mfac_bench.py                 # every part, the sizes of docs/benchmarks.md
    python benchmarks/mfac_bench.py --part window --quick
    python benchmarks/mfac_bench.py --part bandwidth --device cuda   # the GPU target

Parts:
  window    one SlidingWindowMFAC.update_solve (a full window) against the floor of two
            plain passes over G (G @ g and Gᵀ @ c), the naive Woodbury rebuilt every step,
            and both ways of keeping the small factor current (rank-2 up/down-date, refactor),
            each in its own window, timed side by side with the passes over that window.
  factor    the n × n system alone: rank-2 up/down-date (+ its check) against a refactor.
  dense     DenseMFAC's GEMM-shaped precomputation, its diagonal included (the pruning
            path), against the paper's sequential recurrence.
  static    solve-only DenseMFAC (build, then F⁻¹x) against the ISTA-DASLab peer's
            DenseCoreMFAC (ista-daslab-optimizers 1.1.15, when installed: pip install
            --no-deps ista-daslab-optimizers==1.1.15) and a bare float32 Gram matrix plus
            float64 Cholesky of the same G, side by side; n = 64, d = 1e5 by default.
  bandwidth update_solve against the memory-bandwidth floor 2·n·d·b / B, with B the
            measured copy bandwidth (bytes read + written per second) and b the bytes of
            a stored number; on CUDA (--device cuda) the passes are the Triton kernels.
            Default sizes: n = 1024, d = 1e7 on CUDA (40 GB in float32), n = 256, d = 1e6
            on CPU.
  accuracy  float32 F⁻¹g for a g in the window: update_solve's n Gᵀ K⁻¹ e_s against the
            subtracting form (g − Gᵀ K⁻¹ G g)/λ, and update_solve with the window stored
            in bf16 and fp16, all against a float64 oracle of the unrounded gradients.
  capacity  the largest model whose M-FAC window (num_grads = 1024) fits in 24, 80 and 141 GB:
            dense float32 and bf16, sparse 1%, and sparse 1% sharded over 8 ranks (from
            estimate_bytes; the window only, not the model, its gradients or activations).
  sparse    the compressed (EFCP) window: bytes at num_grads = 1024 for d = 1e6 and 1e7
            against the dense float32 window; update_solve of full windows at n = 1024,
            d = 1e6 (--n, --d) side by side with the dense one; where a sparse step's time
            goes (top-k over d, the gather of the new Gram row, the small system, the scatter).
"""

from __future__ import annotations

import argparse
import itertools
import platform
from collections.abc import Callable, Iterator

import torch
from baselines import sequential_recurrence, sequential_solve, woodbury_from_scratch
from peers import load_dense_core_mfac
from timing import timed, timed_side_by_side

from secondorder import kernels
from secondorder._workloads.report import markdown_table
from secondorder.curvature import DenseMFAC, SlidingWindowMFAC, SparseSlidingWindowMFAC
from secondorder.curvature.ldl import ldl_factor, ldl_replace_row, ldl_row_error
from secondorder.curvature.sparse_window import top_k_indices


def full_window(
    n: int,
    d: int,
    damp: float,
    factor_update: str,
    device: torch.device | str = "cpu",
    storage_dtype: torch.dtype | None = None,
) -> SlidingWindowMFAC:
    """A full window over random gradients, filled in place (no second ``n × d`` copy)
    and factored once, instead of ``n`` updates."""
    window = SlidingWindowMFAC(
        d, n, damp, device=device, storage_dtype=storage_dtype, factor_update=factor_update
    )
    grads = window.state_dict()["grads"]  # the live rows (state_dict holds no copies)
    grads.normal_()
    wide = torch.float32 if grads.element_size() < 4 else grads.dtype
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for start in range(0, d, 1 << 22):  # bounded upcasts of a half-precision window
        piece = grads[:, start : start + (1 << 22)].to(wide)
        gram += (piece @ piece.T).double()
    K = gram + n * damp * torch.eye(n, dtype=torch.float64, device=device)
    factor, pivots = ldl_factor(K)
    state = window.state_dict() | {
        "grads": grads,  # the window's own tensor: loading it copies nothing
        "gram": gram,
        "factor": factor,
        "pivots": pivots,
        "num_stored": n,
    }
    window.load_state_dict(state)
    return window


def distinct_gradients(
    d: int, device: torch.device | str = "cpu", count: int = 4096
) -> Iterator[torch.Tensor]:
    """Endless gradients, no two alike within ``count``: overlapping windows ``[i, i + d)``
    of one random sequence, views that cost nothing to hand out inside a timed step.
    Repeating a few gradients would make the window rank-deficient and ``n·damp·I + G Gᵀ``
    singular to rounding."""
    sequence = torch.randn(d + count, device=device)
    for shift in itertools.cycle(range(count)):
        yield sequence[shift : shift + d]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read plus bytes written per second by ``dst.copy_(src)`` of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        synchronize(device)

    return 2 * src.numel() * 4 / timed(copy)


def bench_bandwidth(
    sizes: list[tuple[int, int]], damp: float, device: torch.device, storage_dtype: torch.dtype
) -> str:
    rows = []
    for n, d in sizes:
        window = full_window(n, d, damp, "auto", device, storage_dtype)
        G = window.state_dict()["grads"]
        itemsize = G.element_size()
        bandwidth = copy_bandwidth(device, 1 << 30)  # well beyond any cache
        floor = 2 * n * d * itemsize / bandwidth
        fresh_gradients = distinct_gradients(d, device)

        def step(window=window, fresh_gradients=fresh_gradients):
            window.update_solve(next(fresh_gradients))
            synchronize(device)

        seconds = timed(step)
        rows.append(
            [
                str(n),
                f"{d:.0e}",
                str(storage_dtype).removeprefix("torch."),
                f"{bandwidth / 1e9:.0f}",
                f"{floor * 1e3:.2f}",
                f"{seconds * 1e3:.2f}",
                f"{seconds / floor:.2f}",
            ]
        )
        print(rows[-1], flush=True)
        del window, G
    header = [
        "n",
        "d",
        "window dtype",
        "copy bandwidth (GB/s)",
        "floor 2·n·d·b / B (ms)",
        "update_solve (ms)",
        "step / floor",
    ]
    return markdown_table(header, rows)


def bench_window(sizes: list[tuple[int, int]], damp: float) -> str:
    rows = []
    for n, d in sizes:
        # Each way of keeping the factor current in its own window, in its own steady state,
        # timed side by side with the two passes over that same window (one window
        # switching ways every step would split a fresh Cholesky factor for the rank-2
        # update every other step, where a rank-2 window does so every n steps; two windows
        # stepped in turn would evict each other from the cache, which one does not).
        g, c = torch.randn(d), torch.randn(n)
        fresh_gradients = distinct_gradients(d)
        times, ratios = {}, {}
        for mode in ("refactor", "rank2"):
            window = full_window(n, d, damp, mode)
            G = window.state_dict()["grads"]

            def two_passes(G=G, g=g, c=c):
                G @ g
                G.T @ c

            def step(window=window, fresh_gradients=fresh_gradients):
                window.update_solve(next(fresh_gradients))

            best_times = timed_side_by_side({"floor": two_passes, mode: step})
            times[mode], times[f"floor {mode}"] = best_times[mode], best_times["floor"]
            ratios[mode] = best_times[mode] / best_times["floor"]
            del window, G, two_passes, step  # one n × d window at a time
        refactor, rank2 = times["refactor"], times["rank2"]
        G = torch.empty(n, d).normal_()
        big = n * d >= 10**8  # one naive step is then tens of seconds: time it once
        naive = timed(
            lambda G=G, g=g: woodbury_from_scratch(G, damp, g),
            budget=0.0,
            max_repeats=1 if big else 3,
            warmup=not big,
        )
        best = min(refactor, rank2)
        rows.append(
            [
                str(n),
                f"{d:.0e}",
                f"{times['floor rank2'] * 1e3:.3g} / {times['floor refactor'] * 1e3:.3g}",
                f"{rank2 * 1e3:.3g} ({ratios['rank2']:.2f})",
                f"{refactor * 1e3:.3g} ({ratios['refactor']:.2f})",
                f"{min(ratios.values()):.2f}",
                f"{naive * 1e3:.0f}",
                f"{naive / best:.0f}x",
            ]
        )
        print(rows[-1], flush=True)
        del G
    header = [
        "n",
        "d",
        "floor: G@g + Gᵀ@c (ms), beside rank-2 / refactor",
        "ours, rank-2 (ms; / its floor)",
        "ours, refactor (ms; / its floor)",
        "best / floor",
        "naive Woodbury (ms)",
        "naive / best",
    ]
    return markdown_table(header, rows)


def bench_factor(sizes: list[int]) -> str:
    rows = []
    for n in sizes:
        G = torch.randn(n, 2 * n, dtype=torch.float64)
        K = G @ G.T + n * 1e-4 * torch.eye(n, dtype=torch.float64)
        L, D = ldl_factor(K)
        delta = 0.01 * torch.randn(n, dtype=torch.float64)

        def rank2(L=L, D=D, K=K, delta=delta, row=n // 2):
            updated = ldl_replace_row(L, D, row, delta)
            ldl_row_error(*updated, K, row)

        refactor = timed(lambda K=K: ldl_factor(K))
        update = timed(rank2)
        rows.append(
            [str(n), f"{refactor * 1e3:.2f}", f"{update * 1e3:.2f}", f"{refactor / update:.2f}"]
        )
        print(rows[-1], flush=True)
    header = ["n", "refactor (ms)", "rank-2 + check (ms)", "refactor / rank-2"]
    return markdown_table(header, rows)


def bench_dense(sizes: list[tuple[int, int]], damp: float) -> str:
    rows = []
    for n, d in sizes:
        grads = torch.randn(n, d)
        x = torch.randn(d)
        results = {}

        def ours(grads=grads, results=results):
            results["ours"] = DenseMFAC(grads, damp)
            results["ours"].diag()  # as the recurrence: the factor, and the diagonal from W

        def recurrence(grads=grads, results=results):
            results["recurrence"] = sequential_recurrence(grads.unsqueeze(0), damp)

        # seconds to a minute each: no warm-up, three rounds in turn, the best of each
        best = timed_side_by_side(
            {"ours": ours, "recurrence": recurrence}, budget=0.0, max_rounds=3, warmup=False
        )
        t_ours, t_seq = best["ours"], best["recurrence"]
        ours = results["ours"]
        H, c, _ = results["recurrence"]
        theirs = sequential_solve(H, c, damp, x.unsqueeze(0))[0]
        agreement = (ours.solve(x) - theirs).norm() / ours.solve(x).norm()
        rows.append(
            [
                str(n),
                f"{d:.0e}",
                f"{t_ours:.2f}",
                f"{t_seq:.2f}",
                f"{t_seq / t_ours:.1f}x",
                f"{agreement:.1e}",
            ]
        )
        print(rows[-1], flush=True)
    header = [
        "n",
        "d",
        "DenseMFAC + diag() (s)",
        "sequential recurrence (s)",
        "speed-up",
        "relative difference of F⁻¹x",
    ]
    return markdown_table(header, rows)


def bench_static(sizes: list[tuple[int, int]], damp: float) -> str:
    """Solve-only static M-FAC: ours (the factor only) against the peer and a bare build."""
    peer_class = load_dense_core_mfac()
    rows = []
    for n, d in sizes:
        grads = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
        x = torch.randn(d, generator=torch.Generator().manual_seed(1))

        def bare(grads=grads, n=n):
            K = (grads @ grads.T).double()
            K.diagonal().add_(n * damp)
            torch.linalg.cholesky(K)

        builds = {"bare": bare, "ours": lambda grads=grads: DenseMFAC(grads, damp)}
        if peer_class is not None:
            builds["peer"] = lambda grads=grads: peer_class(grads, "cpu", ["cpu"], damp=damp)
        build = timed_side_by_side(builds)
        ours = DenseMFAC(grads, damp)
        solves = {"ours": lambda ours=ours, x=x: ours.solve(x)}
        peer = None
        if peer_class is not None:
            peer = peer_class(grads, "cpu", ["cpu"], damp=damp)
            solves["peer"] = lambda peer=peer, x=x: peer.precondition(x.clone())
        solve = timed_side_by_side(solves)
        G = grads.double()
        K = G @ G.T + n * damp * torch.eye(n, dtype=torch.float64)
        truth = (x.double() - G.T @ torch.linalg.solve(K, G @ x.double())) / damp

        def error(out: torch.Tensor, truth: torch.Tensor = truth) -> str:
            return f"{float((out.double() - truth).norm() / truth.norm()):.1e}"

        missing = "not installed"
        rows.append(
            [
                str(n),
                f"{d:.0e}",
                f"{build['bare'] * 1e3:.1f}",
                f"{build['ours'] * 1e3:.1f} ({build['ours'] / build['bare']:.1f}x)",
                f"{build['peer'] * 1e3:.1f} ({build['peer'] / build['bare']:.1f}x)"
                if peer
                else missing,
                f"{solve['ours'] * 1e3:.2f}",
                f"{solve['peer'] * 1e3:.2f}" if peer else missing,
                error(ours.solve(x)),
                error(peer.precondition(x.clone())) if peer else missing,
            ]
        )
        print(rows[-1], flush=True)
    header = [
        "n",
        "d",
        "bare float32 Gram + float64 Cholesky (ms)",
        "ours: build (ms, vs bare)",
        "peer DenseCoreMFAC: build (ms, vs bare)",
        "ours: F⁻¹x (ms)",
        "peer: F⁻¹x (ms)",
        "ours: error of F⁻¹x",
        "peer: error of F⁻¹x",
    ]
    return markdown_table(header, rows)


def bench_accuracy(damps: list[float], n: int = 64, d: int = 2000) -> str:
    """Largest relative error of ``F⁻¹g`` over two wraps of the window, against float64."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(2 * n, d, generator=gen)
    storages = [torch.bfloat16, torch.float16]
    for damp in damps:
        fused, subtracting = SlidingWindowMFAC(d, n, damp), SlidingWindowMFAC(d, n, damp)
        halves = [SlidingWindowMFAC(d, n, damp, storage_dtype=dtype) for dtype in storages]
        errors = {name: [] for name in ("fused", "subtracting", *storages)}
        for step, g in enumerate(grads):
            held = grads[max(0, step + 1 - n) : step + 1].double()
            F = damp * torch.eye(d, dtype=torch.float64) + held.T @ held / len(held)
            exact = torch.linalg.solve(F, g.double())
            subtracting.update(g)
            outputs = {
                "fused": fused.update_solve(g),
                "subtracting": subtracting.solve(g),
                **{
                    dtype: window.update_solve(g)
                    for dtype, window in zip(storages, halves, strict=True)
                },
            }
            for name, out in outputs.items():
                errors[name].append(float((out.double() - exact).norm() / exact.norm()))
        rows.append([f"{damp:.0e}", *(f"{max(values):.1e}" for values in errors.values())])
        print(rows[-1], flush=True)
    header = [
        "damp",
        "update_solve: n Gᵀ K⁻¹ e_s",
        "subtracting form (g − Gᵀc)/λ",
        "update_solve, bf16 window",
        "update_solve, fp16 window",
    ]
    return markdown_table(header, rows)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def bench_sparse_memory(num_grads: int, dims: list[int], densities: list[float]) -> str:
    """Bytes held (values, int32 coordinates, error buffer, n × n system, spare row), from
    ``estimate_bytes``, which a test checks against ``nbytes`` of a built window."""
    rows = []
    for d in dims:
        dense = SlidingWindowMFAC.estimate_bytes(d, num_grads, torch.float32)
        for density in densities:
            sparse = SparseSlidingWindowMFAC.estimate_bytes(d, num_grads, density)
            half = SparseSlidingWindowMFAC.estimate_bytes(d, num_grads, density, torch.bfloat16)
            rows.append(
                [
                    f"{d:.0e}",
                    f"{density:.0%}",
                    format_bytes(dense),
                    format_bytes(sparse),
                    f"{dense / sparse:.0f}x",
                    format_bytes(half),
                    f"{dense / half:.0f}x",
                ]
            )
    header = [
        "d",
        "density",
        "dense float32",
        "sparse, float32 values",
        "smaller by",
        "sparse, bf16 values",
        "smaller by",
    ]
    return markdown_table(header, rows)


def largest_dim(fits: Callable[[int], bool]) -> int:
    """The largest ``d`` with ``fits(d)``, by doubling then bisection (``fits`` is monotone)."""
    low, high = 0, 1
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def bench_capacity(num_grads: int = 1024, budgets_gb: tuple[int, ...] = (24, 80, 141)) -> str:
    windows = {
        "dense float32": lambda d: SlidingWindowMFAC.estimate_bytes(d, num_grads),
        "dense bf16": lambda d: SlidingWindowMFAC.estimate_bytes(d, num_grads, torch.bfloat16),
        "sparse 1% (float32 values)": lambda d: SparseSlidingWindowMFAC.estimate_bytes(
            d, num_grads, 0.01
        ),
    }
    rows = []
    for name, nbytes in windows.items():
        row = [name]
        for budget in budgets_gb:
            row.append(
                f"{largest_dim(lambda d, nbytes=nbytes, b=budget: nbytes(d) <= b * 1e9) / 1e6:,.0f}M"
            )
        rows.append(row)
    # sharded over 8 ranks: each rank holds the window of its eighth of the coordinates
    sparse = windows["sparse 1% (float32 values)"]
    rows.append(
        ["sparse 1%, sharded over 8 ranks (per-rank memory)"]
        + [
            f"{8 * largest_dim(lambda d, b=budget: sparse(d) <= b * 1e9) / 1e6:,.0f}M"
            for budget in budgets_gb
        ]
    )
    header = [f"window (num_grads = {num_grads})"] + [f"{b} GB" for b in budgets_gb]
    return markdown_table(header, rows)


def filled_sparse_window(
    n: int, d: int, density: float, damp: float, gradients: Iterator[torch.Tensor]
) -> SparseSlidingWindowMFAC:
    """A full sparse window, filled by ``n`` real updates (compression, error feedback,
    Gram rows by the window's own gather pass)."""
    window = SparseSlidingWindowMFAC(d, n, damp, density)
    for _ in range(n):
        window.update(next(gradients))
    return window


def bench_sparse_step(n: int, d: int, densities: list[float], damp: float) -> tuple[str, str]:
    """``update_solve`` of full windows, dense and sparse, called in turn round after round;
    then the parts of one sparse step at the first density, timed the same way."""
    gradients = distinct_gradients(d)
    windows: dict[str, object] = {"dense float32": full_window(n, d, damp, "auto")}
    for density in densities:
        print(f"# filling the {density:.0%} window ({n} updates)", flush=True)
        windows[f"sparse {density:.0%}"] = filled_sparse_window(n, d, density, damp, gradients)
    steps = {
        name: (lambda window=window: window.update_solve(next(gradients)))
        for name, window in windows.items()
    }
    best = timed_side_by_side(steps, budget=20.0, max_rounds=20)
    dense = best["dense float32"]
    rows = [
        [
            name,
            f"{best[name] * 1e3:.1f}",
            f"{dense / best[name]:.1f}x",
            format_bytes(window.nbytes),
        ]
        for name, window in windows.items()
    ]
    steps_table = markdown_table(
        [
            f"window (n = {n}, d = {d:.0e})",
            "update_solve (ms)",
            "faster than dense",
            "bytes held",
        ],
        rows,
    )

    # The parts of one step of the first sparse window, on its own state (nothing inserted).
    window = windows[f"sparse {densities[0]:.0%}"]
    state = window.state_dict()
    values, indices = state["values"], state["indices"]
    g = next(gradients)
    accumulator = state["error"] + g
    x = torch.randn(d)
    coefficients = torch.randn(n)
    # a small system of the same size, as in --part factor
    G = torch.randn(n, 2 * n, dtype=torch.float64)
    K = G @ G.T + n * 1e-4 * torch.eye(n, dtype=torch.float64)
    L, D = ldl_factor(K)
    delta = 0.01 * torch.randn(n, dtype=torch.float64)

    def rank2() -> None:
        ldl_row_error(*ldl_replace_row(L, D, n // 2, delta), K, n // 2)

    parts = {
        "top-k over d (selection, ties by index)": lambda: top_k_indices(accumulator, window.k),
        "gather: t = C x (Gram row)": lambda: kernels.gather_dots(values, indices, x, n),
        "scatter: Cᵀ y (the result)": lambda: kernels.scatter_combine(
            values, indices, coefficients, n, d
        ),
        "small system: rank-2 update + check": rank2,
        "small system: refactor": lambda: ldl_factor(K),
    }
    part_times = timed_side_by_side(parts, budget=6.0, max_rounds=30)
    whole = best[f"sparse {densities[0]:.0%}"]
    part_rows = [
        [name, f"{seconds * 1e3:.2f}", f"{seconds / whole:.0%}"]
        for name, seconds in part_times.items()
    ]
    parts_table = markdown_table(
        [f"part of a sparse {densities[0]:.0%} step", "ms", "of the whole step"], part_rows
    )
    return steps_table, parts_table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part",
        choices=[
            "window",
            "factor",
            "dense",
            "static",
            "accuracy",
            "bandwidth",
            "sparse",
            "capacity",
            "all",
        ],
        default="all",
    )
    parser.add_argument("--device", default="cpu", help="device of --part bandwidth")
    parser.add_argument(
        "--storage-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="window dtype of --part bandwidth",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n", type=int, nargs="+", help="window sizes of --part window")
    parser.add_argument("--d", type=float, nargs="+", help="gradient lengths of --part window")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    parts = (
        ["window", "factor", "dense", "static", "bandwidth", "accuracy", "capacity", "sparse"]
        if args.part == "all"
        else [args.part]
    )
    if "window" in parts:
        ns = args.n or ([64] if args.quick else [64, 256, 1024])
        ds = [int(d) for d in args.d] if args.d else ([10**4] if args.quick else [10**5, 10**6])
        sizes = [(n, d) for d in ds for n in ns]
        print("\n## Sliding-window step\n\n" + bench_window(sizes, damp=1e-6))
    if "factor" in parts:
        sizes = [64, 256] if args.quick else [64, 128, 256, 512, 1024, 2048, 4096]
        print("\n## Small system\n\n" + bench_factor(sizes))
    if "dense" in parts:
        sizes = [(64, 10**4)] if args.quick else [(256, 10**5), (1024, 10**5)]
        print("\n## Static precomputation\n\n" + bench_dense(sizes, damp=1e-4))
    if "static" in parts:
        sizes = [(64, 10**4)] if args.quick else [(64, 10**5)]
        if args.n and args.d:
            sizes = [(n, int(d)) for n in args.n for d in args.d]
        print("\n## Solve-only static M-FAC against the peer\n\n" + bench_static(sizes, damp=1e-4))
    if "bandwidth" in parts:
        device = torch.device(args.device)
        default = [(1024, 10**7)] if device.type == "cuda" else [(256, 10**6)]
        sizes = [(n, int(d)) for n in args.n for d in args.d] if args.n and args.d else default
        if args.quick:
            sizes = [(64, 10**5)]
        storage = getattr(torch, args.storage_dtype)
        print(
            "\n## Step against the bandwidth floor\n\n"
            + bench_bandwidth(sizes, 1e-6, device, storage)
        )
    if "accuracy" in parts:
        damps = [1e-4] if args.quick else [1e-2, 1e-4, 1e-6, 1e-8]
        print("\n## Accuracy of F⁻¹g (float32 arithmetic)\n\n" + bench_accuracy(damps))
    if "capacity" in parts:
        print("\n## Largest model whose window fits\n\n" + bench_capacity())
    if "sparse" in parts:
        densities = [0.01, 0.05, 0.1]
        print(
            "\n## Sparse windows: memory\n\n" + bench_sparse_memory(1024, [10**6, 10**7], densities)
        )
        n = args.n[0] if args.n else (64 if args.quick else 1024)
        d = int(args.d[0]) if args.d else (10**4 if args.quick else 10**6)
        steps, parts_table = bench_sparse_step(n, d, densities, damp=1e-6)
        print("\n## Sparse windows: step time\n\n" + steps + "\n\n" + parts_table)


if __name__ == "__main__":
    main()
