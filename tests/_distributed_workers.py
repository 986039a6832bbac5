"""Bodies of the multi-process tests; spawned children import this module by name."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

WORLD = 2
STEPS = 7
SAVE_AT = 4


def launch(worker: Callable, *args, timeout_s: float | None = None) -> None:
    """Run ``worker(rank, *args)`` on WORLD gloo processes; a failure in any re-raises here
    with its traceback. ``timeout_s`` bounds each collective (torch's default is 30 minutes).

    The ranks meet through a file store in a fresh folder, not a TCP store on a port found
    free beforehand: another process could take that port before rank 0 binds it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gloo-") as folder:
        store = f"file://{Path(folder) / 'store'}"
        torch.multiprocessing.spawn(
            _init_and_run, args=(store, worker, args, timeout_s), nprocs=WORLD, join=True
        )


def _init_and_run(
    rank: int, store: str, worker: Callable, args: tuple, timeout_s: float | None = None
) -> None:
    """One rank: the worker, then a teardown that never lets the interpreter shut down
    around gloo's threads.

    A worker that passes ends its process with ``os._exit(0)`` instead of returning. After
    these workers the gloo process group outlives ``destroy_process_group`` (building a DDP
    model is enough: torch keeps a reference, and ``gc.collect()`` does not free it), so
    its threads still run when the interpreter finalises. Such a thread drops its
    reference to the last work it ran after ``wait()`` has returned in Python; freeing that
    work frees the tensors of the collectives it still points to (a barrier points to those
    in flight when it was issued), and a tensor with a Python object takes the GIL. During
    finalisation taking the GIL ends the thread (``pthread_exit``), whose unwinding through
    a ``noexcept`` destructor calls ``std::terminate``: "terminate called without an active
    exception", SIGABRT, and a failed test after a passing worker. ``os._exit`` skips the
    finalisation (and with it that race); nothing here needs ``atexit`` handlers.

    A worker that raises leaves through torch's spawn wrapper, which writes the traceback
    to a file that the parent reads before it looks at the exit status: the failure is
    reported as the worker's own error even if this process then aborts in finalisation.
    """
    from datetime import timedelta

    torch.set_num_threads(1)
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD, timeout=timeout)
    try:
        worker(rank, *args)
        # Both ranks finish before either closes its connections: a rank that tears down
        # while the other's gloo threads still talk to it can abort the other process.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # passed: the only way out of this function that is not an exception


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
    train(single, MFAC(single.parameters(), prior=None, **settings), STEPS)

    group = dist.group.WORLD
    net = DistributedDataParallel(model())
    optimizer = MFAC(net.parameters(), prior=None, process_group=group, **settings)
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
    resumed_optimizer = MFAC(resumed.parameters(), prior=None, process_group=group, **settings)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_optimizer, STEPS - SAVE_AT, rank=rank, first=SAVE_AT)
    for a, b in zip(net.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)

    other = torch.load(Path(folder) / f"rank{1 - rank}.pt", weights_only=True)["optimizer"]
    try:
        MFAC(model().parameters(), prior=None, process_group=group, **settings).load_state_dict(
            other
        )
    except ValueError as error:
        assert "resumes only on the same rank of the same number of ranks" in str(error)
    else:
        raise AssertionError("loading another rank's shard must fail")
    try:
        MFAC(model().parameters(), prior=None, **settings).load_state_dict(checkpoint["optimizer"])
    except ValueError as error:
        assert f"it has ['mfac_rank{rank}_of_2']" in str(error)
    else:
        raise AssertionError("loading a shard without the group must fail")

    bad = model()
    bad_optimizer = MFAC(bad.parameters(), prior=None, process_group=group, **settings)
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


def sharded_sparse_mfac(rank: int) -> None:
    """MFAC(density=0.3) under 2-rank DDP against float64 EFCP done by one process on the whole
    batch, with the coordinates cut into the ranks' two shards, each keeping its own top k."""
    from _oracles import even_shards, explicit_solve, top_k_compress

    from secondorder.curvature.sparse_window import kept_entries
    from secondorder.optim import MFAC

    lr, damp, num_grads, density = 0.05, 1e-2, 3, 0.3
    net = DistributedDataParallel(model().double())
    optimizer = MFAC(
        net.parameters(),
        lr=lr,
        num_grads=num_grads,
        damp=damp,
        density=density,
        process_group=dist.group.WORLD,
        graft=None,  # the paper's M-FAC, as the oracle below
    )
    reference = model().double()
    params = list(reference.parameters())
    total = sum(p.numel() for p in params)
    size = -(-total // WORLD)  # each rank's shard, the last one padded with zeros
    k = kept_entries(size, density)
    error, history = torch.zeros(WORLD * size, dtype=torch.float64), []
    for step in range(STEPS):
        inputs, targets = batch(step)
        optimizer.zero_grad()
        mine = net(inputs[rank::WORLD].double())
        torch.nn.functional.cross_entropy(mine, targets[rank::WORLD]).backward()
        optimizer.step()

        reference.zero_grad()
        torch.nn.functional.cross_entropy(reference(inputs.double()), targets).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        accumulator = error + torch.cat([g, g.new_zeros(WORLD * size - total)])
        compressed = top_k_compress(accumulator, k, groups=even_shards(WORLD * size, WORLD))
        error = accumulator - compressed
        history = [*history, compressed][-num_grads:]
        update = explicit_solve(torch.stack(history), damp, compressed)[:total]
        with torch.no_grad():
            start = 0
            for p in params:
                p -= lr * update[start : start + p.numel()].view_as(p)
                start += p.numel()
        for a, b in zip(params, net.module.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    shard = error[rank * size : (rank + 1) * size]
    torch.testing.assert_close(optimizer.window.error, shard, rtol=0, atol=1e-12)


def sharded_grafted_mfac(rank: int) -> None:
    """Grafted (Adam) MFAC, and MFAC with Adam's prior, with the window sharded over 2 DDP
    ranks == one process: the per-tensor norms of the sharded direction are all-reduced, the
    prior's solve reduces over the ranks."""
    from secondorder.optim import MFAC

    grafted = {"lr": 0.05, "num_grads": 3, "damp": 1e-2, "momentum": 0.5, "graft": "adam"}
    prior = {"lr": 0.05, "num_grads": 3, "damp": 1e-2, "prior": "adam"}
    for settings in (grafted, prior):
        single = model()
        train(single, MFAC(single.parameters(), **settings), STEPS)
        net = DistributedDataParallel(model())
        optimizer = MFAC(net.parameters(), process_group=dist.group.WORLD, **settings)
        train(net, optimizer, STEPS, rank=rank)
        for a, b in zip(single.parameters(), net.module.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def mfac_through_dcp(rank: int, folder: str) -> None:
    """MFAC (dense and sparse, grafted, with momentum) checkpointed with
    torch.distributed.checkpoint under FSDP2 and under DDP sharding resumes bit-identically:
    each rank's own record survives the save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from secondorder.optim import MFAC

    settings = {"lr": 0.05, "num_grads": 3, "damp": 1e-2, "momentum": 0.5, "graft": "adam"}
    builds = {
        "fsdp2": lambda seed: (fsdp_model(seed), {}),
        "ddp": lambda seed: (
            DistributedDataParallel(model(seed)),
            {"process_group": dist.group.WORLD},
        ),
    }
    for name, build in builds.items():
        for density in (None, 0.5):
            net, extra = build(0)
            optimizer = MFAC(net.parameters(), prior=None, density=density, **settings, **extra)
            train(net, optimizer, SAVE_AT, rank=rank)
            where = str(Path(folder) / f"{name}-{density}")
            model_state, optim_state = get_state_dict(net, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=where)
            train(net, optimizer, STEPS - SAVE_AT, rank=rank, first=SAVE_AT)

            resumed, extra = build(5)  # other weights: the checkpoint brings the right ones
            resumed_optimizer = MFAC(
                resumed.parameters(), prior=None, density=density, **settings, **extra
            )
            model_state, optim_state = get_state_dict(resumed, resumed_optimizer)
            template = {"model": model_state, "optim": optim_state}
            dcp.load(template, checkpoint_id=where)
            set_state_dict(
                resumed,
                resumed_optimizer,
                model_state_dict=template["model"],
                optim_state_dict=template["optim"],
            )
            train(resumed, resumed_optimizer, STEPS - SAVE_AT, rank=rank, first=SAVE_AT)
            same = torch.equal(flat_parameters(resumed), flat_parameters(net))
            assert same, f"{name}, density={density}: the resumed run differs"


def wide_model(seed: int = 0) -> torch.nn.Module:
    """One weight projected on the right (8 × 6, rows ≥ cols) and one on the left (3 × 8);
    under FSDP2 the 3 rows split unevenly, 2 + 1."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def low_rank_groups(net: torch.nn.Module) -> list[dict]:
    matrices = [p for p in net.parameters() if p.dim() == 2]
    others = [p for p in net.parameters() if p.dim() < 2]
    return [{"params": others}, {"params": matrices, "rank": 2, "update_proj_gap": 2}]


def low_rank_optimizers(process_group=None) -> dict[str, Callable]:
    from secondorder.optim import SST, DCTAdamW, GaLoreAdamW, NaturalGaLore

    kwargs = {} if process_group is None else {"process_group": process_group}
    return {
        "GaLoreAdamW": lambda net: GaLoreAdamW(low_rank_groups(net), lr=0.02, **kwargs),
        "NaturalGaLore": lambda net: NaturalGaLore(
            low_rank_groups(net), lr=0.02, history=3, damp=1e-3, **kwargs
        ),
        "DCTAdamW": lambda net: DCTAdamW(low_rank_groups(net), lr=0.02, **kwargs),
        "SST": lambda net: SST(low_rank_groups(net), lr=0.02, update_proj_gap=2),
    }


def flat_parameters(net: torch.nn.Module) -> torch.Tensor:
    from secondorder._distributed import is_sharded

    return torch.cat(
        [(p.full_tensor() if is_sharded(p) else p).detach().reshape(-1) for p in net.parameters()]
    )


def same_on_every_rank(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(gathered, t)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def low_rank_ddp(rank: int) -> None:
    """Each low-rank optimiser under DDP equals one process and stays identical across ranks
    (the SVD bases are also broadcast from rank 0), through projector refreshes."""
    for name, make in low_rank_optimizers(dist.group.WORLD).items():
        single = wide_model()
        train(single, low_rank_optimizers()[name](single), STEPS)
        net = DistributedDataParallel(wide_model())
        train(net, make(net.module), STEPS, rank=rank)
        torch.testing.assert_close(
            flat_parameters(net.module), flat_parameters(single), rtol=1e-5, atol=1e-6
        )
        assert same_on_every_rank(flat_parameters(net.module)), name

    # the broadcast itself: different gradients on each rank (no DDP), one basis everywhere
    for name in ("GaLoreAdamW", "DCTAdamW"):
        net = wide_model()
        optimizer = low_rank_optimizers(dist.group.WORLD)[name](net)
        inputs, targets = batch(rank)
        torch.nn.functional.cross_entropy(net(inputs), targets).backward()
        optimizer.step()
        for p in net.parameters():
            if p.dim() == 2:
                assert same_on_every_rank(optimizer.state[p]["basis"]), name


def fsdp_model(seed: int = 0) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    net = wide_model(seed)
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(net)


def fsdp_sparse_mfac(rank: int) -> None:
    """MFAC(density=0.3) under FSDP2, each rank's window spanning its rows of every weight and
    keeping its own top k, against float64 EFCP in one process with the same coordinate groups."""
    from _oracles import explicit_solve, top_k_compress
    from torch.distributed.fsdp import fully_shard

    from secondorder.curvature.sparse_window import kept_entries
    from secondorder.optim import MFAC

    lr, damp, num_grads, density = 0.05, 1e-2, 3, 0.3
    net = wide_model().double()
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(net)
    optimizer = MFAC(
        net.parameters(), lr=lr, num_grads=num_grads, damp=damp, density=density, graft=None
    )
    reference = wide_model().double()
    params = list(reference.parameters())
    groups = []  # the flat coordinates of each rank's rows, in the order its window holds them
    for r in range(WORLD):
        coordinates, offset = [], 0
        for p in params:
            rows, cols = p.shape[0], p[0].numel()
            chunk = -(-rows // WORLD)  # torch.chunk's split, as FSDP2 shards
            start, stop = min(rows, r * chunk), min(rows, (r + 1) * chunk)
            coordinates.append(torch.arange(offset + start * cols, offset + stop * cols))
            offset += p.numel()
        groups.append(torch.cat(coordinates))
    ks = [kept_entries(len(group), density) for group in groups]
    error, history = torch.zeros(offset, dtype=torch.float64), []
    for step in range(STEPS):
        inputs, targets = batch(step)
        optimizer.zero_grad()
        mine = net(inputs[rank::WORLD].double())
        torch.nn.functional.cross_entropy(mine, targets[rank::WORLD]).backward()
        optimizer.step()

        reference.zero_grad()
        torch.nn.functional.cross_entropy(reference(inputs.double()), targets).backward()
        accumulator = error + torch.cat([p.grad.reshape(-1) for p in params])
        compressed = top_k_compress(accumulator, ks, groups=groups)
        error = accumulator - compressed
        history = [*history, compressed][-num_grads:]
        update = explicit_solve(torch.stack(history), damp, compressed)
        with torch.no_grad():
            start = 0
            for p in params:
                p -= lr * update[start : start + p.numel()].view_as(p)
                start += p.numel()
        expected = torch.cat([p.detach().reshape(-1) for p in params])
        torch.testing.assert_close(flat_parameters(net), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(optimizer.window.error, error[groups[rank]], rtol=0, atol=1e-12)


def low_rank_fsdp(rank: int, folder: str) -> None:
    """Under FSDP2 every rank steps its rows: equal to one process on the global batch, for
    a right and a left projection with uneven shards; per-rank checkpoints resume exactly;
    SST refuses sharded weights; MFAC's window spans each rank's rows."""
    from secondorder.errors import NonFiniteError
    from secondorder.optim import MFAC

    makers = {name: make for name, make in low_rank_optimizers().items() if name != "SST"}
    makers["MFAC"] = lambda net: MFAC(
        net.parameters(), prior=None, lr=0.05, num_grads=3, damp=1e-2, momentum=0.5
    )
    for name, make in makers.items():
        single = wide_model()
        train(single, make(single), STEPS)
        net = fsdp_model()
        optimizer = make(net)
        train(net, optimizer, SAVE_AT, rank=rank)
        torch.save(
            {"model": net.state_dict(), "optimizer": optimizer.state_dict()},
            Path(folder) / f"{name}-{rank}.pt",
        )
        train(net, optimizer, STEPS - SAVE_AT, rank=rank, first=SAVE_AT)
        torch.testing.assert_close(
            flat_parameters(net), flat_parameters(single), rtol=1e-5, atol=1e-6
        )

        checkpoint = torch.load(Path(folder) / f"{name}-{rank}.pt", weights_only=False)
        resumed = fsdp_model(seed=5)
        resumed.load_state_dict(checkpoint["model"])
        resumed_optimizer = make(resumed)
        resumed_optimizer.load_state_dict(checkpoint["optimizer"])
        train(resumed, resumed_optimizer, STEPS - SAVE_AT, rank=rank, first=SAVE_AT)
        assert torch.equal(flat_parameters(resumed), flat_parameters(net)), name

    net = fsdp_model()
    sst = low_rank_optimizers()["SST"](net)
    inputs, targets = batch(0)
    torch.nn.functional.cross_entropy(net(inputs[rank::WORLD]), targets[rank::WORLD]).backward()
    try:
        sst.step()
    except NotImplementedError as error:
        assert "FSDP2" in str(error)
    else:
        raise AssertionError("SST must refuse FSDP2-sharded weights")

    for name in ("GaLoreAdamW", "MFAC"):
        net = fsdp_model()
        optimizer = makers[name](net)
        torch.nn.functional.cross_entropy(net(inputs[rank::WORLD]), targets[rank::WORLD]).backward()
        if rank == 1:  # one rank's rows only; the other rank must raise too, not wait
            next(net.parameters()).grad.to_local().view(-1)[0] = float("nan")
        try:
            optimizer.step()
        except NonFiniteError:
            pass
        else:
            raise AssertionError(f"{name} on rank {rank} did not raise")
