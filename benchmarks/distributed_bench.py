"""Communication and step time of MFAC with its window sharded over data-parallel ranks.

    python benchmarks/distributed_bench.py                  # 1 and 2 ranks, CPU, gloo
    python benchmarks/distributed_bench.py --hidden 256 --num-grads 32 --steps 5   # a smoke run

Each run spawns the ranks itself. Bytes are counted by wrapping the
torch.distributed collectives the optimiser calls (DDP's own gradient
all-reduce, which every data-parallel optimiser pays, is listed apart).
The naive alternative keeps the window sharded the same way but all-gathers
it to compute F⁻¹g: num_grads · d numbers per step. The step time is the best
of ``--steps`` steps (``timing.timed``, one call each), every step started
together on all ranks by a barrier and lasting until its slowest rank is done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from timing import timed
from torch.nn.parallel import DistributedDataParallel

from secondorder._workloads.report import format_bytes, markdown_table
from secondorder.optim import MFAC

COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "broadcast")


class CountingCollectives:
    """Replaces the collectives with wrappers that add up the bytes of every tensor sent."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0
        self._originals = {}

    def __enter__(self):
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original

            def counted(*args, _original=original, _name=name, **kwargs):
                tensor = args[1] if _name.startswith("all_gather") else args[0]
                self.bytes += tensor.numel() * tensor.element_size()
                self.calls += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def mlp(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )  # fmt: skip


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD if world > 1 else None
    model = mlp(args.hidden)
    net = DistributedDataParallel(model) if world > 1 else model
    optimizer = MFAC(
        net.parameters(),
        lr=1e-3,
        num_grads=args.num_grads,
        damp=1e-2,
        graft=None,
        process_group=group,
    )
    d = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(rank)

    def step() -> None:
        inputs, targets = (
            torch.randn(32, 64, generator=gen),
            torch.randint(0, 10, (32,), generator=gen),
        )
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), targets).backward()
        optimizer.step()

    for _ in range(args.num_grads):  # fill the window
        step()
    # every rank runs exactly --steps steps (no time budget: ranks must not disagree on when
    # to stop), each started together by the barrier and timed outside it
    times = torch.zeros(args.steps, dtype=torch.float64)
    with CountingCollectives() as counter:
        for i in range(args.steps):
            dist.barrier()
            times[i] = timed(step, max_repeats=1, warmup=False)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step lasts until its slowest rank is done
    # the window's rows, as the naive column counts them (window.nbytes would add its spare
    # row and the n × n system)
    window = optimizer.window
    window_bytes = window.num_grads * window.dim * window.storage_dtype.itemsize
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "world": world,
                    "d": d,
                    "step_ms": 1e3 * float(times.min()),
                    "optimizer_bytes_per_step": counter.bytes / args.steps,
                    "collectives_per_step": counter.calls / args.steps,
                    "window_bytes_per_rank": window_bytes,
                }
            )
        )
    dist.destroy_process_group()
    # The process group outlives destroy_process_group (DDP keeps it): if the interpreter
    # finalised now, a gloo thread freeing the last collective's tensors could abort this
    # process (see _init_and_run in tests/_distributed_workers.py). The result is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(world: int, args: argparse.Namespace) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "result")
        torch.multiprocessing.spawn(worker, args=(world, port, args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hidden", type=int, default=1024, help="MLP width (d = hidden² + 75·hidden + 10)"
    )
    parser.add_argument("--num-grads", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    results = [run(world, args) for world in (1, 2)]
    n, d = args.num_grads, results[0]["d"]
    print(
        f"# MFAC, d = {d:,} parameters, num_grads = {n}, float32, CPU gloo, {os.cpu_count()} cores\n"
    )
    header = ["ranks", "step (ms)", "window per rank", "bytes sent per rank per step (optimiser)",
              "collectives per step", "naive: all-gather the window"]  # fmt: skip
    rows = [
        [r["world"], f"{r['step_ms']:.1f}", format_bytes(r["window_bytes_per_rank"]),
         format_bytes(r["optimizer_bytes_per_step"]), f"{r['collectives_per_step']:.0f}",
         format_bytes(n * d * 4 if r["world"] > 1 else 0)]
        for r in results
    ]  # fmt: skip
    print(markdown_table(header, rows))
    print(f"\nDDP's own gradient all-reduce (not counted above): {format_bytes(d * 4)} per step.")


if __name__ == "__main__":
    main()
