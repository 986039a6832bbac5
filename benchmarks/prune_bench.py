"""Pruning benchmark; results and commands in docs/benchmarks.md.

    python benchmarks/prune_bench.py                  # accuracy and inverse
    python benchmarks/prune_bench.py --part accuracy  # one-shot M-FAC vs magnitude, digits MLP and CNN
    python benchmarks/prune_bench.py --part inverse   # DenseMFAC vs the paper's sequential recurrence
    python benchmarks/prune_bench.py --part inverse --device cuda   # the same on a GPU
    python benchmarks/prune_bench.py --part sweep     # damping x recompute steps x num_grads (slow)
    python benchmarks/prune_bench.py --part llama     # tiny Llama: M-FAC, SparseGPT, Wanda, magnitude
    python benchmarks/prune_bench.py --part llama --methods "M-FAC (global)" --num-grads 128 \
        --calibration-batch 1                         # one M-FAC variant on the same 128 sequences
    python benchmarks/prune_bench.py --part depth --threads 1   # sequential calibration: 4 vs 16 layers
    python benchmarks/prune_bench.py --part llama --methods SparseGPT "M-FAC joint (layer)" \
        --patterns 2:4 --joint-relative-damp 0.3      # M-FAC with update="joint", another damping

accuracy: one ``prune()`` call with MFACPruner's defaults, no fine-tuning, at
50/70/80/90/95% sparsity, against global magnitude pruning, on the digits MLP
64-128-10 and the digits CNN trained here (seconds on a CPU). M-FAC is repeated
over three orders of the pruning batches (``--seeds``).

inverse: time and peak memory of building the blockwise (or full) inverse and
its diagonal. Ours (``DenseMFAC``: ``K = n·λ·I + G Gᵀ = L Lᵀ``, ``W = L⁻¹ G``,
GEMM-shaped) against the static algorithm as the M-FAC paper states it, a
sequential recurrence of ``n`` matrix-vector passes written out below. Each
measurement runs in a fresh process, so peak RSS is its own.

sweep: test accuracy at 90% sparsity for recompute steps, absolute and relative
damping and num_grads, over three seeds: the measurement the defaults come from.

llama: the byte-level tiny Llama of the low-rank benchmark, trained once (cached
under runs/cache), pruned to 50%, 70% and 2:4 of its attention and MLP matrices by
magnitude, Wanda, SparseGPT and M-FAC OBS from the same 128 calibration sequences;
held-out loss (nats/byte), wall time and peak memory of each ``prune()`` call, each
call in a fresh process so that its peak resident memory is its own
(``secondorder/_workloads/llama_pruning.py`` holds the workflow).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines import sequential_recurrence
from timing import peak_bytes, timed

from secondorder._workloads import llama_pruning as llm_pruning
from secondorder._workloads.data import load_digits, load_stdlib_corpus
from secondorder._workloads.digits_pruning import (
    make_pruner,
    one_shot,
    pruning_batches,
    train_dense,
)
from secondorder._workloads.language_model import new_model
from secondorder._workloads.measure import measured
from secondorder._workloads.report import markdown_row, markdown_table
from secondorder._workloads.training import evaluate
from secondorder.curvature import DenseMFAC
from secondorder.prune import MFACPruner, SparseGPTPruner, WandaPruner

SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]


# --------------------------------------------------------------------------- accuracy


def accuracy(seeds: int) -> None:
    train, test = load_digits()
    for kind in ("mlp", "cnn"):
        start = time.perf_counter()
        model, dense = train_dense(kind, train, test)
        print(
            f"\ndigits {kind}: dense test accuracy {dense:.3f} (trained in {time.perf_counter() - start:.0f} s)"
        )
        header = ["sparsity", "magnitude accuracy", "M-FAC accuracy (mean)", "M-FAC min",
                  "M-FAC − magnitude", "magnitude test loss", "M-FAC test loss (mean)",
                  "M-FAC s/prune"]  # fmt: skip
        print(markdown_table(header, []))
        for sparsity in SPARSITIES:
            magnitude = one_shot(model, "magnitude", sparsity, train, test)
            runs = [one_shot(model, "M-FAC", sparsity, train, test, seed=s) for s in range(seeds)]
            accuracy = statistics.mean(r.accuracy for r in runs)
            row = [
                f"{sparsity:.2f}",
                f"{magnitude.accuracy:.3f}",
                f"{accuracy:.3f}",
                f"{min(r.accuracy for r in runs):.3f}",
                f"{100 * (accuracy - magnitude.accuracy):+.1f} points",
                f"{magnitude.loss:.3f}",
                f"{statistics.mean(r.loss for r in runs):.3f}",
                f"{statistics.mean(r.seconds for r in runs):.1f}",
            ]
            print(markdown_row(row), flush=True)


# --------------------------------------------------------------------------- sweep


def sweep(seeds: int, sparsity: float = 0.9) -> None:
    train, test = load_digits()
    kwdefaults = MFACPruner.__init__.__kwdefaults__
    defaults = {k: kwdefaults[k] for k in ("num_grads", "damp", "relative_damp")}
    absolute = {"relative_damp": 0.0}
    settings: list[tuple[str, dict, float]] = []  # name, options, loss scale
    settings += [
        (f"recompute_steps={k}", {"recompute_steps": k}, 1.0) for k in (1, 2, 4, 8, 16, 32)
    ]
    settings += [
        (f"relative_damp={r:g}", {"relative_damp": r}, 1.0) for r in (1e-3, 1e-2, 1e-1, 1.0)
    ]
    settings += [
        (f"damp={d:g}, relative_damp=0", {"damp": d, **absolute}, 1.0)
        for d in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    ]
    settings += [(f"num_grads={n}", {"num_grads": n}, 1.0) for n in (16, 32, 128)]
    settings += [
        ("defaults, loss x 0.01", {}, 0.01),
        ("damp=1e-5, relative_damp=0, loss x 0.01", {"damp": 1e-5, **absolute}, 0.01),
    ]
    for kind in ("mlp", "cnn"):
        model, dense = train_dense(kind, train, test)
        magnitude = one_shot(model, "magnitude", sparsity, train, test).accuracy
        grads = make_pruner("M-FAC", copy.deepcopy(model), train).collect_gradients()
        mean_diagonal = float(grads.double().square().mean())
        print(
            f"\ndigits {kind}, {sparsity:.0%} sparsity: dense {dense:.3f}, magnitude {magnitude:.3f}, "
            f"mean diagonal of the Fisher estimate {mean_diagonal:.1e}; M-FAC with the defaults "
            f"({defaults}, recompute_steps={MFACPruner.default_recompute_steps}) except:"
        )
        print(markdown_table(["setting", "accuracy mean", "min", "max", "s/prune"], []))
        for name, options, scale in settings:
            accs, times = [], []
            for seed in range(seeds):
                pruned = copy.deepcopy(model)
                prune_options = {k: options[k] for k in ("recompute_steps",) if k in options}
                pruner_options = {k: v for k, v in options.items() if k not in prune_options}

                def loss(outputs, targets, scale=scale):
                    return scale * nn.functional.cross_entropy(outputs, targets)

                pruner = MFACPruner(
                    pruned, loss, pruning_batches(train, seed), progress=False, **pruner_options
                )
                prune = partial(pruner.prune, sparsity, **prune_options)
                # one call: pruning changes the model, so it cannot be repeated
                times.append(timed(prune, max_repeats=1, warmup=False))
                accs.append(evaluate(pruned, test)[1])
            row = [name, f"{statistics.mean(accs):.3f}", f"{min(accs):.3f}", f"{max(accs):.3f}",
                   f"{statistics.mean(times):.1f}"]  # fmt: skip
            print(markdown_row(row), flush=True)


# --------------------------------------------------------------------------- llama


# options of --part llama that its child processes must receive too
LLAMA_OPTIONS = (
    "num_grads",
    "block_size",
    "calibration_batch",
    "calibration_sequences",
    "relative_damp",
    "recompute_steps",
    "joint_relative_damp",
    "joint_rounds",
)


def llama_setup(args: argparse.Namespace) -> llm_pruning.LlamaPruneSetup:
    defaults = llm_pruning.LlamaPruneSetup()
    return dataclasses.replace(
        defaults,
        num_grads=args.num_grads or defaults.num_grads,
        block_size=args.block_size or defaults.block_size,
        calibration_batch=args.calibration_batch or defaults.calibration_batch,
        calibration_sequences=args.calibration_sequences or defaults.calibration_sequences,
        mfac_relative_damp=args.relative_damp or defaults.mfac_relative_damp,
        mfac_recompute_steps=args.recompute_steps,
        joint_relative_damp=args.joint_relative_damp or defaults.joint_relative_damp,
        joint_rounds=args.joint_rounds or defaults.joint_rounds,
    )


def llama_child(args: argparse.Namespace, method: str, pattern: str) -> None:
    """Run in its own process: one pruning call on the cached model; print the result as JSON."""
    setup = llama_setup(args)
    corpus = load_stdlib_corpus(setup.model.corpus_bytes)
    state, _ = llm_pruning.trained_llama(setup, corpus, show_progress=False)
    run = llm_pruning.prune_once(state, setup, corpus, method, pattern)
    print(json.dumps(dataclasses.asdict(run)))


def llama(args: argparse.Namespace) -> None:
    setup = llama_setup(args)
    passed = [
        f"--{name.replace('_', '-')}={value}"
        for name in LLAMA_OPTIONS
        if (value := getattr(args, name)) is not None
    ]

    def in_fresh_process(state, setup, corpus, method, pattern):
        command = [
            sys.executable, __file__, "--threads", str(args.threads), *passed,
            "--llama-child", method, pattern,
        ]  # fmt: skip
        runs = []
        for _ in range(args.llama_repeats):  # the same call again: its fastest time, largest peak
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs.append(llm_pruning.PruneRun(**json.loads(out.strip().splitlines()[-1])))
        peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
        run = dataclasses.replace(
            runs[0],
            seconds=min(r.seconds for r in runs),
            peak_bytes=max(peaks) if peaks else None,
        )
        times = ", ".join(f"{r.seconds:.1f}" for r in runs)
        print(f"  {method}, {pattern}: loss {run.loss:.3f} in {times} s", flush=True)
        return run

    start = time.perf_counter()
    comparison = llm_pruning.compare(
        setup, methods=args.methods, patterns=args.patterns, show_progress=False,
        run=in_fresh_process,
    )  # fmt: skip
    print(
        f"\ntorch {torch.__version__}, {args.threads} thread(s); {comparison.describe()}; "
        f"{time.perf_counter() - start:.0f} s in all\n"
    )
    print(llm_pruning.report_text(comparison))


# --------------------------------------------------------------------------- depth

DEPTH_METHODS = {"SparseGPT": SparseGPTPruner, "Wanda": WandaPruner}


def depth_model(layers: int) -> tuple[nn.Module, list, llm_pruning.LlamaPruneSetup]:
    """The tiny Llama of ``--part llama`` (seeded, untrained) with ``layers`` decoder layers, and its calibration data."""
    setup = llm_pruning.LlamaPruneSetup()
    setup = dataclasses.replace(setup, model=dataclasses.replace(setup.model, num_layers=layers))
    corpus = load_stdlib_corpus(setup.model.corpus_bytes)
    model = new_model(corpus, setup.model)
    return model, llm_pruning.calibration_data(setup, corpus), setup


def depth_child(method: str, layers: int, mode: str) -> None:
    """Run in its own process: one ``prune(0.5)`` call; print its wall and CPU time and peak memory as JSON."""
    model, data, _ = depth_model(layers)
    block = model.model.layers[0]
    block_bytes = sum(t.numel() * t.element_size() for t in block.state_dict().values())
    activations = sum(inputs.numel() * 4 * model.config.hidden_size for inputs, _ in data)
    names = llm_pruning.prunable_weights(model)
    weights = model.state_dict()
    prunable = sum(weights[name].numel() * weights[name].element_size() for name in names)
    pruner = DEPTH_METHODS[method](
        model, data, params=names, progress=False, sequential=mode == "sequential",
        device="cpu" if mode == "sequential" else None,
    )  # fmt: skip
    with torch.no_grad():  # the first call loads kernels: not part of the peak
        model(data[0][0])
    cpu = time.process_time()
    with measured(torch.device("cpu")) as measurement:
        pruner.prune(0.5)
    print(json.dumps({"seconds": measurement.seconds, "cpu_seconds": time.process_time() - cpu,
                      "peak_bytes": measurement.peak_bytes, "block_bytes": block_bytes,
                      "activation_bytes": activations, "prunable_bytes": prunable}))  # fmt: skip


def depth_masks_agree(layers: int = 4) -> str:
    """Sequential against re-run calibration on the same model: mask entries and weights that differ."""
    lines = []
    for method, pruner_class in DEPTH_METHODS.items():
        for pattern in ({"sparsity": 0.5}, {"n_m": (2, 4)}):
            results = []
            for sequential in (True, False):
                model, data, _ = depth_model(layers)
                pruner = pruner_class(
                    model, data, params=llm_pruning.prunable_weights(model), progress=False,
                    sequential=sequential,
                )  # fmt: skip
                pruner.prune(**pattern)
                results.append([(t.mask(), t.weight()) for t in pruner.targets])
            differ = sum(int((a[0] != b[0]).sum()) for a, b in zip(*results, strict=True))
            largest = max(float((a[1] - b[1]).abs().max()) for a, b in zip(*results, strict=True))
            lines.append(
                f"{method} {pattern}: {differ} mask entries differ, largest weight difference "
                f"{largest:.1e}"
            )
    return "\n".join(lines)


def depth(threads: int, repeats: int) -> None:
    _, _, setup = depth_model(4)
    m = setup.model
    print(
        f"torch {torch.__version__}, {threads} thread(s); tiny Llama (hidden {m.hidden_size}, "
        f"intermediate {m.intermediate_size}, {m.num_heads} heads, seeded and untrained), "
        f"prune(0.5) of its attention and MLP matrices from {setup.calibration_sequences} "
        f"sequences of {m.seq_len} bytes; each call in a fresh process, the least of "
        f"{repeats} (4 and 16 layers alternating)\n"
    )
    print(f"4 layers, sequential against re-run calibration:\n{depth_masks_agree(4)}\n")
    header = ["method", "calibration", "4 layers: wall / CPU (s)", "16 layers: wall / CPU (s)",
              "16 / 4 (wall, CPU)", "peak RSS growth, 4 / 16 layers",
              "one block + cached activations", "prunable weights, 4 / 16 layers"]  # fmt: skip
    print(markdown_table(header, []))
    for method in DEPTH_METHODS:
        for mode in ("sequential", "re-run"):
            runs: dict[int, list[dict]] = {4: [], 16: []}
            for _ in range(repeats):  # alternating, so that a busy spell hits both depths
                for layers, results in runs.items():
                    command = [sys.executable, __file__, "--threads", str(threads),
                               "--depth-child", method, str(layers), mode]  # fmt: skip
                    out = subprocess.run(command, check=True, capture_output=True, text=True)
                    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            best = {
                layers: {key: min(r[key] for r in results) for key in results[0]}
                for layers, results in runs.items()
            }
            small, big = best[4], best[16]
            mib = 2.0**20
            row = [method, mode,
                   f"{small['seconds']:.2f} / {small['cpu_seconds']:.2f}",
                   f"{big['seconds']:.2f} / {big['cpu_seconds']:.2f}",
                   f"{big['seconds'] / small['seconds']:.1f}x, "
                   f"{big['cpu_seconds'] / small['cpu_seconds']:.1f}x",
                   f"{small['peak_bytes'] / mib:.1f} / {big['peak_bytes'] / mib:.1f} MiB",
                   f"{big['block_bytes'] / mib:.1f} + {big['activation_bytes'] / mib:.1f} MiB",
                   f"{small['prunable_bytes'] / mib:.1f} / {big['prunable_bytes'] / mib:.1f} MiB",
                   ]  # fmt: skip
            print(markdown_row(row), flush=True)


# --------------------------------------------------------------------------- inverse


def as_blocks(grads: torch.Tensor, block_size: int | None) -> torch.Tensor:
    n, d = grads.shape
    size = d if block_size is None else block_size
    return grads.reshape(n, d // size, size).transpose(0, 1).contiguous()


def inverse_child(
    method: str, dim: int, num_grads: int, block_size: int | None, damp: float, device: str
) -> None:
    """Run in its own process: build one inverse and print its time and peak memory as JSON
    (growth of the peak RSS on CPU, of the peak allocated bytes on CUDA)."""
    on_cuda = torch.device(device).type == "cuda"
    grads = torch.randn(num_grads, dim, generator=torch.Generator().manual_seed(0)) / dim**0.5
    grads = grads.to(device)
    if method == "sequential":
        grads = as_blocks(grads, block_size)

    def build() -> None:
        if method == "sequential":
            sequential_recurrence(grads, damp)
        else:
            DenseMFAC(grads, damp, block_size).diag()

    seconds = 0.0

    def build_timed() -> None:  # one cold call: this process measures nothing else
        nonlocal seconds
        seconds = timed(build, max_repeats=1, warmup=False, device=device)

    if on_cuda:
        before = torch.cuda.memory_allocated()
        extra = peak_bytes(build_timed, device) - before
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        build_timed()
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"seconds": seconds, "extra_bytes": extra}))


def agreement(dim: int = 4096, num_grads: int = 256, damp: float = 1e-4) -> None:
    """Both algorithms in float64 agree; in float32 (what the timings use), how far is each off?"""
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(num_grads, dim, generator=gen, dtype=torch.float64) / dim**0.5
    for block in (128, None):
        truth = DenseMFAC(grads, damp, block).diag()
        recurrence = sequential_recurrence(as_blocks(grads, block), damp)[2].reshape(-1)
        ours32 = DenseMFAC(grads.float(), damp, block).diag()
        recurrence32 = sequential_recurrence(as_blocks(grads.float(), block), damp)[2].reshape(-1)

        def error(x: torch.Tensor, truth: torch.Tensor = truth) -> float:
            return float(((x.double() - truth) / truth).abs().max())

        print(
            f"d={dim}, n={num_grads}, block={block or 'full'}, damp={damp:g}: largest relative "
            f"difference of the diagonals, float64 recurrence vs ours {error(recurrence):.1e}; "
            f"in float32, ours {error(ours32):.1e}, the recurrence {error(recurrence32):.1e}"
        )


def inverse(threads: int, repeats: int, large: bool, device: str) -> None:
    agreement()
    cases = [
        (2**17, 64, 128),
        (2**17, 256, 128),
        (2**17, 64, None),
        (2**17, 256, None),
        (2**20, 64, 128),
        (2**20, 64, None),
    ]
    if large:  # minutes per measurement on a CPU
        cases = [(2**20, 256, 128)]
    damp = 1e-4
    print(
        f"\ntorch {torch.__version__}, {threads} thread(s); every measurement a fresh process, "
        f"the two methods alternating; fastest of {repeats}, largest peak"
    )
    header = ["d", "n", "block", "ours (s)", "sequential (s)", "speed-up", "ours peak extra",
              "sequential peak extra"]  # fmt: skip
    print(markdown_table(header, []))
    for dim, num_grads, block in cases:
        results: dict[str, list[dict]] = {"ours": [], "sequential": []}
        for _ in range(repeats):
            for method, runs in results.items():
                command = [
                    sys.executable, __file__, "--inverse-child", method, str(dim), str(num_grads),
                    str(block), str(damp), device, "--threads", str(threads),
                ]  # fmt: skip
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
        seconds = {m: min(r["seconds"] for r in runs) for m, runs in results.items()}
        peak = {m: max(r["extra_bytes"] for r in runs) / 2**20 for m, runs in results.items()}
        row = [dim, num_grads, block or "full", f"{seconds['ours']:.2f}",
               f"{seconds['sequential']:.2f}", f"{seconds['sequential'] / seconds['ours']:.1f}x",
               f"{peak['ours']:.0f} MiB", f"{peak['sequential']:.0f} MiB"]  # fmt: skip
        print(markdown_row(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part", choices=["all", "accuracy", "inverse", "sweep", "llama", "depth"], default="all"
    )
    parser.add_argument("--seeds", type=int, default=3, help="orders of the pruning batches")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--repeats", type=int, default=3, help="inverse, depth: fastest of this many"
    )
    parser.add_argument("--large", action="store_true", help="inverse: only d=2^20, n=256")
    parser.add_argument(
        "--llama-repeats", type=int, default=1, help="llama: each call this many times, fastest"
    )
    parser.add_argument("--device", default="cpu", help="device of --part inverse")
    parser.add_argument(
        "--methods", nargs="+", choices=list(llm_pruning.METHODS), help="llama: only these"
    )
    parser.add_argument(
        "--patterns", nargs="+", choices=list(llm_pruning.PATTERNS), help="llama: only these"
    )
    parser.add_argument("--num-grads", type=int, help="llama: M-FAC gradients per step")
    parser.add_argument("--block-size", type=int, help="llama: M-FAC and SparseGPT block size")
    parser.add_argument(
        "--calibration-batch", type=int, help="llama: sequences per calibration batch"
    )
    parser.add_argument("--recompute-steps", type=int, help="llama: M-FAC recompute steps")
    parser.add_argument("--relative-damp", type=float, help="llama: M-FAC relative damping")
    parser.add_argument(
        "--joint-relative-damp", type=float, help="llama: relative damping of M-FAC joint"
    )
    parser.add_argument("--joint-rounds", type=int, help="llama: removal rounds of M-FAC joint")
    parser.add_argument(
        "--calibration-sequences",
        type=int,
        help="llama: calibration sequences (128 is the comparison's budget)",
    )
    parser.add_argument("--inverse-child", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--llama-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--depth-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.inverse_child:
        method, dim, num_grads, block, damp, device = args.inverse_child
        inverse_child(
            method,
            int(dim),
            int(num_grads),
            None if block == "None" else int(block),
            float(damp),
            device,
        )
        return
    if args.llama_child:
        llama_child(args, *args.llama_child)
        return
    if args.depth_child:
        method, layers, mode = args.depth_child
        depth_child(method, int(layers), mode)
        return
    if args.part in ("all", "accuracy"):
        accuracy(args.seeds)
    if args.part in ("all", "inverse"):
        inverse(args.threads, args.repeats, args.large, args.device)
    if args.part == "sweep":
        sweep(args.seeds)
    if args.part == "llama":
        llama(args)
    if args.part == "depth":
        depth(args.threads, args.repeats)


if __name__ == "__main__":
    main()
