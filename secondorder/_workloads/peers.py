"""The optimisers a user would otherwise pick, built the way their authors use them, for the
benchmarks: ``torch.optim.Muon`` on the hidden matrices with AdamW for the rest, and
heavyball's SOAP when that package is installed (it is never a dependency)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType

import torch
from torch import nn

__all__ = ["OptimizerChain", "heavyball", "heavyball_soap", "hidden_matrices", "muon_with_adamw"]


class _States(Mapping):
    """The per-parameter states of several optimisers, read as one. Unlike a ``ChainMap``
    over their ``defaultdict`` states, looking up a parameter adds no empty record to them."""

    def __init__(self, states: list[Mapping]) -> None:
        self._states = states

    def __getitem__(self, param):
        for state in self._states:
            if param in state:
                return state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator:
        for state in self._states:
            yield from state

    def __len__(self) -> int:
        return sum(len(state) for state in self._states)


class OptimizerChain(torch.optim.Optimizer):
    """Optimisers over disjoint parameters, stepped as one.

    ``param_groups`` is the list of the children's own group dicts, so a learning-rate
    scheduler built on the chain sets every child's rate; ``state`` is a live, read-only
    view of the children's states (a parameter's record is in exactly one of them).

    Args:
        optimizers: the children, each over its own parameters.

    Raises:
        ValueError: no optimiser, or a parameter held by two of them.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        if not optimizers:
            raise ValueError("OptimizerChain needs at least one optimizer")
        params = [p for o in optimizers for group in o.param_groups for p in group["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("OptimizerChain: a parameter is held by two optimizers")
        super().__init__(params, {})
        self.optimizers = optimizers
        self.param_groups = [group for o in optimizers for group in o.param_groups]
        self.state = _States([o.state for o in optimizers])  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every child; ``closure`` is evaluated once, by this chain."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss


def hidden_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The weights of every ``nn.Linear`` but the last one registered (the output layer):
    a transformer's attention and MLP matrices, a CNN's hidden fully connected layers.
    Embeddings, norms, biases, convolutions and the output layer are not in it."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [m.weight for m in linears[:-1]]


def muon_with_adamw(
    model: nn.Module, lr: float, weight_decay: float = 0.0, **muon_options
) -> OptimizerChain:
    """``torch.optim.Muon`` on :func:`hidden_matrices`, ``torch.optim.AdamW`` on the rest,
    at one learning rate: Muon scales its orthogonalised update to AdamW's RMS
    (``adjust_lr_fn="match_rms_adamw"``), so the two share AdamW's rate.

    Raises:
        ValueError: the model has no hidden matrix (Muon would have nothing to do).
    """
    matrices = hidden_matrices(model)
    if not matrices:
        raise ValueError(
            "muon_with_adamw: the model has no hidden matrix (nn.Linear before the last)"
        )
    chosen = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    options = {"adjust_lr_fn": "match_rms_adamw"} | muon_options
    muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, **options)
    if not rest:
        return OptimizerChain(muon)
    return OptimizerChain(muon, torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay))


def heavyball() -> ModuleType | None:
    """The ``heavyball`` package, or ``None`` when it is not installed."""
    try:
        return importlib.import_module("heavyball")
    except ImportError:
        return None


def heavyball_soap(params: Iterable[nn.Parameter], lr: float, **options) -> torch.optim.Optimizer:
    """heavyball's ``SOAP`` with its defaults but ``lr`` and ``options``. Its first step
    compiles with ``torch.compile``: time steady steps only.

    Raises:
        ImportError: heavyball is not installed.
    """
    package = heavyball()
    if package is None:
        raise ImportError("heavyball is not installed: pip install --no-deps heavyball")
    return package.SOAP(params, lr=lr, **options)
