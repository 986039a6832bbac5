"""Types and policies every package of the library shares, defined once."""

from __future__ import annotations

from collections import UserDict
from collections.abc import Callable
from typing import Any, Protocol

import torch

__all__ = ["LinearOperator", "LossFn", "Params", "square_dim", "statistics_dtype", "to_device"]


class LinearOperator(Protocol):
    """A square matrix known by its products: what the estimators need (``hutchinson_trace``,
    ``top_eigenvalues``, ``spectral_density``...). A dense tensor qualifies, and so do the
    curvature operators and the M-FAC inverses (and their ``fisher()``).

    ``op @ v`` takes a vector of length ``shape[1]`` or a ``[shape[1], K]`` matrix of
    columns and returns the same format."""

    @property
    def shape(self) -> tuple[int, ...] | torch.Size: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def __matmul__(self, matrix: torch.Tensor) -> torch.Tensor: ...


def square_dim(op: LinearOperator) -> int:
    """``D`` of a ``D × D`` operator; ``ValueError`` for any other shape."""
    if len(op.shape) != 2 or op.shape[0] != op.shape[1]:
        raise ValueError(f"op must be square, got shape {tuple(op.shape)}")
    return int(op.shape[0])


#: ``loss_fn(outputs, targets)``: a scalar mean loss over the batch
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: parameters by name, as ``torch.func.functional_call`` takes them
Params = dict[str, torch.Tensor]


def statistics_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype of the statistics kept for tensors of ``dtypes`` (moments, windows, small
    systems): float64 when every one is float64, float32 otherwise (bf16 and fp16 included,
    whose statistics would lose too much)."""
    return torch.float64 if dtypes and all(d == torch.float64 for d in dtypes) else torch.float32


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it moved to ``device``: nested in dicts (returned as
    dicts), ``UserDict``s (a ``transformers`` ``BatchEncoding``, say; of the same type),
    lists, tuples and named tuples."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device)
    if isinstance(value, (dict, UserDict)):
        moved = {key: to_device(item, device) for key, item in value.items()}
        return type(value)(moved) if isinstance(value, UserDict) else moved
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(to_device(item, device) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value
