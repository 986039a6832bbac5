"""Bodies of the multi-process tests; spawned children import this module by name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

WORLD = 2
STEPS = 7
SAVE_AT = 4


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: Callable, *args) -> None:
    """Run ``worker(rank, *args)`` on WORLD gloo processes; a failure in any re-raises here."""
    port = free_port()
    torch.multiprocessing.spawn(_init_and_run, args=(port, worker, args), nprocs=WORLD, join=True)


def _init_and_run(rank: int, port: int, worker: Callable, args: tuple) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def train(net, optimizer, steps, *, rank=None, first=0):
    """Steps on the global batch (the whole of it, or this rank's half under DDP)."""
    for step in range(first, first + steps):
        inputs, targets = batch(step)
        if rank is not None:
            inputs, targets = inputs[rank::WORLD], targets[rank::WORLD]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), targets).backward()
        optimizer.step()


def sharded_mfac(rank: int, folder: str) -> None:
    from secondorder.optim import MFAC

    settings = {"lr": 0.05, "num_grads": 3, "damp": 1e-2, "momentum": 0.5, "weight_decay": 1e-3}
    single = model()
    train(single, MFAC(single.parameters(), **settings), STEPS)

    group = dist.group.WORLD
    net = DistributedDataParallel(model())
    optimizer = MFAC(net.parameters(), process_group=group, **settings)
    total = sum(p.numel() for p in net.parameters())
    assert optimizer.window.dim == -(-total // WORLD)  # this rank's shard only
    assert optimizer.window._grads.numel() == 3 * -(-total // WORLD)
    train(net, optimizer, SAVE_AT, rank=rank)
    torch.save(
        {"model": net.module.state_dict(), "optimizer": optimizer.state_dict()},
        Path(folder) / f"rank{rank}.pt",
    )
    train(net, optimizer, STEPS - SAVE_AT, rank=rank, first=SAVE_AT)
    for a, b in zip(single.parameters(), net.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    checkpoint = torch.load(Path(folder) / f"rank{rank}.pt", weights_only=True)
    resumed = DistributedDataParallel(model(seed=7))
    resumed.module.load_state_dict(checkpoint["model"])
    resumed_optimizer = MFAC(resumed.parameters(), process_group=group, **settings)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_optimizer, STEPS - SAVE_AT, rank=rank, first=SAVE_AT)
    for a, b in zip(net.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)

    other = torch.load(Path(folder) / f"rank{1 - rank}.pt", weights_only=True)["optimizer"]
    try:
        MFAC(model().parameters(), process_group=group, **settings).load_state_dict(other)
    except ValueError as error:
        assert "resumes only on the same ranks" in str(error)
    else:
        raise AssertionError("loading another rank's shard must fail")
    try:
        MFAC(model().parameters(), **settings).load_state_dict(checkpoint["optimizer"])
    except ValueError as error:
        assert f"saved by rank {rank} of 2" in str(error)
    else:
        raise AssertionError("loading a shard without the group must fail")

    bad = model()
    bad_optimizer = MFAC(bad.parameters(), process_group=group, **settings)
    loss = torch.nn.functional.cross_entropy(bad(batch(0)[0]), batch(0)[1])
    loss.backward()
    if rank == 1:
        # flat index 29 lies in rank 1's shard; rank 0 sees a clean shard and must raise too
        next(iter(bad.parameters())).grad.view(-1)[-1] = float("nan")
    try:
        bad_optimizer.step()
    except ValueError as error:
        assert "NaN or Inf" in str(error)
    else:
        raise AssertionError(f"rank {rank} did not raise")
