"""The low-rank optimisers: projector refresh time, optimiser memory, and training quality.

    python benchmarks/lowrank_bench.py                 # all three parts
    python benchmarks/lowrank_bench.py --part refresh  # (1) DCT against SVD refresh, side by side
    python benchmarks/lowrank_bench.py --part memory   # (2) state bytes on a 58M Llama-style model
    python benchmarks/lowrank_bench.py --part quality  # (3) tiny Llama on the standard library
    python benchmarks/lowrank_bench.py --part speed    # (3) its training throughput, in turn
    python benchmarks/lowrank_bench.py --part sweep    # learning-rate sweep behind (3)
    python benchmarks/lowrank_bench.py --part step     # one optimiser step, many tensors
    python benchmarks/lowrank_bench.py --part natural-damping  # NaturalGaLore's damping, 3 seeds
    python benchmarks/lowrank_bench.py --part sst      # SST: re-warm-up and the paper's sampling

Prints markdown tables; the numbers in docs/benchmarks.md come from these commands. Times
come from ``benchmarks/timing.py``: the contenders are called in turn, round after round,
and each keeps its best time.
"""

from __future__ import annotations

import argparse
import math
import statistics
from functools import partial

import torch
from peers import load_dct_adamw
from timing import timed_side_by_side

from secondorder._workloads.data import load_stdlib_corpus
from secondorder._workloads.language_model import (
    LMSetup,
    low_rank_groups,
    matrix_layers,
    new_model,
    train_step,
)
from secondorder._workloads.report import markdown_table
from secondorder._workloads.training import optimizer_state_bytes
from secondorder.demo.lowrank import (
    OPTIMIZERS,
    _galore,
    compare,
    results_table,
)
from secondorder.nn import to_spectral
from secondorder.optim import SST, DCTAdamW, GaLoreAdamW, NaturalGaLore
from secondorder.optim.projectors import DCTProjector, SVDProjector, dct_rows


def refresh_part(repeats: int, device: torch.device) -> None:
    print("\n### (1) Projector refresh: DCT against SVD, in turn, best of", repeats, "(ms)\n")
    rank = 128
    rows = []
    for shape in [(1024, 1024), (4096, 1024)]:
        X = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
        best_of = timed_side_by_side(
            {
                "svd": partial(SVDProjector().refresh, X, rank),
                "matmul": partial(DCTProjector(method="matmul").refresh, X, rank),
                "fft": partial(DCTProjector(method="fft").refresh, X, rank),
            },
            budget=math.inf,
            max_rounds=repeats,
            device=device,
        )
        svd, dct_matmul, dct_fft = best_of["svd"], best_of["matmul"], best_of["fft"]
        best = min(dct_matmul, dct_fft)
        rows.append(
            [f"{shape[0]} x {shape[1]}", f"{svd * 1e3:.1f}", f"{dct_matmul * 1e3:.1f}",
             f"{dct_fft * 1e3:.1f}", f"{svd / best:.0f}x"]
        )  # fmt: skip
    print(markdown_table(["G", "SVD", "DCT (matmul)", "DCT (FFT)", "SVD / best DCT"], rows))

    print("\n`G Q` for the DCT basis: matmul against FFT (Makhoul), square G (ms)\n")
    rows = []
    for size in [256, 512, 1024, 2048, 4096]:
        X = torch.randn(size, size, generator=torch.Generator().manual_seed(1)).to(device)
        Q = DCTProjector().full_basis(size, X.dtype, X.device)
        best_of = timed_side_by_side(
            {"matmul": partial(torch.matmul, X, Q), "fft": partial(dct_rows, X)},
            budget=math.inf,
            max_rounds=repeats,
            device=device,
        )
        matmul, fft = best_of["matmul"], best_of["fft"]
        rows.append(
            [size, f"{matmul * 1e3:.1f}", f"{fft * 1e3:.1f}", "FFT" if fft < matmul else "matmul"]
        )
    print(markdown_table(["size", "matmul", "FFT", "faster"], rows))


def llama_60m():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_part() -> None:
    rank, gap = 128, 200
    print(f"\n### (2) Memory on a Llama-style model (GaLore's 60M config), rank {rank}\n")
    settings = {"rank": rank, "update_proj_gap": gap}
    builders = {
        "AdamW": lambda m: (m, torch.optim.AdamW(m.parameters())),
        "GaLoreAdamW": lambda m: (m, GaLoreAdamW(low_rank_groups(m, **settings))),
        "NaturalGaLore (history 20)": lambda m: (m, NaturalGaLore(low_rank_groups(m, **settings))),
        "DCTAdamW": lambda m: (m, DCTAdamW(low_rank_groups(m, rank=rank))),
        "SST drop-in": lambda m: (m, SST(low_rank_groups(m, **settings))),
        "SST spectral": lambda m: (lambda s: (s, SST(s)))(
            to_spectral(m, rank, modules=matrix_layers(m))
        ),
    }
    rows, baseline = [], None
    for name, build in builders.items():
        model, optimizer = build(llama_60m())
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()
        state = optimizer_state_bytes(optimizer)
        weights = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
        grads = tensor_bytes(p.grad for p in model.parameters())
        total = weights + grads + state
        baseline = baseline or (state, total)
        rows.append(
            [name, f"{state / 2**20:,.0f}", f"{state / baseline[0]:.2f}", f"{weights / 2**20:,.0f}",
             f"{grads / 2**20:,.0f}", f"{total / 2**20:,.0f}", f"{total / baseline[1]:.2f}"]
        )  # fmt: skip
        del model, optimizer
    header = ["optimiser", "state MiB", "state / AdamW", "weights + buffers MiB", "gradients MiB",
              "total MiB", "total / AdamW"]  # fmt: skip
    print(markdown_table(header, rows))


def quality_part(steps: int, show_progress: bool) -> None:
    setup = LMSetup(steps=steps)
    print(f"\n### (3) Tiny Llama on the standard library: {steps} steps, rank {setup.rank}\n")
    variants = dict(OPTIMIZERS)
    gl_lr = OPTIMIZERS["GaLoreAdamW"][1]
    nat_lr = OPTIMIZERS["NaturalGaLore"][1]
    dct_lr = OPTIMIZERS["DCTAdamW"][1]
    variants["GaLoreAdamW, on_refresh=keep"] = (
        lambda m, s, lr: _galore(m, s, lr, on_refresh="keep"),
        gl_lr,
    )
    variants["NaturalGaLore, on_refresh=keep"] = (
        lambda m, s, lr: _galore(m, s, lr, NaturalGaLore, on_refresh="keep"),
        nat_lr,
    )
    variants["DCTAdamW, on_refresh=keep"] = (
        lambda m, s, lr: (m, DCTAdamW(low_rank_groups(m, rank=s.rank, on_refresh="keep"), lr=lr)), dct_lr)  # fmt: skip
    results = compare(setup, optimizers=variants, show_progress=show_progress)
    header, rows = results_table(results)
    print(markdown_table(header, rows))


def speed_part(steps: int, repeats: int) -> None:
    """Training throughput: each optimiser runs ``steps`` steps in turn, ``repeats`` rounds,
    best of each (no warm-up round: the best of the rounds leaves the cold first one out)."""
    setup = LMSetup()
    corpus = load_stdlib_corpus(setup.corpus_bytes)
    runs = {
        name: build(new_model(corpus, setup), setup, lr) for name, (build, lr) in OPTIMIZERS.items()
    }
    generator = torch.Generator().manual_seed(0)

    def train(model, optimizer):
        for _ in range(steps):
            train_step(model, optimizer, corpus, setup, generator)

    seconds = timed_side_by_side(
        {name: partial(train, *run) for name, run in runs.items()},
        budget=math.inf,
        max_rounds=repeats,
        warmup=False,
    )
    print(f"\n### Training throughput: {steps} steps of {setup.tokens_per_step} bytes, "
          f"in turn, best of {repeats}\n")  # fmt: skip
    rows = []
    for name, best in seconds.items():
        rows.append(
            [name, f"{steps * setup.tokens_per_step / best:,.0f}", f"{seconds['AdamW'] / best:.2f}"]
        )
    print(markdown_table(["optimiser", "tokens/s", "speed / AdamW"], rows))


def sweep_part(steps: int, show_progress: bool) -> None:
    setup = LMSetup(steps=steps)
    print(f"\n### Learning-rate sweep, {steps} steps: validation loss\n")
    rates = [3e-4, 1e-3, 3e-3, 1e-2]
    rows = []
    for name, (build, _) in OPTIMIZERS.items():
        runs = {lr: (build, lr) for lr in rates}
        results = compare(
            setup,
            optimizers={f"{name}@{lr:g}": runs[lr] for lr in rates},
            show_progress=show_progress,
        )
        rows.append([name, *[f"{r.valid_loss:.3f}" for r in results]])
    print(markdown_table(["optimiser", *[f"lr {lr:g}" for lr in rates]], rows))


def seeds_table(variants: dict, steps: int, seeds: int, show_progress: bool) -> None:
    """Each variant's validation loss over ``seeds`` seeds (model, batches), mean ± std."""
    import dataclasses

    rows = []
    for name, (build, lr) in variants.items():
        losses = []
        for seed in range(seeds):
            setup = dataclasses.replace(LMSetup(steps=steps), seed=seed)
            (result,) = compare(setup, optimizers={name: (build, lr)}, show_progress=show_progress)
            losses.append(result.valid_loss)
        spread = statistics.stdev(losses) if len(losses) > 1 else float("nan")
        each = " / ".join(f"{loss:.3f}" for loss in losses)
        rows.append([name, f"{lr:g}", f"{statistics.mean(losses):.3f} ± {spread:.3f}", each])
        print(rows[-1], flush=True)
    print(
        markdown_table(
            ["optimiser", "lr", f"valid loss, mean ± std ({seeds} seeds)", "each seed"], rows
        )
    )


def natural_damping_part(steps: int, seeds: int, show_progress: bool) -> None:
    """NaturalGaLore's damping: the reference's absolute λ (5e-5) and 100x it (5e-3, the
    default since this measurement), against damping relative to the projected gradients'
    mean square, with GaLore as the baseline; the default comes from this table."""
    lr = OPTIMIZERS["NaturalGaLore"][1]
    variants = {"GaLoreAdamW": (_galore, OPTIMIZERS["GaLoreAdamW"][1])}
    for damp in (5e-5, 5e-3):
        variants[f"NaturalGaLore, damp={damp:g}"] = (
            lambda m, s, lr, damp=damp: _galore(m, s, lr, NaturalGaLore, damp=damp),
            lr,
        )
    for rho in (10.0, 100.0, 1000.0, 10000.0):
        variants[f"NaturalGaLore, relative_damp={rho:g}"] = (
            lambda m, s, lr, rho=rho: _galore(m, s, lr, NaturalGaLore, relative_damp=rho),
            lr,
        )
    print(f"\n### NaturalGaLore's damping: tiny Llama, {steps} steps\n")
    seeds_table(variants, steps, seeds, show_progress)


def sst_part(steps: int, seeds: int, show_progress: bool) -> None:
    """SST with and without the re-warm-up after each resampling, and with the paper's
    half-uniform sampling mix."""
    lr = OPTIMIZERS["SST"][1]

    def sst(rewarmup_steps: int, uniform_mix: float):
        def build(model, setup, lr):
            model = to_spectral(model, setup.rank, modules=matrix_layers(model))
            return model, SST(
                model, lr=lr, update_proj_gap=setup.update_proj_gap,
                rewarmup_steps=rewarmup_steps, uniform_mix=uniform_mix,
            )  # fmt: skip

        return build

    variants = {
        "SST, no re-warm-up": (sst(0, 0.0), lr),
        "SST, re-warm-up 10": (sst(10, 0.0), lr),
        "SST, re-warm-up 10, uniform_mix 0.5 (the defaults)": (sst(10, 0.5), lr),
    }
    print(f"\n### SST's round boundaries: tiny Llama, {steps} steps\n")
    seeds_table(variants, steps, seeds, show_progress)


def llama_gradients(layers: int = 12, hidden: int = 256, seed: int = 0) -> torch.nn.Module:
    """A Llama-shaped model of ``9·layers + 3`` parameter tensors (attention and MLP matrices,
    two norms per layer, embeddings, final norm, output layer), with random gradients."""
    from secondorder._workloads.models import tiny_llama

    torch.manual_seed(seed)
    model = tiny_llama(256, hidden, layers, 4, int(2.6875 * hidden))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def step_part() -> None:
    """One optimiser step on the gradients in place (no forward or backward), side by side:
    AdamW for every tensor (ours against torch's foreach and for-loop AdamW) and GaLore's
    projected step between refreshes."""
    model = llama_gradients()
    params = list(model.parameters())
    print(f"\n### One step on a Llama-shaped model: {len(params)} tensors, "
          f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters\n")  # fmt: skip
    optimizers = {
        "torch AdamW, foreach": torch.optim.AdamW(params, lr=1e-3, foreach=True),
        "torch AdamW, for-loop": torch.optim.AdamW(params, lr=1e-3, foreach=False),
        "GaLoreAdamW, no rank (AdamW core)": GaLoreAdamW(params, lr=1e-3),
        "GaLoreAdamW, rank 32 (matrices projected)": GaLoreAdamW(
            low_rank_groups(model, rank=32, update_proj_gap=10**6), lr=1e-3
        ),
        "DCTAdamW, rank 32, between refreshes": DCTAdamW(
            low_rank_groups(model, rank=32, update_proj_gap=10**6), lr=1e-3
        ),
    }
    best = timed_side_by_side({name: opt.step for name, opt in optimizers.items()}, budget=20)
    reference = best["torch AdamW, foreach"]
    rows = [
        [name, f"{seconds * 1e3:.2f}", f"{seconds / reference:.2f}"]
        for name, seconds in best.items()
    ]
    print(markdown_table(["optimiser", "step (ms, best)", "/ torch AdamW foreach"], rows))
    dct_against_the_peer()


def dct_against_the_peer() -> None:
    """DCT-AdamW between refreshes on the MLP 256→512→256 at rank 32, against ISTA's
    DCTAdamW (``sim_type="makhoul"``, DCT-II as ours) on the same gradients, side by side."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    for p in mlp.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    matrices = [p for p in mlp.parameters() if p.dim() == 2]
    others = [p for p in mlp.parameters() if p.dim() < 2]
    groups = [{"params": others}, {"params": matrices, "rank": 32}]
    contenders = {"ours": DCTAdamW(groups, lr=1e-3, update_proj_gap=10**6)}
    peer_class = load_dct_adamw()
    if peer_class is not None:
        contenders["ISTA DCTAdamW"] = peer_class(
            list(mlp.parameters()), lr=1e-3, weight_decay=0.0, rank=32, proj="dct",
            update_proj_gap=10**6, sim_type="makhoul",
        )  # fmt: skip
    for optimizer in contenders.values():
        optimizer.step()  # the first step chooses the columns; the timed ones do not
    best = timed_side_by_side({name: opt.step for name, opt in contenders.items()}, budget=10)
    print("\n### DCT-AdamW between refreshes, MLP 256→512→256, rank 32\n")
    rows = [[name, f"{seconds * 1e3:.3f}"] for name, seconds in best.items()]
    print(markdown_table(["optimiser", "step (ms, best)"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part",
        choices=[
            "all",
            "refresh",
            "memory",
            "quality",
            "speed",
            "sweep",
            "step",
            "natural-damping",
            "sst",
        ],
        default="all",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="device of --part refresh")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="natural-damping, sst: seeds each")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    show = not args.no_progress
    if args.part in ("all", "refresh"):
        refresh_part(args.repeats, torch.device(args.device))
    if args.part in ("all", "memory"):
        memory_part()
    if args.part == "sweep":
        sweep_part(args.steps, show)
    if args.part in ("all", "quality"):
        quality_part(args.steps, show)
    if args.part in ("all", "speed"):
        speed_part(50, 3)
    if args.part in ("all", "step"):
        step_part()
    if args.part == "natural-damping":
        natural_damping_part(args.steps, args.seeds, show)
    if args.part == "sst":
        sst_part(args.steps, args.seeds, show)


if __name__ == "__main__":
    main()
