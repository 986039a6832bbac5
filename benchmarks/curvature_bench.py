"""Curvature products and trace estimation: secondorder against plain autograd, side by side.

A. The Hutchinson trace of the Hessian from 100 products, with the same Rademacher
   probes both ways (so the same estimate, to rounding: equal accuracy by
   construction): ``hutchinson_trace(HessianOperator(...), 100, method="hutchinson")``
   against a loop of single Hessian-vector products by double backward, as
   PyHessian computes them: on one batch, the gradient graph is built once and
   kept; on several batches, it is rebuilt for every probe and batch.
B. One product from scratch (forward and backward included), time and peak
   memory: ``HessianOperator @ v`` against ``autograd.grad`` of ``gᵀv`` with
   ``create_graph``; ``GGNOperator @ v`` against ``J``, ``Jᵀ`` and the output
   Hessian by plain autograd (``Jv`` by the double-backward trick).
C. Equal accuracy: on the digits MLP, whose exact Hessian is affordable, at
   initialisation and after 5 epochs of SGD, the RMS error over 10 seeds of
   Hutchinson and Hutch++ at 30 and 100 products.
P. Against the peer packages, when installed (each skipped with a message when not):
   the Hutchinson trace from 100 Hessian-vector products, operator construction
   included, on the digits CNN ``Conv2d(1, 16, 3) → ReLU → Flatten → Linear(576, 10)``
   and the digits MLP, batches of 32, 128 and 512. PyHessian 0.1:
   ``hessian(model, criterion, data=(X, y), cuda=False).trace(maxIter=100, tol=-inf)``
   (its early stop tests ``|Δmean| / (mean + 1e-6) < tol``, which a negative running mean
   passes for ``tol = 0``: ``-inf`` makes it run all 100 products); curvlinops 3.0.1:
   ``hutchinson_trace(HessianLinearOperator(...), 100)``. Each draws its own probes,
   so the estimates differ by sampling noise; the work (100 products) is the same.
W. How the Hessian's products are batched: ``HessianOperator @ Z`` (100 columns, one
   batch) with ``chunk_size`` 1 to 32 (the vmapped ``torch.func`` path) and through one
   kept autograd graph, one column at a time (the path of batches of 512 samples or
   more), on the digits CNN and MLP at batches of 32 to 512: where the defaults come from.

Times come from ``benchmarks/timing.py``: the contenders are called in turn, round after
round (``--repeats`` rounds in A and B; P and W for a budget of seconds), after one warm-up
round, and the best time of each is reported. Peak memory is the high-water mark of tensor
allocations during the call above what was allocated before it, from torch's profiler
(CPU) or ``timing.peak_bytes`` (CUDA).

    python benchmarks/curvature_bench.py [--threads N] [--repeats R] [--device cpu|cuda]
                                         [--parts abcpw]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
from collections.abc import Callable

import torch
from timing import peak_bytes, timed_side_by_side
from torch import nn

from secondorder._workloads.data import load_digits
from secondorder._workloads.models import digits_cnn, digits_mlp
from secondorder._workloads.report import text_table
from secondorder._workloads.training import train_classifier
from secondorder.curvature import GGNOperator, HessianOperator, hutchinson_trace
from secondorder.curvature.operators import retained_hessian_product
from secondorder.curvature.probes import probes
from secondorder.demo.optimizers import OPTIMIZERS

try:  # the peers are optional, benchmark-only dependencies
    from pyhessian import hessian as PyHessian
except ImportError:
    PyHessian = None
try:
    import curvlinops
except ImportError:
    curvlinops = None

LOSS = nn.functional.cross_entropy


def extra_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """High-water mark of allocations made during ``fn``, net of what it found: the CUDA
    allocator's through ``timing.peak_bytes``, on CPU from torch's profiler."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        return peak_bytes(fn, device) - before
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    changes = []
    for event in prof.events():
        if event.name == "[memory]":  # a free
            changes.append((event.time_range.start, event.cpu_memory_usage))
        elif event.self_cpu_memory_usage > 0:  # an allocation inside this op itself
            changes.append((event.time_range.start, event.self_cpu_memory_usage))
    current = peak = 0
    for _, change in sorted(changes, key=lambda c: c[0]):
        current += change
        peak = max(peak, current)
    return peak


def best_of_rounds(fns: dict[str, Callable[[], object]], rounds: int, device) -> dict[str, float]:
    """Best time of each function over exactly ``rounds`` rounds of calls in turn."""
    return timed_side_by_side(fns, budget=math.inf, max_rounds=rounds, device=device)


# -- A. Hutchinson trace, batched against a loop of double-backward HVPs -------------------------


def loop_trace(model, params, batches, z: torch.Tensor) -> float:
    """PyHessian's way: one ``autograd.grad`` per probe; the gradient graph is kept on one
    batch, rebuilt per probe and batch on several."""
    sizes = [p.numel() for p in params]

    def blocks(column):
        return [b.view(p.shape) for b, p in zip(column.split(sizes), params, strict=True)]

    def graph(inputs, targets):
        loss = LOSS(model(inputs), targets)
        return torch.autograd.grad(loss, params, create_graph=True)

    total = 0.0
    kept = graph(*batches[0]) if len(batches) == 1 else None
    num_samples = sum(len(t) for _, t in batches)
    for k in range(z.shape[1]):
        v = blocks(z[:, k])
        hv = [torch.zeros_like(p) for p in params]
        for inputs, targets in batches:
            grads = kept if kept is not None else graph(inputs, targets)
            products = torch.autograd.grad(grads, params, v, retain_graph=kept is not None)
            for acc, h in zip(hv, products, strict=True):
                acc.add_(h, alpha=len(targets) / num_samples)
        total += float(sum((h * b).sum() for h, b in zip(hv, v, strict=True)))
    return total / z.shape[1]


def part_a(device, repeats: int) -> tuple[list[str], list[list[str]]]:
    train, _ = load_digits()
    inputs, targets = train.inputs.to(device), train.targets.to(device)
    configs = [
        ("MLP 64-128-10", digits_mlp, 1, 128),
        ("CNN (digits)", digits_cnn, 1, 32),
        ("CNN (digits)", digits_cnn, 1, 256),
        ("CNN (digits)", digits_cnn, 4, 128),
    ]
    rows = []
    for name, make_model, num_batches, batch_size in configs:
        torch.manual_seed(0)
        model = make_model().to(device).eval()
        n = num_batches * batch_size
        batches = list(
            zip(inputs[:n].split(batch_size), targets[:n].split(batch_size), strict=True)
        )
        rows.append(_trace_row(name, model, batches, repeats, device))
        print(text_table(HEADER_A, rows[-1:]).splitlines()[-1], flush=True)
    return HEADER_A, rows


def _trace_row(name, model, batches, repeats, device, num_matvecs=100) -> list[str]:
    params = list(model.parameters())
    op = HessianOperator(model, LOSS, params, batches)
    z = probes(op.dim, num_matvecs, "rademacher", dtype=op.dtype, device=op.device,
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    estimates = {}

    def ours():
        estimates["ours"] = hutchinson_trace(
            op, num_matvecs, method="hutchinson", generator=torch.Generator().manual_seed(0)
        ).value

    def loop():
        estimates["loop"] = loop_trace(model, params, batches, z)

    times = best_of_rounds({"loop": loop, "ours": ours}, repeats, device)
    difference = abs(estimates["ours"] - estimates["loop"]) / abs(estimates["loop"])
    return [
        name,
        f"{op.dim:,}",
        f"{len(batches)} x {len(batches[0][1])}",
        f"{times['loop']:.2f}",
        f"{times['ours']:.2f}",
        f"{times['loop'] / times['ours']:.2f}x",
        f"{estimates['ours']:.3f}",
        f"{difference:.0e}",
    ]


HEADER_A = [
    "model",
    "parameters",
    "data",
    "loop of HVPs (s)",
    "batched (s)",
    "speed-up",
    "trace estimate",
    "relative difference",
]


# -- B. One product from scratch: time and peak memory ------------------------------------------


def autograd_hvp(model, params, inputs, targets, v):
    loss = LOSS(model(inputs), targets)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(grads, params, v)


def autograd_ggn_vp(model, params, inputs, targets, v):
    outputs = model(inputs)
    u = torch.zeros_like(outputs, requires_grad=True)
    jt_u = torch.autograd.grad(outputs, params, u, create_graph=True)  # Jᵀu, linear in u
    jv = torch.autograd.grad(jt_u, u, v)[0]  # J v by the double-backward trick
    f = outputs.detach().requires_grad_()
    (g,) = torch.autograd.grad(LOSS(f, targets), f, create_graph=True)
    (hjv,) = torch.autograd.grad(g, f, jv)
    return torch.autograd.grad(outputs, params, hjv)


def part_b(device, repeats: int) -> tuple[list[str], list[list[str]]]:
    train, _ = load_digits()
    rows = []
    for batch_size in (32, 256):
        torch.manual_seed(0)
        model = digits_cnn().to(device).eval()
        batch = (train.inputs[:batch_size].to(device), train.targets[:batch_size].to(device))
        for product in ("HVP", "GGN-vector"):
            rows.append(_product_row(product, model, batch, repeats, device))
            print(text_table(HEADER_B, rows[-1:]).splitlines()[-1], flush=True)
    return HEADER_B, rows


def _product_row(product, model, batch, repeats, device) -> list[str]:
    params = list(model.parameters())
    operator, plain_product = {
        "HVP": (HessianOperator, autograd_hvp),
        "GGN-vector": (GGNOperator, autograd_ggn_vp),
    }[product]
    op = operator(model, LOSS, params, [batch])
    vector = torch.randn(op.dim, device=device)
    pieces = vector.split([p.numel() for p in params])
    blocks = [b.view(p.shape) for b, p in zip(pieces, params, strict=True)]

    def ours():
        return op @ vector

    def plain():
        return plain_product(model, params, *batch, blocks)

    expected = torch.cat([t.reshape(-1) for t in plain()])
    error = float((ours() - expected).norm() / expected.norm())
    times = best_of_rounds({"plain": plain, "ours": ours}, repeats, device)
    memory = {name: extra_peak_bytes(fn, device) for name, fn in (("plain", plain), ("ours", ours))}
    return [
        product,
        str(len(batch[1])),
        f"{times['plain'] * 1e3:.1f}",
        f"{times['ours'] * 1e3:.1f}",
        f"{times['plain'] / times['ours']:.2f}x",
        f"{memory['plain'] / 2**20:.1f}",
        f"{memory['ours'] / 2**20:.1f}",
        f"{error:.0e}",
    ]


HEADER_B = [
    "product (digits CNN)",
    "batch",
    "autograd (ms)",
    "ours (ms)",
    "speed-up",
    "autograd peak (MiB)",
    "ours peak (MiB)",
    "relative difference",
]


# -- C. Equal accuracy: Hutchinson against Hutch++ ----------------------------------------------


def part_c(device, seeds: int = 10) -> tuple[list[str], list[list[str]]]:
    train, test = load_digits()
    data = [(train.inputs[:256].to(device), train.targets[:256].to(device))]
    rows = []
    for epochs in (0, 5):
        torch.manual_seed(0)
        model = digits_mlp().to(device)
        if epochs:
            train_classifier(
                "SGD", model, OPTIMIZERS["SGD+momentum"], train, test, epochs=epochs,
                batch_size=64, show_progress=False,
            )  # fmt: skip
        model.eval()
        op = HessianOperator(model, LOSS, None, data, chunk_size=64)  # a small MLP: wide is fast
        dense = op.to_dense()
        exact = float(dense.trace())
        eigenvalues = torch.linalg.eigvalsh(dense.double())
        top = float(eigenvalues.abs().topk(30).values.sum() / eigenvalues.abs().sum())
        print(f"digits MLP after {epochs} epochs: exact trace {exact:.4f} ({op.dim} products); "
              f"30 largest |eigenvalues| hold {top:.0%} of the nuclear norm", flush=True)  # fmt: skip
        for num_matvecs in (30, 100):
            for method in ("hutchinson", "hutch++"):
                errors, reported = [], []
                for seed in range(seeds):
                    estimate = hutchinson_trace(
                        op,
                        num_matvecs,
                        method=method,
                        generator=torch.Generator().manual_seed(seed),
                    )
                    errors.append(estimate.value - exact)
                    reported.append(estimate.std_error)
                rms = math.sqrt(sum(e * e for e in errors) / seeds)
                rows.append(
                    [
                        str(epochs),
                        f"{top:.0%}",
                        method,
                        str(num_matvecs),
                        f"{rms:.3f}",
                        f"{rms / abs(exact):.2%}",
                        f"{statistics.mean(reported):.3f}",
                    ]
                )
                print(text_table(HEADER_C, rows[-1:]).splitlines()[-1], flush=True)
    return HEADER_C, rows


HEADER_C = [
    "epochs trained",
    "top-30 share of Σ|λ|",
    "method",
    "products",
    "RMS error",
    "relative",
    "mean reported std. error",
]


# -- P. Against the peer packages: PyHessian and curvlinops ------------------------------------


def digits_small_cnn() -> nn.Module:
    """The 5,930-parameter digits CNN of the peer comparison."""
    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(576, 10))


def part_p(device, repeats: int) -> tuple[list[str], list[list[str]]]:
    missing = [name for name, module in (("pyhessian==0.1", PyHessian),
               ("curvlinops-for-pytorch==3.0.1", curvlinops)) if module is None]  # fmt: skip
    for name in missing:
        print(f"{name} is not installed: skipped (pip install --no-deps {name})")
    train, _ = load_digits()
    rows = []
    for model_name, make_model in (("CNN 5,930", digits_small_cnn), ("MLP 64-128-10", digits_mlp)):
        for batch_size in (32, 128, 512):
            torch.manual_seed(0)
            model = make_model().to(device).eval()
            batch = (train.inputs[:batch_size].to(device), train.targets[:batch_size].to(device))
            rows.append(_peer_row(model_name, model, batch, repeats, device))
            print(text_table(HEADER_P, rows[-1:]).splitlines()[-1], flush=True)
    return HEADER_P, rows


def _peer_row(name, model, batch, repeats, device, num_matvecs=100) -> list[str]:
    params = list(model.parameters())
    targets = batch[1]
    estimates: dict[str, float] = {}

    def ours():
        op = HessianOperator(model, LOSS, params, [batch], check_deterministic=False)
        estimates["ours"] = hutchinson_trace(op, num_matvecs, method="hutchinson").value

    def pyhessian():
        h = PyHessian(model, nn.CrossEntropyLoss(), data=batch, cuda=device.type == "cuda")
        estimates["PyHessian"] = sum(h.trace(maxIter=num_matvecs, tol=-math.inf)) / num_matvecs
        for p in params:  # its loss.backward(create_graph=True) left a graph in .grad
            p.grad = None

    def curvlinops_trace():
        op = curvlinops.HessianLinearOperator(
            model, nn.CrossEntropyLoss(), params, [batch], check_deterministic=False
        )
        estimates["curvlinops"] = float(curvlinops.hutchinson_trace(op, num_matvecs))

    fns = {"ours": ours}
    if PyHessian is not None:
        fns["PyHessian"] = pyhessian
    if curvlinops is not None:
        fns["curvlinops"] = curvlinops_trace
    times = timed_side_by_side(fns, budget=4.0 * repeats, max_rounds=10 * repeats, device=device)
    peers = {k: v for k, v in times.items() if k != "ours"}
    fastest = min(peers, key=peers.get) if peers else None

    def cell(key):
        return f"{times[key] * 1e3:.0f}" if key in times else "not installed"

    return [
        name,
        str(len(targets)),
        cell("PyHessian"),
        cell("curvlinops"),
        cell("ours"),
        f"{peers[fastest] / times['ours']:.2f}x ({fastest})" if fastest else "-",
        " / ".join(
            f"{estimates[k]:.3f}" for k in ("ours", "PyHessian", "curvlinops") if k in estimates
        ),
    ]


def retained_loop(model: nn.Module, batch, z: torch.Tensor) -> torch.Tensor:
    """``H z`` one column at a time through one kept graph (the operator's path on large
    batches), from the public :func:`retained_hessian_product`."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    product = retained_hessian_product(model, LOSS, params, *batch)
    sizes = [p.numel() for p in params.values()]
    columns = []
    for column in z.T:
        blocks = column.split(sizes)
        v = {name: b.view_as(p) for (name, p), b in zip(params.items(), blocks, strict=True)}
        out = product(v)
        columns.append(torch.cat([out[name].reshape(-1) for name in params]))
    return torch.stack(columns, dim=1)


def part_w(device, repeats: int) -> tuple[list[str], list[list[str]]]:
    train, _ = load_digits()
    widths = (1, 2, 4, 8, 16, 32)
    rows = []
    for model_name, make_model in (("CNN 5,930", digits_small_cnn), ("MLP 64-128-10", digits_mlp)):
        for batch_size in (32, 64, 128, 256, 512):
            torch.manual_seed(0)
            model = make_model().to(device).eval()
            batch = (train.inputs[:batch_size].to(device), train.targets[:batch_size].to(device))
            op = HessianOperator(model, LOSS, None, [batch], check_deterministic=False)
            z = probes(op.dim, 100, "rademacher", dtype=op.dtype, device=op.device)

            def product(width, op=op, z=z):
                op.chunk_size = width
                return op @ z

            def loop(model=model, batch=batch, z=z):
                return retained_loop(model, batch, z)

            fns = {f"{w}": (lambda w=w: product(w)) for w in widths} | {"loop": loop}
            times = timed_side_by_side(
                fns, budget=2.0 * repeats, max_rounds=5 * repeats, device=device
            )
            op.chunk_size = None
            default = str(op.columns_per_call(batch_size) or "loop")
            fastest = min(times, key=times.get)
            rows.append(
                [model_name, str(batch_size)]
                + [f"{times[k] * 1e3:.0f}" for k in fns]
                + [fastest, default]
            )
            print(text_table(header_w(widths), rows[-1:]).splitlines()[-1], flush=True)
    return header_w(widths), rows


def header_w(widths) -> list[str]:
    return (
        ["model", "batch"]
        + [f"width {w} (ms)" for w in widths]
        + ["kept-graph loop (ms)", "fastest", "default"]
    )


HEADER_P = [
    "model",
    "batch",
    "PyHessian (ms)",
    "curvlinops (ms)",
    "ours (ms)",
    "ours vs fastest peer",
    "trace estimates (ours / PyHessian / curvlinops)",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="A, B: rounds, best of each; P, W: budget scale"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parts", default="abcp", help="which parts to run, e.g. 'ab'")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, device {device}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    parts = {"a": part_a, "b": part_b, "c": lambda d, r: part_c(d), "p": part_p, "w": part_w}
    titles = {
        "a": "A. Hutchinson trace from 100 products, same probes",
        "b": "B. One product from scratch",
        "c": "C. Hutchinson against Hutch++ on the digits MLP Hessian (10 seeds)",
        "p": "P. Hutchinson trace from 100 products against PyHessian and curvlinops",
        "w": "W. 100 Hessian products on one batch: vmapped widths and the kept-graph loop",
    }
    for key in args.parts:
        print(f"\n{titles[key]}", flush=True)
        header, rows = parts[key](device, args.repeats)
        print(text_table(header, rows))


if __name__ == "__main__":
    main()
