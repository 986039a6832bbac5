"""The conformance suite's multi-process body: DCP round trips on 2 gloo ranks.

One launch runs every row under DDP and under FSDP2 and writes one verdict file per row,
mode and rank (``ok`` or the traceback), so the parametrized tests read their row's
verdict without spawning processes each.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from _conformance import ROWS, Row
from _distributed_workers import flat_parameters, fsdp_model, wide_model
from torch.nn.parallel import DistributedDataParallel

MODES = ("ddp", "fsdp2")
STEPS, SAVE_AT = 5, 3


def verdict_path(folder: str | Path, mode: str, row: str, rank: int) -> Path:
    return Path(folder) / f"{mode}-{row}-{rank}.txt"


def _model(mode: str, seed: int = 0) -> torch.nn.Module:
    if mode == "fsdp2":
        return fsdp_model(seed)
    return DistributedDataParallel(wide_model(seed))


def _train(model, optimizer, steps: int, rank: int, first: int = 0) -> None:
    """Each rank's half of the conformance batches (the inputs widened to 6 features)."""
    for step in range(first, first + steps):
        optimizer.zero_grad()
        inputs = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        targets = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(inputs[rank::2]), targets[rank::2])
        loss.backward()
        optimizer.step()


def round_trip(row: Row, mode: str, rank: int, folder: Path) -> None:
    """Train, save by DCP at SAVE_AT, resume a fresh model and optimiser: bit-identical."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    reference = _model(mode)
    _train(reference, row.build(reference.parameters()), STEPS, rank)

    interrupted = _model(mode)
    optimizer = row.build(interrupted.parameters())
    _train(interrupted, optimizer, SAVE_AT, rank)
    model_state, optimizer_state = get_state_dict(interrupted, optimizer)
    checkpoint = folder / f"{mode}-{row.name}"
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)

    resumed = _model(mode, seed=5)
    resumed_optimizer = row.build(resumed.parameters())
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
    set_state_dict(
        resumed, resumed_optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state
    )
    _train(resumed, resumed_optimizer, STEPS - SAVE_AT, rank, first=SAVE_AT)
    if not torch.equal(flat_parameters(resumed), flat_parameters(reference)):
        raise AssertionError(f"rank {rank}: the resumed weights differ from the uninterrupted run")


def dcp_round_trips(rank: int, folder: str) -> None:
    from torch.distributed.checkpoint.api import CheckpointException  # not an Exception

    for mode in MODES:
        for row in ROWS:
            if mode == "fsdp2" and not row.fsdp2:
                continue
            try:
                round_trip(row, mode, rank, Path(folder))
                verdict = "ok"
            except (Exception, CheckpointException):
                verdict = traceback.format_exc()
            verdict_path(folder, mode, row.name, rank).write_text(verdict)
            dist.barrier()
