"""SOAP's step time and state beside heavyball's SOAP and torch's AdamW, on the tiny Llama.

    python benchmarks/soap_bench.py                # 4-layer byte Llama (0.86M parameters)
    python benchmarks/soap_bench.py --steps 40 --threads 1

Each optimiser is built as its README shows (``SOAP(model.parameters(), lr=3e-3)``,
``heavyball.SOAP(model.parameters(), lr=3e-3)``, ``torch.optim.AdamW(..., lr=3e-3)``) on
its own copy of one model, with one fixed batch's gradients. After warm-up steps
(heavyball compiles its step on the first call), the optimisers step in turn, round after
round, and each keeps the mean of its steps over whole refresh periods (SOAP refreshes its
bases every ``precondition_frequency`` steps, so a mean over a multiple of it counts them
fairly; heavyball's default refreshes on its own schedule, from every 2 steps: a second
heavyball row refreshes every 10 steps, as SOAP's default). Also the library's
``rank=32`` (one-sided) and ``basis="dct"`` variants, and the bytes of every tensor in
each optimiser's state. heavyball is optional (``pip install --no-deps heavyball``):
without it its row says so.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from secondorder._workloads.models import tiny_llama
from secondorder._workloads.report import format_bytes, markdown_table
from secondorder.optim import SOAP


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in ``optimizer.state`` (nested containers too)."""

    def count(value: object) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(count(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(count(v) for v in value)
        return 0

    return sum(count(state) for state in optimizer.state.values())


def step(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[torch.Tensor]
) -> float:
    """One step on fresh copies of the gradients (some optimisers consume them), timed alone."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def contenders() -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    built: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        "secondorder SOAP": lambda p: SOAP(p, lr=3e-3),
        "secondorder SOAP rank=32": lambda p: SOAP(p, lr=3e-3, rank=32),
        "secondorder SOAP basis='dct'": lambda p: SOAP(p, lr=3e-3, basis="dct"),
        "torch AdamW": lambda p: torch.optim.AdamW(p, lr=3e-3),
    }
    try:
        import heavyball
    except ImportError:
        print("heavyball is not installed (pip install --no-deps heavyball): its row is skipped")
    else:
        built["heavyball SOAP"] = lambda p: heavyball.SOAP(p, lr=3e-3)
        built["heavyball SOAP, refresh every 10"] = lambda p: heavyball.SOAP(
            p, lr=3e-3, precondition_frequency=10, use_precond_schedule=False
        )
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each, per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = tiny_llama(num_layers=args.layers)
    tokens = torch.randint(0, 256, (16, 129), generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(base)
    model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
    grads = [p.grad for p in model.parameters()]
    runs = {}
    for name, build in contenders().items():
        params = [torch.nn.Parameter(p.detach().clone()) for p in base.parameters()]
        optimizer = build(params)
        for _ in range(3):  # warm-up: SOAP's first step builds its bases; heavyball compiles
            step(optimizer, params, grads)
        runs[name] = (optimizer, params, [])
    for _ in range(args.rounds):
        for optimizer, params, times in runs.values():
            times.append(
                sum(step(optimizer, params, grads) for _ in range(args.steps)) / args.steps
            )
    params = sum(p.numel() for p in base.parameters())
    adamw = min(runs["torch AdamW"][2])
    rows = [
        [name, f"{min(times) * 1e3:.1f} ms", f"{min(times) / adamw:.2f}x",
         format_bytes(state_bytes(optimizer))]
        for name, (optimizer, _, times) in runs.items()
    ]  # fmt: skip
    print(
        f"Tiny Llama, {args.layers} layers, {params / 1e6:.2f}M parameters, torch "
        f"{torch.__version__}, {args.threads} thread(s); mean step over {args.steps} steps, "
        f"best of {args.rounds} rounds in turn\n"
    )
    print(markdown_table(["optimizer", "step", "vs AdamW", "state"], rows))


if __name__ == "__main__":
    main()
