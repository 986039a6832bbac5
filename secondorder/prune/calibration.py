"""Calibration for layer-wise pruning: what the linear layers of a model see on sample data.

Layer-wise pruners (SparseGPT, Wanda) need a statistic of each layer's inputs:
``XXᵀ`` or the norm of each input feature, over every token of the calibration
data. Forward pre-hooks on the layers collect them while the model runs.

The layers are processed block by block (a decoder layer of a transformer, or a
single layer elsewhere), and each block is calibrated on what the blocks before
it output *after* they were pruned, as SparseGPT does. Rather than caching the
activations between blocks (which needs the keyword arguments each block takes:
attention masks, position embeddings), the model runs from its input again for
every block and stops as soon as the block has run: the earlier blocks are
already pruned in place, so what reaches the block is the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from .._common import to_device
from .targets import PruneTarget

__all__ = ["Block", "InputStatistic", "calibrate", "group_by_block", "linear_weights", "run_model"]


class InputStatistic(Protocol):
    """Accumulates something about a layer's inputs, one batch of ``[tokens, features]`` at a time."""

    def add(self, inputs: torch.Tensor) -> None: ...


class _StopForward(Exception):
    """Raised by a hook once the block being calibrated has run: the rest of the model is not needed."""


def linear_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights of every ``nn.Linear`` that requires grad, except the output layer.

    The output layer is what a Hugging Face model's ``get_output_embeddings()``
    returns (``lm_head``), or a submodule named ``lm_head``; a model with neither
    (an ``nn.Sequential`` classifier) has every linear layer pruned. Embeddings are
    not ``nn.Linear`` and are never included.
    """
    output = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        output = getter()
    return [
        (module, "weight")
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not output
        and name.rpartition(".")[2] != "lm_head"
        and getattr(module, "weight_orig", module.weight).requires_grad
    ]


Block = tuple[nn.Module, list[PruneTarget]]


def group_by_block(model: nn.Module, targets: Iterable[PruneTarget]) -> list[Block]:
    """The targets grouped by the block that holds them, blocks and targets in registration order.

    A block is an element of the outermost ``nn.ModuleList`` containing the layer
    (a transformer's decoder layers: ``model.model.layers[i]`` in a Hugging Face
    Llama); a layer in no ``nn.ModuleList`` is a block on its own (so an
    ``nn.Sequential`` MLP is pruned one layer after another).
    """
    block_of: dict[int, nn.Module] = {}
    for module in model.modules():  # pre-order: an outer list is seen before an inner one
        if isinstance(module, nn.ModuleList):
            for element in module:
                for inner in element.modules():
                    block_of.setdefault(id(inner), element)
    order = {id(module): index for index, module in enumerate(model.modules())}
    groups: dict[int, Block] = {}
    for target in sorted(targets, key=lambda t: order[id(t.module)]):
        block = block_of.get(id(target.module), target.module)
        groups.setdefault(id(block), (block, []))[1].append(target)
    return sorted(groups.values(), key=lambda group: order[id(group[0])])


def run_model(model: nn.Module, batch: Any, device: torch.device) -> Any:
    """Call ``model`` on one calibration batch.

    A batch is a tensor of inputs (``model(x)``), a mapping of keyword inputs
    (``model(**batch)``, as a Hugging Face model takes ``input_ids``,
    ``attention_mask``, …), or an ``(inputs, targets)`` pair whose targets are
    ignored and whose inputs are either of the above.
    """
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise TypeError(
                f"a calibration batch given as a sequence must be an (inputs, targets) pair, "
                f"got {len(batch)} items"
            )
        batch = batch[0]
    if isinstance(batch, Mapping):
        return model(**{key: to_device(value, device) for key, value in batch.items()})
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device))
    raise TypeError(
        "a calibration batch must be a tensor of inputs, a dict of keyword inputs or an "
        f"(inputs, targets) pair, got {type(batch).__name__}"
    )


@torch.no_grad()
def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    block: nn.Module,
    statistics: Mapping[nn.Module, InputStatistic],
    device: torch.device,
) -> int:
    """Run ``model`` over ``data`` up to the end of ``block``, feeding each layer's inputs to its statistic.

    ``statistics`` maps each layer (a module whose first argument is its input) to
    the :class:`InputStatistic` that receives its inputs, flattened to
    ``[tokens, features]``. The model runs in eval mode; returns the number of batches.
    """

    def collector(statistic: InputStatistic):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = args[0] if args else kwargs["input"]
            statistic.add(inputs.detach().reshape(-1, inputs.shape[-1]))

        return hook

    def stop(*_: Any) -> None:
        raise _StopForward

    handles = [
        layer.register_forward_pre_hook(collector(statistic), with_kwargs=True)
        for layer, statistic in statistics.items()
    ]
    handles.append(block.register_forward_hook(stop))
    was_training = model.training
    model.eval()
    batches = 0
    try:
        for batch in data:
            with contextlib.suppress(_StopForward):
                run_model(model, batch, device)
            batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError(
            "data yielded no batches; pass a re-iterable of calibration batches such as a list "
            "or a DataLoader"
        )
    return batches
