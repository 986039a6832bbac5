"""The few collectives the library uses, on ``torch.distributed``.

Every function takes a ``process_group`` (``None``: no distribution, the
calls are no-ops), so single-process code paths stay free of branches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This rank's contiguous part ``[start, stop)`` of a flat vector of ``total``
    coordinates cut into ``world`` pieces of ``size`` (the last one padded)."""

    rank: int
    world: int
    total: int

    @property
    def size(self) -> int:
        return -(-self.total // self.world)

    @property
    def start(self) -> int:
        return min(self.total, self.rank * self.size)

    @property
    def stop(self) -> int:
        return min(self.total, self.start + self.size)

    def take(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's piece of ``flat``, zero-padded to ``size``."""
        piece = flat[self.start : self.stop]
        if piece.numel() == self.size:
            return piece
        return torch.cat([piece, piece.new_zeros(self.size - piece.numel())])


def rank_and_world(process_group: dist.ProcessGroup | None) -> tuple[int, int]:
    if process_group is None:
        return 0, 1
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("a process_group was given but torch.distributed is not initialised")
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def all_reduce_sum(t: torch.Tensor, process_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place; every rank receives the same bits."""
    if process_group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
    return t


def any_rank(flag: bool, process_group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether ``flag`` holds on at least one rank (so that all ranks take the same branch)."""
    if process_group is None:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=process_group)
    return bool(value.item())


def all_gather_shards(piece: torch.Tensor, shard: Shard, process_group) -> torch.Tensor:
    """The flat vector of ``shard.total`` coordinates from every rank's padded piece."""
    if process_group is None:
        return piece[: shard.total]
    full = piece.new_empty(shard.size * shard.world)
    # all_gather_single replaces all_gather_into_tensor from torch 2.13 on
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(full, piece.contiguous(), group=process_group)
    return full[: shard.total]
