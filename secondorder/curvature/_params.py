"""Which parameters of a model a curvature matrix is taken with respect to, and their formats."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn


def resolve_params(
    model: nn.Module, params: Iterable[torch.Tensor] | None
) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
    """Names and tensors of ``params`` in ``model``; ``None`` means every parameter that requires grad.

    Raises ``ValueError`` for a tensor that is not a parameter of ``model``, a parameter
    given twice, or an empty list, and ``TypeError`` for mixed dtypes or devices.
    """
    named = dict(model.named_parameters())
    chosen = [p for p in named.values() if p.requires_grad] if params is None else list(params)
    if not chosen:
        raise ValueError("params is empty: there is nothing to take the curvature with respect to")
    name_of = {id(p): name for name, p in named.items()}
    names = []
    for index, p in enumerate(chosen):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{index}] is a {type(p).__name__}, not a tensor")
        if id(p) not in name_of:
            raise ValueError(
                f"params[{index}] (shape {tuple(p.shape)}) is not a parameter of the model; "
                "pass tensors from model.parameters() themselves, not copies"
            )
        names.append(name_of[id(p)])
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"params lists {repeated} more than once")
    dtypes = {p.dtype for p in chosen}
    devices = {p.device for p in chosen}
    if len(dtypes) > 1 or len(devices) > 1:
        raise TypeError(
            f"params must share one dtype and device, got dtypes {sorted(map(str, dtypes))} "
            f"and devices {sorted(map(str, devices))}"
        )
    if not chosen[0].dtype.is_floating_point:
        raise TypeError(f"params must be floating point, got {chosen[0].dtype}")
    return tuple(names), tuple(chosen)


def flatten_columns(columns: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[K, *shape]`` blocks (one per parameter) to one ``[D, K]`` matrix."""
    k = columns[0].shape[0]
    return torch.cat([c.reshape(k, -1) for c in columns], dim=1).T


def split_columns(matrix: torch.Tensor, shapes: Sequence[torch.Size]) -> tuple[torch.Tensor, ...]:
    """A ``[D, K]`` matrix to ``[K, *shape]`` blocks, one per parameter (the inverse of
    :func:`flatten_columns`)."""
    k = matrix.shape[1]
    sizes = [s.numel() for s in shapes]
    return tuple(
        block.T.reshape(k, *shape)
        for block, shape in zip(matrix.split(sizes, dim=0), shapes, strict=True)
    )
