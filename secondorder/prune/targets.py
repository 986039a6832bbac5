"""Which weights a pruner acts on, and their masks as ``torch.nn.utils.prune`` keeps them.

A pruned weight ``name`` of a module is stored the way ``torch.nn.utils.prune``
stores it: the parameter ``name_orig``, the buffer ``name_mask`` and a forward
pre-hook that sets ``name = name_orig * name_mask``. Masks made here and by
``torch.nn.utils.prune`` are therefore interchangeable, ``prune.remove(module, name)``
makes one permanent, and ``model.state_dict()`` holds the masks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.utils.hooks import RemovableHandle

__all__ = ["PruneTarget", "apply_masks", "keep_masks_applied", "load_pruned_state_dict"]

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


def _reparametrized_weights(model: nn.Module) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for module in model.modules():
        for key, mask in module._buffers.items():
            parameter = module._parameters.get(f"{key.removesuffix('_mask')}_orig")
            if key.endswith("_mask") and parameter is not None and mask is not None:
                yield parameter, mask


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
