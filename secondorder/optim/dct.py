r"""DCT-AdamW (Modoranu et al., 2025): low-rank Adam without an SVD, on DCT-II columns."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

from .projected_adam import OnRefresh, ProjectedAdam, ProjType
from .projectors import DCTProjector

__all__ = ["DCTAdamW"]


class DCTAdamW(ProjectedAdam):
    r"""AdamW whose moments live on ``r`` columns of the orthonormal DCT-II basis.

    On a refresh, ``S = X Q`` is formed against the one DCT-II basis ``Q`` of the
    compressed size (shared by all weights of that size), the ``r`` columns of largest
    ``norm`` are chosen and only their indices are stored; see
    :class:`~secondorder.optim.projectors.DCTProjector`. Everything else is the projected
    AdamW step of :mod:`secondorder.optim.projected_adam`.

    The defaults are the reference's: the basis is refreshed every step
    (``update_proj_gap=1``), columns ranked by their l1 norm, ``eps=1e-8``, and its AdamW
    arithmetic (which is ``torch.optim.AdamW``'s). Unlike the reference, the moments are
    rotated into the new columns by default (``on_refresh="rotate"``, measured in
    docs/benchmarks.md): for DCT columns ``R = Q[:, old]ᵀ Q[:, new]`` is a partial
    permutation, so a column that stays selected keeps its moments exactly (wherever it
    moves in the ranking) and a newly chosen one starts from zero. With ``"keep"`` a
    moment slot holds the statistics of whatever column was at that rank before.

    Args:
        params, lr, betas, eps, weight_decay, correct_bias: as for AdamW.
        rank, update_proj_gap, scale, proj_type, on_refresh: defaults for the groups
            (a group with ``rank`` is low-rank).
        norm: 1 or 2, the norm ranking the columns of ``X Q``.
        method: how ``X Q`` is formed on a refresh: ``"matmul"``, ``"fft"`` or ``"auto"``.
        layerwise, accumulation_steps, process_group: see
            :class:`~secondorder.optim.projected_adam.ProjectedAdam` (and its module docstring
            for DDP and FSDP2).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        rank: int | None = None,
        update_proj_gap: int = 1,
        scale: float = 1.0,
        proj_type: ProjType = "std",
        on_refresh: OnRefresh = "rotate",
        norm: int = 1,
        method: Literal["auto", "matmul", "fft"] = "auto",
        layerwise: bool = False,
        accumulation_steps: int = 1,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            params,
            DCTProjector(norm=norm, method=method),
            lr,
            betas,
            eps,
            weight_decay,
            correct_bias,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            on_refresh=on_refresh,
            layerwise=layerwise,
            accumulation_steps=accumulation_steps,
            process_group=process_group,
        )
