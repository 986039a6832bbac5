r"""DCT-AdamW (Modoranu et al., 2025): low-rank Adam without an SVD, on DCT-II columns."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

from .projected_adam import ProjectedAdam
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
        update_proj_gap: steps between refreshes of the columns (1: every step).
        norm: 1 or 2, the norm ranking the columns of ``X Q``.
        method: how ``X Q`` is formed on a refresh: ``"matmul"``, ``"fft"`` or ``"auto"``.
        **options: the other keyword arguments of
            :class:`~secondorder.optim.projected_adam.ProjectedAdam` (``rank``, ``scale``,
            ``proj_type``, ``on_refresh``, ``layerwise``, ``accumulation_steps``,
            ``process_group``; see its module docstring for DDP and FSDP2).
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
        update_proj_gap: int = 1,
        norm: int = 1,
        method: Literal["auto", "matmul", "fft"] = "auto",
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            DCTProjector(norm=norm, method=method),
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            update_proj_gap=update_proj_gap,
            **options,
        )
