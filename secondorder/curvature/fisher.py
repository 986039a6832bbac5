r"""Per-sample gradients, the exact diagonal of the empirical Fisher, and Fisher merging.

The per-sample loss ``ℓ_i`` is ``loss_fn`` on the batch holding sample ``i`` alone,
and the empirical Fisher (EF) of ``L = c Σ_i ℓ_i`` over ``N`` samples is

    F = c Σ_i ∇ℓ_i ∇ℓ_iᵀ,

with ``c = 1/N`` when ``loss_fn`` averages over its batch (``reduction="mean"``,
torch's default) and ``c = 1`` when it sums (``reduction="sum"``). The diagonal
``c Σ_i ∇ℓ_i ⊙ ∇ℓ_i`` is computed exactly here from the per-sample gradients
(``vmap`` of ``grad`` over the samples of each batch).

Two conventions differ from curvlinops' ``EFLinearOperator`` (both are legitimate;
know which one you compare):

- ``ℓ_i`` is ``loss_fn`` on a batch of one, so with a mean-reduced loss it is also a
  mean over the sample's outputs: for ``MSELoss`` or ``BCEWithLogitsLoss`` on ``C``
  outputs, curvlinops' mean-reduced EF is ``C`` times this one (it sums over outputs).
- For sequence outputs (``[B, T, C]``) a sample is a sequence: one gradient per sequence,
  of the loss of all its tokens, where curvlinops takes one per token.

Inputs and targets are pytrees (a tensor, or dicts, lists and tuples of tensors with the
batch dimension first); a ``UserDict`` reaches the model as a plain ``dict``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .._common import LossFn, Params
from .._progress import progress as progress_bar
from ._params import resolve_params
from ._samples import loss_reduction, num_samples, per_sample
from ._stateless import check_forward_keeps_buffers

__all__ = ["empirical_fisher_diagonal", "fisher_merge", "per_sample_gradients"]


def sample_gradients(
    model: nn.Module, loss_fn: LossFn, params: Params, inputs: Any, targets: Any
) -> Params:
    """``∇ℓ_i`` for every sample of the batch: ``{name: [B, *shape]}`` (a pure function)."""

    def batch_loss(p: Params, x: Any, y: Any) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y)

    sample_loss, leaves, in_dims = per_sample(batch_loss, inputs, targets)
    return vmap(grad(sample_loss), in_dims=(None, in_dims))(params, leaves)


def per_sample_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    params: Iterable[torch.Tensor] | None,
    batch: tuple[Any, Any],
) -> list[torch.Tensor]:
    """The gradient of each sample's loss, one ``[B, *p.shape]`` tensor per parameter ``p``.

    ``ℓ_i`` is ``loss_fn`` on the batch of sample ``i`` alone; with a mean-reduced
    ``loss_fn`` the batch loss is the mean of the ``ℓ_i``, so the mean of the returned
    gradients over the batch is the ordinary gradient (with a sum-reduced one, their sum).

    Args:
        model: the model, in eval mode: each sample is run alone, so it must not mix
            samples (no batch statistics) nor draw random numbers (no dropout).
        loss_fn: ``loss_fn(outputs, targets)``.
        params: tensors of ``model.parameters()``; ``None``: all that require grad.
        batch: ``(inputs, targets)``, each a tensor or a pytree of tensors (dict, list,
            tuple, ``UserDict``) with the batch dimension first.

    Raises:
        NondeterminismError: the forward pass writes to the model's buffers (batch norm
            in train mode: call ``model.eval()``).
        ValueError: the tensors of the batch do not share one batch size.
    """
    names, tensors = resolve_params(model, params)
    inputs, targets = batch
    check_forward_keeps_buffers(model, inputs)
    with torch.no_grad():
        grads = sample_gradients(
            model, loss_fn, {n: t.detach() for n, t in zip(names, tensors, strict=True)},
            inputs, targets,
        )  # fmt: skip
    return [grads[n] for n in names]


def empirical_fisher_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    params: Iterable[torch.Tensor] | None,
    data: Iterable[tuple[Any, Any]],
    *,
    progress: bool = True,
) -> list[torch.Tensor]:
    """``diag F = c Σ_i ∇ℓ_i ⊙ ∇ℓ_i`` over all samples of ``data``, exactly; one tensor per param.

    ``c = 1/N`` for a mean-reduced ``loss_fn`` (``N`` counts samples, so a short last
    batch weighs what its samples weigh) and ``c = 1`` for a sum-reduced one (its
    ``reduction`` attribute, see the module's docstring).

    Args:
        model, loss_fn, params: as :func:`per_sample_gradients`.
        data: an iterable of ``(inputs, targets)`` batches, as ``per_sample_gradients``'s.
        progress: show a progress bar over the batches.

    Raises:
        NondeterminismError: the forward pass writes to the model's buffers (batch norm
            in train mode: call ``model.eval()``).
        ValueError: ``data`` holds no samples, or ``loss_fn``'s reduction is neither
            ``"mean"`` nor ``"sum"``.
    """
    reduction = loss_reduction(loss_fn)
    names, tensors = resolve_params(model, params)
    detached = {n: t.detach() for n, t in zip(names, tensors, strict=True)}
    total = [torch.zeros_like(t) for t in tensors]
    count = 0
    for inputs, targets in progress_bar(data, desc="EF diagonal", enabled=progress):
        if count == 0:
            check_forward_keeps_buffers(model, inputs)
        with torch.no_grad():
            grads = sample_gradients(model, loss_fn, detached, inputs, targets)
            for acc, name in zip(total, names, strict=True):
                acc.add_(grads[name].square().sum(0))
        count += num_samples(targets, inputs)
    if count == 0:
        raise ValueError("data holds no samples")
    return total if reduction == "sum" else [t / count for t in total]


def fisher_merge(
    models: Sequence[nn.Module],
    fishers: Sequence[Mapping[str, torch.Tensor] | Sequence[torch.Tensor]],
    *,
    weights: Sequence[float] | None = None,
    fisher_floor: float = 1e-6,
) -> nn.Module:
    r"""Fisher-weighted average of models with the same architecture (Matena & Raffel, 2022).

    Each parameter of the merged model is, elementwise,

        θ = Σ_m λ_m F_m θ_m / Σ_m λ_m F_m,

    with ``F_m`` the diagonal Fisher of model ``m`` (e.g. from
    :func:`empirical_fisher_diagonal`), clamped below at ``fisher_floor`` so that
    coordinates no model has information about fall back to the plain
    ``λ``-weighted average, and ``λ_m`` the ``weights`` (default: all equal).

    ``fishers[m]`` is a dict ``{parameter name: tensor}`` or a list aligned with
    ``models[m].parameters()``; a parameter missing from any model's dict is
    averaged with the ``λ`` alone. Returns a new model (a deep copy of ``models[0]``,
    buffers included) holding the merged parameters; the inputs are not changed.
    """
    if not models:
        raise ValueError("fisher_merge needs at least one model")
    if len(fishers) != len(models):
        raise ValueError(f"got {len(models)} models but {len(fishers)} Fisher diagonals")
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be {len(models)} numbers >= 0, not all 0; got {weights}")
    if not fisher_floor > 0:
        raise ValueError(f"fisher_floor must be > 0, got {fisher_floor}")

    reference = dict(models[0].named_parameters())
    named_params, named_fishers = [], []
    for index, (model, fisher) in enumerate(zip(models, fishers, strict=True)):
        named = dict(model.named_parameters())
        shapes = {n: p.shape for n, p in named.items()}
        if shapes != {n: p.shape for n, p in reference.items()}:
            raise ValueError(f"models[{index}] does not have the parameters of models[0]")
        if not isinstance(fisher, Mapping):
            fisher = list(fisher)
            if len(fisher) != len(named):
                raise ValueError(
                    f"fishers[{index}] has {len(fisher)} tensors but the model has "
                    f"{len(named)} parameters; pass a dict {{name: tensor}} for a subset"
                )
            fisher = dict(zip(named, fisher, strict=True))
        for name, entry in fisher.items():
            if name not in named:
                raise ValueError(f"fishers[{index}] names {name!r}, not a parameter of the model")
            if entry.shape != named[name].shape:
                raise ValueError(
                    f"fishers[{index}][{name!r}] has shape {tuple(entry.shape)}, "
                    f"the parameter {tuple(named[name].shape)}"
                )
        named_params.append(named)
        named_fishers.append(fisher)

    merged = copy.deepcopy(models[0])
    with torch.no_grad():
        for name, target in merged.named_parameters():
            numerator = torch.zeros_like(target, dtype=torch.float64)
            denominator = torch.zeros_like(numerator)
            known = all(name in fisher for fisher in named_fishers)
            for weight, named, fisher in zip(weights, named_params, named_fishers, strict=True):
                f = fisher[name].to(numerator).clamp_min(fisher_floor) if known else 1.0
                numerator += weight * f * named[name].to(numerator)
                denominator += weight * f
            target.copy_(numerator / denominator)
    return merged
