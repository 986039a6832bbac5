"""The common part of the layer-wise pruners (SparseGPT, Wanda): calibrate, then prune, block by block."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from .._checks import ensure_fits
from .._progress import progress
from .calibration import (
    BlockInputs,
    InputStatistic,
    blocks_on_device,
    calibrate,
    calibration_mode,
    group_by_block,
    linear_weights,
    on_device,
)
from .obs_sweep import HessianStatistic
from .pruners import Pruner, _Goal
from .targets import ParamSpec, PruneTarget

__all__ = ["HessianLayerwise", "LayerwisePruner"]

#: the statistic a subclass collects of each layer's inputs
StatisticT = TypeVar("StatisticT", bound=InputStatistic)


class LayerwisePruner(Pruner, Generic[StatisticT]):
    """Prunes ``nn.Linear`` layers one at a time, each from a statistic of its inputs on calibration data.

    Every step (see :meth:`Pruner.prune`) goes through the blocks in order
    (:func:`~.calibration.group_by_block`: the decoder layers of a transformer,
    else single layers). Each block is calibrated on what the blocks before it,
    already pruned, output: the statistic of every layer of the block is
    collected, then those layers are pruned in registration order. Every layer
    is brought to the same sparsity (``scope`` is ``"layer"``).

    When each block's output is the next block's input (a transformer's decoder
    layers), calibration is sequential, as in the SparseGPT, GPTQ and Wanda
    references: one pass of the model records the first block's inputs and the
    arguments every block receives, then each block runs on the cached inputs to
    calibrate, is pruned, and runs again to give the next block its inputs (cost
    linear in depth). Otherwise (an ``nn.Sequential`` MLP, whose layers are
    blocks with activations between them) the model runs from its input again
    for every block, quadratic in depth. Both give the same masks
    (:mod:`.calibration`).

    Subclasses define the statistic (:meth:`_statistic`), how a layer is pruned
    from it (:meth:`_prune_layer`) and the memory that takes (:meth:`_layer_bytes`).

    Args:
        model: the model; pruned in place.
        data: re-iterable of calibration batches (a list, a DataLoader): tensors of
            inputs, dicts of keyword inputs, or ``(inputs, targets)`` pairs whose
            targets are ignored (see :func:`~.calibration.run_model`). Iterated
            once per step (sequential calibration), else once per block and step.
        params: the weights to prune, which must be ``nn.Linear`` weights (given as
            for :class:`Pruner`); ``None`` for every ``nn.Linear`` but the output
            layer (:func:`~.calibration.linear_weights`).
        device: where blocks are calibrated and pruned, one at a time: each block
            is moved there for its turn and back after, while the rest of the
            model stays where it is, so a model larger than the device's memory
            can be pruned. ``None``: where the weights are.
        offload_activations: keep the cached inputs of the blocks (and the
            arguments they take) on the CPU, moving one batch at a time to
            ``device``; else they stay on ``device``.
        sequential: ``False`` forces the re-run calibration (for comparison); it
            applies anyway when the blocks are not chained.
        progress: show a progress bar over the blocks.
    """

    #: name in progress bars and messages
    method = "layer-wise pruning"

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        *,
        params: Iterable[ParamSpec] | None = None,
        device: torch.device | str | None = None,
        offload_activations: bool = False,
        sequential: bool = True,
        progress: bool = True,
    ) -> None:
        super().__init__(model, linear_weights(model) if params is None else params, scope="layer")
        for target in self.targets:
            if not isinstance(target.module, nn.Linear) or target.name != "weight":
                raise ValueError(
                    f"{type(self).__name__} prunes nn.Linear weights; {target.qualname} is the "
                    f"{target.name!r} of a {type(target.module).__name__}"
                )
        self.data = data
        self.progress = progress
        self.sequential = bool(sequential)
        self.offload_activations = bool(offload_activations)
        #: where the model's weights are and its inputs go
        self.home_device = self.device
        if device is not None:
            self.device = _as_device(device)
        self.blocks = group_by_block(model, self.targets)

    def _statistic(self, target: PruneTarget) -> StatisticT:
        """A fresh statistic of the inputs of ``target``'s layer."""
        raise NotImplementedError

    def _prune_layer(
        self, target: PruneTarget, statistic: StatisticT, goal: _Goal
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new weights of ``target`` and its boolean mask (``True``: kept) for ``goal``."""
        raise NotImplementedError

    def _layer_bytes(self, target: PruneTarget) -> tuple[int, int]:
        """Bytes of ``target``'s statistic (held for its whole block) and of pruning it (one at a time)."""
        raise NotImplementedError

    def _check_memory(self) -> None:
        """Refuse before anything runs unless each block's statistics and the work on its
        largest layer fit on the device, with the block itself where ``device=`` moves it
        there from elsewhere. (The cached activations are not counted: their size is known
        once the first block's inputs are captured; ``offload_activations=True`` keeps
        them on the CPU.)"""
        moved = self.device != self.home_device
        needed = 0
        for block, targets in self.blocks:
            sizes = [self._layer_bytes(target) for target in targets]
            block_needs = sum(held for held, _ in sizes) + max(work for _, work in sizes)
            needed = max(needed, block_needs + (module_bytes(block) if moved else 0))
        largest = max(self.targets, key=lambda t: t.parameter.numel())
        ensure_fits(
            needed,
            self.device,
            what=f"{self.method} of layers up to {tuple(largest.parameter.shape)}"
            + (" (with the block moved to the device)" if moved else ""),
            advice="prune fewer layers at a time (params) or free memory",
        )

    def _prune_step(self, goal: _Goal) -> None:
        self._check_memory()
        modules = [block for block, _ in self.blocks]
        with calibration_mode(self.model):
            inputs = None
            if self.sequential:
                storage = torch.device("cpu") if self.offload_activations else self.device
                inputs = BlockInputs.capture(
                    self.model, self.data, modules, input_device=self.home_device,
                    storage=storage, device=self.device,
                )  # fmt: skip
            for index, (block, targets) in enumerate(
                progress(self.blocks, desc=f"{self.method}: blocks", enabled=self.progress)
            ):
                statistics = {target.module: self._statistic(target) for target in targets}
                if inputs is None:
                    with blocks_on_device(modules, self.device):
                        calibrate(self.model, self.data, block, statistics, self.home_device)
                with on_device(block, self.device):
                    if inputs is not None:
                        inputs.calibrate(block, index, statistics, self.device)
                    for target in targets:
                        weight, kept = self._prune_layer(target, statistics[target.module], goal)
                        target.assign(weight.to(target.parameter.dtype), kept)
                    if inputs is not None and index + 1 < len(self.blocks):
                        inputs.advance(block, index, self.device)


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _as_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``, with the current CUDA device's index filled in."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch.device or its name, got {device!r}") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but CUDA is not available")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


class HessianLayerwise(LayerwisePruner[HessianStatistic]):
    """The layer-wise base of the OBS methods on the input Hessian ``H = (2/N) Σ x xᵀ``
    (SparseGPT, GPTQ): each layer's statistic is ``H``, and its memory the float64 ``H``
    while the block is calibrated, then three ``cols²`` float64 matrices for the
    factorisation and, per weight, the weights, errors and masks (``bytes_per_weight``
    more for a method's own records)."""

    #: bytes per weight a method keeps beyond the weights, errors and masks
    bytes_per_weight = 2

    def _statistic(self, target: PruneTarget) -> HessianStatistic:
        return HessianStatistic(
            target.parameter.shape[1], self.device, self._dtype, what=target.qualname
        )

    def _layer_bytes(self, target: PruneTarget) -> tuple[int, int]:
        rows, cols = target.parameter.shape
        itemsize = torch.empty(0, dtype=self._dtype).element_size()
        working = 3 * 8 * cols * cols + rows * cols * (3 * itemsize + self.bytes_per_weight)
        return 8 * cols * cols, working
