"""The few collectives the library uses, on ``torch.distributed``.

Every function takes a ``process_group`` (``None``: no distribution, the
calls are no-ops), so single-process code paths stay free of branches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

_DISTRIBUTED = dist.is_available()


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


def all_gather_shards(piece: torch.Tensor, shard: Shard, process_group) -> torch.Tensor:
    """The flat vector of ``shard.total`` coordinates from every rank's padded piece."""
    if process_group is None:
        return piece[: shard.total]
    full = piece.new_empty(shard.size * shard.world)
    # all_gather_single replaces all_gather_into_tensor from torch 2.13 on
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(full, piece.contiguous(), group=process_group)
    return full[: shard.total]


@dataclass(frozen=True)
class RowShard:
    """The rows ``[start, stop)`` of a ``rows``-row parameter that this rank holds, when
    FSDP2 (``fully_shard``) shards its dim 0 over ``group``."""

    group: dist.ProcessGroup
    start: int
    stop: int
    rows: int


@functools.cache
def _dtensor_types():
    """``(DTensor, Shard)``, imported once (every optimiser step asks, for every parameter)."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor, Shard
    return DTensor, Shard


def is_sharded(t: torch.Tensor) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor (an FSDP2 parameter or gradient)."""
    return _DISTRIBUTED and isinstance(t, _dtensor_types()[0])


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP2 parameter or gradient (a view: writes reach the parameter);
    ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def row_shard(p: torch.Tensor) -> RowShard | None:
    """Where this rank's rows of ``p`` sit, for FSDP2 parameters; ``None`` for plain tensors."""
    if not is_sharded(p):
        return None
    _, Shard = _dtensor_types()
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(
            "only parameters sharded on dim 0 over a 1-D device mesh (FSDP2's fully_shard) are "
            f"supported, got placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh"
        )
    group = p.device_mesh.get_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    chunk = -(-p.shape[0] // world)  # torch.chunk's split, as FSDP2 shards
    start = min(p.shape[0], rank * chunk)
    stop = min(p.shape[0], start + chunk)
    if p.to_local().shape[0] != stop - start:
        raise ValueError(
            f"unexpected shard of {tuple(p.to_local().shape)} rows for {tuple(p.shape)}"
        )
    return RowShard(group, start, stop, p.shape[0])


def broadcast_from_first(t: torch.Tensor, process_group: dist.ProcessGroup | None) -> torch.Tensor:
    """``t`` as the group's first rank holds it, on every rank (in place)."""
    if process_group is not None:
        dist.broadcast(t, src=dist.get_global_rank(process_group, 0), group=process_group)
    return t
