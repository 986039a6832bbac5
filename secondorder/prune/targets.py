"""Which weights a pruner acts on, and their masks as ``torch.nn.utils.prune`` keeps them.

A pruned weight ``name`` of a module is stored the way ``torch.nn.utils.prune``
stores it: the parameter ``name_orig``, the buffer ``name_mask`` and a forward
pre-hook that sets ``name = name_orig * name_mask``. Masks made here and by
``torch.nn.utils.prune`` are therefore interchangeable, ``prune.remove(module, name)``
makes one permanent, and ``model.state_dict()`` holds the masks.

To keep a pruned model, make its masks permanent first (:func:`remove_masks`):
a Hugging Face model saved with ``save_pretrained`` while it still holds
``weight_orig`` and ``weight_mask`` loads back with its weights missing and
re-initialised. :func:`check_masks_removed` refuses such a model before anything
is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.utils.hooks import RemovableHandle

__all__ = [
    "PruneTarget",
    "apply_masks",
    "check_masks_removed",
    "keep_masks_applied",
    "load_pruned_state_dict",
    "refresh_pruned_weights",
    "remove_masks",
]

ParamSpec = nn.Parameter | str | tuple[nn.Module, str]


@dataclass(frozen=True)
class PruneTarget:
    """The weight ``name`` of ``module``, called ``qualname`` in the model."""

    module: nn.Module
    name: str
    qualname: str

    @property
    def is_reparametrized(self) -> bool:
        """Whether ``torch.nn.utils.prune`` holds this weight as ``name_orig`` and ``name_mask``."""
        return f"{self.name}_orig" in self.module._parameters

    @property
    def parameter(self) -> nn.Parameter:
        """The parameter holding the values: ``name_orig`` once reparametrised, else ``name``."""
        key = f"{self.name}_orig" if self.is_reparametrized else self.name
        parameter = self.module._parameters[key]
        assert parameter is not None, f"{self.qualname} is registered as None"
        return parameter

    def _mask_buffer(self) -> torch.Tensor:
        """The buffer ``name_mask`` of a reparametrised weight."""
        buffer = self.module._buffers[f"{self.name}_mask"]
        assert buffer is not None, f"{self.qualname}'s mask is registered as None"
        return buffer

    def mask(self) -> torch.Tensor:
        """Boolean mask of the weights still in the model (all ``True`` before any pruning)."""
        if self.is_reparametrized:
            return self._mask_buffer() != 0
        return torch.ones_like(self.parameter, dtype=torch.bool)

    def weight(self) -> torch.Tensor:
        """The weights the model uses: the parameter times the mask, detached."""
        return self.parameter.detach() * self.mask()

    @torch.no_grad()
    def assign(self, weight: torch.Tensor, mask: torch.Tensor) -> None:
        """Store ``weight`` (zeroed where ``mask`` is ``False``) and make ``mask`` the weight's mask."""
        parameter = self.parameter
        parameter.copy_(weight.reshape(parameter.shape).masked_fill(~mask, 0))
        if self.is_reparametrized:
            buffer = self._mask_buffer()
            buffer.copy_(mask)
            setattr(self.module, self.name, parameter * buffer)
        else:
            torch_prune.custom_from_mask(self.module, self.name, mask)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copies of the stored values and mask (``None`` when not reparametrised), for :meth:`restore`."""
        mask = self._mask_buffer() if self.is_reparametrized else None
        return self.parameter.detach().clone(), None if mask is None else mask.clone()

    @torch.no_grad()
    def restore(self, saved: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """Put back exactly what :meth:`snapshot` saved, reparametrisation included."""
        values, mask = saved
        if mask is None and self.is_reparametrized:
            torch_prune.remove(self.module, self.name)
        self.parameter.copy_(values)
        if mask is not None:
            buffer = self._mask_buffer()
            buffer.copy_(mask)
            setattr(self.module, self.name, self.parameter * buffer)


def _owner(model: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    module_path, _, name = qualname.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError as error:
        raise ValueError(f"the model has no parameter {qualname!r}") from error
    return module, name


def resolve_targets(
    model: nn.Module, params: Iterable[ParamSpec] | None = None
) -> list[PruneTarget]:
    """The weights to prune.

    ``params`` is ``None`` (every weight of two or more dimensions that requires
    grad: the weights of linear, convolution and embedding layers, no biases or
    norms), or an iterable mixing parameters of ``model`` (as an optimiser takes
    them, ``model.parameters()``), parameter names as in ``model.named_parameters()``
    and ``(module, name)`` pairs as ``torch.nn.utils.prune.global_unstructured``
    takes them. Names of weights already pruned by ``torch.nn.utils.prune`` may
    be given with or without the ``_orig`` suffix; their parameter is ``name_orig``.
    """
    module_names = {id(module): name for name, module in model.named_modules()}
    owners = {
        id(parameter): (module, name)
        for module in model.modules()
        for name, parameter in module.named_parameters(recurse=False)
    }
    chosen: list[PruneTarget] = []
    if params is None:
        for module_name, module in model.named_modules():
            for name, parameter in module.named_parameters(recurse=False):
                if parameter.dim() >= 2 and parameter.requires_grad:
                    chosen.append(_target(module, name, module_name))
    else:
        for spec in params:
            if isinstance(spec, torch.Tensor):
                if id(spec) not in owners:
                    raise ValueError(
                        f"a tensor of shape {tuple(spec.shape)} in params is not a parameter of "
                        "the model (a weight pruned by torch.nn.utils.prune is a product of its "
                        "parameter name_orig and its mask: pass name_orig or the name)"
                    )
                module, name = owners[id(spec)]
            elif isinstance(spec, str):
                module, name = _owner(model, spec)
            elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], nn.Module):
                module, name = spec
                if id(module) not in module_names:
                    raise ValueError(f"{type(module).__name__} in params is not part of the model")
            else:
                raise TypeError(
                    "params must hold parameters, parameter names or (module, name) pairs, "
                    f"got {spec!r}"
                )
            target = _target(module, name, module_names[id(module)])
            if target.name not in module._parameters and not target.is_reparametrized:
                raise ValueError(f"the model has no parameter {target.qualname!r}")
            if not target.parameter.requires_grad:
                raise ValueError(f"{target.qualname} does not require grad and cannot be pruned")
            chosen.append(target)
    unique: dict[int, PruneTarget] = {}
    for target in chosen:
        unique.setdefault(id(target.parameter), target)  # tied weights are pruned once
    if not unique:
        raise ValueError("found no weights to prune: pass params explicitly")
    devices = {target.parameter.device for target in unique.values()}
    if len(devices) > 1:
        raise ValueError(
            f"the weights to prune must share one device, got {sorted(map(str, devices))}"
        )
    return list(unique.values())


def _target(module: nn.Module, name: str, module_name: str) -> PruneTarget:
    if name.endswith("_orig") and f"{name.removesuffix('_orig')}_mask" in module._buffers:
        name = name.removesuffix("_orig")
    return PruneTarget(module, name, f"{module_name}.{name}" if module_name else name)


def _masked_weights(model: nn.Module) -> Iterable[tuple[str, nn.Module, str]]:
    """``(qualified name, module, name)`` of every weight held as ``name_orig`` and ``name_mask``."""
    for module_name, module in model.named_modules():
        for key, mask in list(module._buffers.items()):
            name = key.removesuffix("_mask")
            if key.endswith("_mask") and mask is not None and f"{name}_orig" in module._parameters:
                yield (f"{module_name}.{name}" if module_name else name), module, name


def _reparametrized_weights(model: nn.Module) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for _, module, name in _masked_weights(model):
        parameter, mask = module._parameters[f"{name}_orig"], module._buffers[f"{name}_mask"]
        assert parameter is not None and mask is not None
        yield parameter, mask


@torch.no_grad()
def refresh_pruned_weights(module: nn.Module) -> None:
    """Set every pruned ``name`` in ``module`` to ``name_orig * name_mask`` again.

    ``torch.nn.utils.prune`` keeps that product as a plain attribute, which
    ``module.to(device)`` does not move: after a move it still sits on the old device.
    """
    for _, owner, name in _masked_weights(module):
        parameter, mask = owner._parameters[f"{name}_orig"], owner._buffers[f"{name}_mask"]
        assert parameter is not None and mask is not None
        setattr(owner, name, parameter * mask)


def remove_masks(model: nn.Module) -> list[str]:
    """Make every mask of ``model`` permanent: ``torch.nn.utils.prune.remove`` on each pruned weight.

    Each ``name_orig`` / ``name_mask`` pair becomes the plain parameter ``name``
    holding the pruned values (zeros where the mask is zero), so that
    ``model.state_dict()``, ``torch.save`` and a Hugging Face model's
    ``save_pretrained`` store the weights under their usual names. Pruning the
    model again starts from these weights with fresh, all-kept masks. Returns
    the qualified names of the weights made permanent.
    """
    removed = []
    for qualname, module, name in list(_masked_weights(model)):
        torch_prune.remove(module, name)
        removed.append(qualname)
    return removed


def check_masks_removed(model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` still holds masks, before it is saved.

    A Hugging Face model saved by ``save_pretrained`` with its masks writes
    ``weight_orig`` and ``weight_mask``; ``from_pretrained`` then finds no
    ``weight`` and initialises it at random. Call this before saving (or call
    :func:`remove_masks`, which makes the masks permanent).

    Raises:
        ValueError: naming the masked weights.
    """
    names = [qualname for qualname, _, _ in _masked_weights(model)]
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(
            f"the model still holds pruning masks ({shown}): saved like this, the weights are "
            "stored as weight_orig and weight_mask and a Hugging Face from_pretrained "
            "re-initialises them; call secondorder.prune.remove_masks(model) (or the pruner's "
            "make_permanent()) before saving"
        )


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every ``name_orig`` of ``model`` where its ``name_mask`` is zero."""
    for parameter, mask in _reparametrized_weights(model):
        parameter.mul_(mask)


def keep_masks_applied(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """After every ``optimizer.step()``, zero the pruned weights of ``model``.

    The forward pre-hook of ``torch.nn.utils.prune`` already multiplies by the
    mask, but an optimiser moves the stored ``name_orig`` values under the mask
    (momentum, weight decay). This keeps them at zero, so what is stored is what
    the model computes with, for masks present now and those added later (as
    gradual pruning does). Returns a handle; ``handle.remove()`` stops it.
    """
    return optimizer.register_step_post_hook(lambda *_: apply_masks(model))


def load_pruned_state_dict(
    model: nn.Module, state_dict: dict[str, Any], strict: bool = True
) -> Any:
    """Load a checkpoint of a pruned model into a model that may not be pruned yet.

    Every weight stored as ``name_orig`` and ``name_mask`` in ``state_dict`` is
    reparametrised first (``torch.nn.utils.prune.identity``), so
    ``model.load_state_dict`` finds the same keys; the masks come from the checkpoint.
    Returns what ``model.load_state_dict`` returns.
    """
    for key in state_dict:
        if key.endswith("_mask") and f"{key.removesuffix('_mask')}_orig" in state_dict:
            module, name = _owner(model, key.removesuffix("_mask"))
            if f"{name}_orig" not in module._parameters:
                torch_prune.identity(module, name)
    return model.load_state_dict(state_dict, strict=strict)
