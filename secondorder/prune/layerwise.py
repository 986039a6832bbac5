"""The common part of the layer-wise pruners (SparseGPT, Wanda): calibrate, then prune, block by block."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from .._checks import ensure_fits
from .._progress import progress
from .calibration import InputStatistic, calibrate, group_by_block, linear_weights
from .pruners import Pruner, _Goal
from .targets import ParamSpec, PruneTarget

__all__ = ["LayerwisePruner"]

#: the statistic a subclass collects of each layer's inputs
StatisticT = TypeVar("StatisticT", bound=InputStatistic)


class LayerwisePruner(Pruner, Generic[StatisticT]):
    """Prunes ``nn.Linear`` layers one at a time, each from a statistic of its inputs on calibration data.

    Every step (see :meth:`Pruner.prune`) goes through the blocks in order
    (:func:`~.calibration.group_by_block`: the decoder layers of a transformer,
    else single layers); for each block it runs the model on ``data`` up to the
    end of the block, with the blocks before it already pruned, collects the
    statistic of every layer of the block, and then prunes those layers in
    registration order. Every layer is brought to the same sparsity (``scope`` is
    ``"layer"``).

    Subclasses define the statistic (:meth:`_statistic`), how a layer is pruned
    from it (:meth:`_prune_layer`) and the memory that takes (:meth:`_layer_bytes`).

    Args:
        model: the model; pruned in place.
        data: re-iterable of calibration batches (a list, a DataLoader): tensors of
            inputs, dicts of keyword inputs, or ``(inputs, targets)`` pairs whose
            targets are ignored (see :func:`~.calibration.run_model`). Iterated
            once per block and step.
        params: the weights to prune, which must be ``nn.Linear`` weights (given as
            for :class:`Pruner`); ``None`` for every ``nn.Linear`` but the output
            layer (:func:`~.calibration.linear_weights`).
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
        needed = 0
        for _, targets in self.blocks:
            sizes = [self._layer_bytes(target) for target in targets]
            needed = max(needed, sum(held for held, _ in sizes) + max(work for _, work in sizes))
        largest = max(self.targets, key=lambda t: t.parameter.numel())
        ensure_fits(
            needed,
            self.device,
            what=f"{self.method} of layers up to {tuple(largest.parameter.shape)}",
            advice="prune fewer layers at a time (params) or free memory",
        )

    def _prune_step(self, goal: _Goal) -> None:
        self._check_memory()
        for block, targets in progress(
            self.blocks, desc=f"{self.method}: blocks", enabled=self.progress
        ):
            statistics = {target.module: self._statistic(target) for target in targets}
            calibrate(self.model, self.data, block, statistics, self.device)
            for target in targets:
                weight, kept = self._prune_layer(target, statistics[target.module], goal)
                target.assign(weight.to(target.parameter.dtype), kept)
