"""How a batch splits into samples, and how the samples' losses make the loss.

A batch is ``(inputs, targets)``, each a pytree: a tensor, or dicts, lists and tuples of
them, every tensor with the batch dimension first. ``torch.func`` splits such trees; a
mapping it does not know (``collections.UserDict``, and so transformers' ``BatchEncoding``)
is read as a plain ``dict``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch.utils import _pytree as pytree

__all__ = ["Reduction", "as_pytree", "batch_weight", "loss_reduction", "num_samples", "per_sample"]

Reduction = Literal["mean", "sum"]


def as_pytree(value: Any) -> Any:
    """``value`` with every mapping in it made a plain ``dict``, recursively (lists, tuples and
    named tuples keep their type), so that ``vmap`` splits a ``UserDict`` as it splits a dict."""
    if isinstance(value, Mapping):
        return {key: as_pytree(item) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(as_pytree(item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(as_pytree(item) for item in value)
    return value


def _has_batch_dim(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.ndim > 0


def num_samples(targets: Any, inputs: Any = None) -> int:
    """The batch size: the first dimension of the first tensor in ``targets``, else in ``inputs``.

    Raises:
        ValueError: neither holds a tensor with a batch dimension.
    """
    for tree in (targets, inputs):
        for leaf in pytree.tree_leaves(as_pytree(tree)):
            if _has_batch_dim(leaf):
                return int(leaf.shape[0])
    raise ValueError("no tensor with a batch dimension in the batch's targets or inputs")


def batch_weight(loss_fn: Callable[..., Any], inputs: Any, targets: Any) -> float:
    """What a batch weighs in a mean over the data: the denominator of ``loss_fn``'s own mean.

    The number of samples, but for ``nn.CrossEntropyLoss`` and ``nn.NLLLoss`` with class
    targets, whose mean divides by the total class weight of the targets it does not
    ignore, ``Σ_i weight[y_i]`` over ``y_i ≠ ignore_index`` (their count without
    ``weight``): then batches with ignored targets or weighted classes make the mean
    that the whole data in one batch would (one host synchronisation per batch).
    """
    if (
        isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss))
        and isinstance(targets, torch.Tensor)
        and not targets.is_floating_point()
    ):
        kept = targets != loss_fn.ignore_index
        if loss_fn.weight is None:
            return float(kept.sum())
        return float((loss_fn.weight[targets.masked_fill(~kept, 0)] * kept).sum())
    return float(num_samples(targets, inputs))


def per_sample(
    loss: Callable[[Any, Any, Any], torch.Tensor], inputs: Any, targets: Any
) -> tuple[Callable[[Any, list[Any]], torch.Tensor], list[Any], list[int | None]]:
    """``loss(state, inputs, targets)`` of a batch, made a function of one sample to ``vmap``.

    Returns ``(sample_loss, leaves, in_dims)``, the batch's leaves (tensors and other values,
    inputs' then targets') and how ``vmap`` splits them: ``vmap(transform(sample_loss),
    in_dims=(None, in_dims))(state, leaves)`` runs ``transform(sample_loss)`` on each
    sample, and ``sample_loss`` calls ``loss`` on a batch of that one sample. Every tensor
    with a batch dimension is split; other leaves (numbers, strings, 0-d tensors) are
    shared by all samples.

    Raises:
        ValueError: the tensors do not share one batch size.
    """
    leaves, spec = pytree.tree_flatten(as_pytree((inputs, targets)))
    in_dims = [0 if _has_batch_dim(leaf) else None for leaf in leaves]
    split = [leaf for leaf, dim in zip(leaves, in_dims, strict=True) if dim == 0]
    if len({leaf.shape[0] for leaf in split}) > 1:
        raise ValueError(
            "every tensor in a batch's inputs and targets must have the batch dimension first, "
            f"with one size; got shapes {[tuple(leaf.shape) for leaf in split]}"
        )

    def sample_loss(state: Any, sample_leaves: list[Any]) -> torch.Tensor:
        one = [x.unsqueeze(0) if d == 0 else x for x, d in zip(sample_leaves, in_dims, strict=True)]
        sample_inputs, sample_targets = pytree.tree_unflatten(one, spec)
        return loss(state, sample_inputs, sample_targets)

    return sample_loss, leaves, in_dims


def loss_reduction(loss_fn: Callable[..., Any]) -> Reduction:
    """How ``loss_fn`` combines its samples' losses: ``"mean"`` or ``"sum"``.

    Read from its ``reduction`` attribute (torch's loss modules) or the ``reduction``
    keyword of a ``functools.partial``; any other function is taken to average, as
    torch's functional losses do by default. ``"batchmean"`` (``nn.KLDivLoss``) is a
    mean over samples.

    Raises:
        ValueError: the reduction is another one (``"none"``: the loss is not a scalar).
    """
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is None and isinstance(loss_fn, functools.partial):
        reduction = loss_fn.keywords.get("reduction")
    if reduction is None or reduction in ("mean", "batchmean"):
        return "mean"
    if reduction == "sum":
        return "sum"
    raise ValueError(
        f"loss_fn has reduction={reduction!r}; a curvature matrix needs a scalar loss, the "
        "mean (reduction='mean') or the sum (reduction='sum') of the samples' losses"
    )
