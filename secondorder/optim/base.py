"""The base class under every optimiser of the library.

:class:`BaseOptimizer` is a ``torch.optim.Optimizer`` that owns what the optimisers share,
so that each one writes only its update rule:

- parameter groups: each group's settings validated once when it is added
  (:meth:`BaseOptimizer._validate_group`, typically a frozen dataclass per optimiser), a
  refused group leaving the optimiser as it was; parameters on the meta device refused;
- the step loop: the closure, the gradients gathered, sparse gradients refused, the
  non-finite policy (:class:`~secondorder.optim.nonfinite.NonFinitePolicy`: raise, skip,
  skip on the device) applied around the subclass's :meth:`BaseOptimizer._step`;
- ``layerwise`` mode: each parameter updated from a hook as soon as its gradient is
  accumulated (:meth:`BaseOptimizer._step_one`), so full gradients never coexist;
- state: ``state_dict()`` as torch's (under FSDP2 each rank's keys tagged with its rank, so
  ``torch.distributed.checkpoint`` keeps every rank's), ``load_state_dict`` checked before
  anything changes and without torch's dtype cast, keys it does not know (a flag a user
  set, say) carried and ignored as ``torch.optim`` does;
- copies: ``deepcopy`` and ``pickle`` keep everything but the caches named in
  ``_transient``, which are rebuilt (and cleared on a load).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from .._checks import check_positive_int
from .._common import to_device
from .._distributed import row_shard
from ..errors import NonFiniteError
from .nonfinite import MODES, NonFinitePolicy, check_gradients

__all__ = ["BaseOptimizer", "check_shapes", "learning_rate", "real_view"]


def learning_rate(group: dict[str, Any]) -> float:
    """The group's ``lr`` as a number: a float, or (as ``torch.optim`` allows) a one-element
    tensor, which an LR scheduler updates in place."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        return float(lr)
    return lr


def real_view(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a complex ``t`` its ``view_as_real`` (a view: writes reach ``t``): the
    real and imaginary parts are stepped as two coordinates, as ``torch.optim.AdamW`` does."""
    return torch.view_as_real(t) if t.is_complex() else t


def check_shapes(saved: dict[str, Any], shapes: dict[str, Any], p: torch.Tensor) -> None:
    """Raise ``ValueError`` unless each of ``shapes`` present in ``saved`` is a tensor of
    that shape; ``p`` names the parameter in the message."""
    for key, shape in shapes.items():
        if key not in saved:
            continue
        value = saved[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"the saved {key} of a parameter of shape {tuple(p.shape)} is {found}, "
                f"expected {tuple(shape)}: is this the state of another model or optimiser?"
            )


def _graph_task_id() -> int | None:
    """Which backward pass is running (autograd's graph task), ``None`` if unknown."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return None if current is None else current()


#: joins a state key to the rank whose rows it describes: ``"exp_avg@rank1"``
RANK_TAG = "@rank"


class BaseOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose subclasses fill in two methods:

    - :meth:`_step` ``(params)``: update every parameter of ``params`` (those with a
      gradient, in group order); raise :class:`~secondorder.errors.NonFiniteError` before
      changing anything if a gradient holds NaN or Inf (:func:`check_gradients`), or, under
      ``nonfinite="skip_on_device"``, write through ``self.nonfinite_policy``;
    - :meth:`_validate_group` ``(group)``: raise ``ValueError`` for a bad setting.

    and, where they need them, :meth:`_step_one` (``layerwise`` mode) and
    :meth:`_check_state` (refuse a saved state the step cannot take).

    Args:
        params: parameters or groups.
        defaults: every group setting and its default.
        layerwise: update each parameter from a hook as soon as its gradient is
            accumulated, and free that gradient (see :meth:`step`).
        accumulation_steps: with ``layerwise``, update on every this many backward passes.
        nonfinite: ``"raise"``, ``"skip"`` or ``"skip_on_device"``
            (:mod:`secondorder.optim.nonfinite`).
        skip_report_every: with ``"skip_on_device"``, read the count of skipped steps on
            the host every this many steps and warn if it grew.
    """

    #: the policies a subclass supports
    nonfinite_modes: ClassVar[tuple[str, ...]] = MODES
    #: caches rebuilt rather than copied by ``deepcopy`` and ``pickle``, and cleared by a
    #: load: attribute name → factory
    _transient: ClassVar[dict[str, Callable[[], Any]]] = {}

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        nonfinite: str = "raise",
        skip_report_every: int = 100,
    ) -> None:
        self.nonfinite_policy = NonFinitePolicy(
            nonfinite,
            check_positive_int(skip_report_every, "skip_report_every"),
            self.nonfinite_modes,
        )
        if layerwise and nonfinite != "raise":
            raise ValueError(
                f"nonfinite={nonfinite!r} cannot be combined with layerwise=True: the parameters "
                "whose hooks ran before the bad gradient are already updated, so the step cannot "
                "be skipped whole"
            )
        self.layerwise = layerwise
        self.accumulation_steps = check_positive_int(accumulation_steps, "accumulation_steps")
        self._backward_counts: dict[torch.Tensor, int] = {}
        self._group_of: dict[torch.Tensor, int] = {}
        self._reset_hook_state()
        self._reset_caches()
        if "lr" in defaults:  # refuse a bad tensor lr before reading params, as torch.optim does
            learning_rate(defaults)
        super().__init__(params, defaults)

    def _reset_hook_state(self) -> None:
        self._hooks: list[Any] = []
        self._graph_task: int | None = None  # the backward pass _stepped belongs to
        self._stepped: list[torch.Tensor] = []  # updated by hooks during that backward pass

    def _reset_caches(self) -> None:
        for name, factory in self._transient.items():
            setattr(self, name, factory())

    @property
    def nonfinite(self) -> str:
        """The non-finite policy: ``"raise"``, ``"skip"`` or ``"skip_on_device"``."""
        return self.nonfinite_policy.mode

    # ----------------------------------------------------------------- what subclasses fill in
    def _step(self, params: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _step_one(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """The update of one parameter whose gradient is checked (``layerwise`` mode)."""
        raise NotImplementedError(f"{type(self).__name__} does not support layerwise=True")

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for a bad setting of ``group`` (nothing has changed yet)."""

    def _check_state(self, p: torch.Tensor, group: dict[str, Any], saved: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless the step can take ``saved`` as the state of ``p``."""

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if any(p.device.type == "meta" for p in group["params"]):
                raise ValueError(
                    "parameters on the meta device hold no values to update: materialise the "
                    "model (e.g. model.to_empty(device=...) and initialise it) before building "
                    "the optimiser"
                )
            self._validate_group(group)
        except (ValueError, TypeError):
            self.param_groups.pop()  # a refused group leaves the optimiser as it was
            raise
        if self.layerwise:
            self._register_hooks(len(self.param_groups) - 1)

    # ----------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient.

        Every gradient is checked before anything changes: NaN or Inf raises
        :class:`~secondorder.errors.NonFiniteError` and leaves weights and state as they were
        (``nonfinite="skip"``: the step returns, counted and warned about; ``"skip_on_device"``:
        decided on the device, every write masked).

        In ``layerwise`` mode the parameters are updated by hooks during ``backward()``
        (each on every ``accumulation_steps``-th backward pass that reached it, after which
        its ``.grad`` is set to ``None``); ``step()`` then only runs the closure. Call it
        anyway once per iteration so LR schedulers see a step, and do not call
        ``zero_grad()`` between updates. A parameter unfrozen since the optimiser was built
        has no hook yet: the next ``step()`` applies its gradient and hooks it. A NaN or Inf
        gradient in ``layerwise`` mode abandons that backward pass: ``backward()`` raises
        :class:`~secondorder.errors.NonFiniteError` naming the parameters its hooks had
        already updated; the others are not updated, and every ``.grad`` is cleared.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            self._adopt_unfrozen()
            return loss
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        policy = self.nonfinite_policy
        try:
            self._step(params)
        except NonFiniteError as error:
            policy.found_inf = None
            policy.refuse(self, error)
        except BaseException:
            policy.found_inf = None
            raise
        policy.finish_step(self)
        return loss

    # ----------------------------------------------------------------- layerwise mode
    def _register_hooks(self, index: int) -> None:
        for p in self.param_groups[index]["params"]:
            if p.requires_grad:
                self._group_of[p] = index
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def remove_hooks(self) -> None:
        """Detach the ``layerwise`` hooks; the optimiser then steps only when :meth:`step` is called."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.layerwise = False

    def _adopt_unfrozen(self) -> None:
        """Step the parameters unfrozen since their group's hooks were registered, then hook them."""
        for index, group in enumerate(self.param_groups):
            late = [p for p in group["params"] if p.requires_grad and p not in self._group_of]
            stepped = [p for p in late if p.grad is not None]
            check_gradients(stepped)
            for p in stepped:
                self._step_one(p, group)
                p.grad = None
            for p in late:
                self._group_of[p] = index
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _on_grad(self, p: torch.Tensor) -> None:
        task = _graph_task_id()
        if task != self._graph_task:
            self._graph_task, self._stepped = task, []
        count = self._backward_counts.get(p, 0) + 1
        self._backward_counts[p] = count % self.accumulation_steps
        if count < self.accumulation_steps:
            return
        with torch.no_grad():
            try:
                check_gradients([p])
            except NonFiniteError as error:
                self._abandon_backward(error)
            self._step_one(p, self.param_groups[self._group_of[p]])
        p.grad = None
        self._stepped.append(p)

    def _abandon_backward(self, error: NonFiniteError) -> None:
        """Clear every gradient and accumulation count, and raise naming what was updated."""
        stepped = [self._describe(p) for p in self._stepped]
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        self._backward_counts.clear()
        self._graph_task, self._stepped = None, []
        done = (
            f"{len(stepped)} parameter(s) were already updated by it: {', '.join(stepped)}"
            if stepped
            else "no parameter was updated by it"
        )
        raise NonFiniteError(
            f"{error}; this backward pass is abandoned: {done}; the others were not, and every "
            "gradient was cleared, so the next backward pass starts afresh"
        ) from None

    def _describe(self, p: torch.Tensor) -> str:
        index = self._group_of[p]
        position = next(i for i, q in enumerate(self.param_groups[index]["params"]) if q is p)
        return f"group {index} #{position} {tuple(p.shape)}"

    # ----------------------------------------------------------------- copies
    def __getstate__(self) -> dict[str, Any]:
        """Every attribute the optimiser steps with (torch's keeps only ``defaults``,
        ``state`` and ``param_groups``), but hooks and caches: the ``layerwise`` hooks are
        registered again on the copy's parameters."""
        if getattr(self, "process_group", None) is not None:
            raise TypeError(
                "an optimiser with a process_group cannot be copied or pickled (a process group "
                "cannot); save its state_dict() instead"
            )
        torch_hooks = {name for name in self.__dict__ if name.startswith("_optimizer_")}
        skipped = torch_hooks | set(self._transient) | {"_hooks", "_stepped", "_graph_task"}
        return {name: value for name, value in self.__dict__.items() if name not in skipped}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "defaults" not in state:  # torch's load_state_dict, not a copy
            return
        self._reset_hook_state()
        self._reset_caches()
        if self.layerwise:
            for index in range(len(self.param_groups)):
                self._register_hooks(index)

    # ----------------------------------------------------------------- state
    def _shard_ranks(self, saved_groups: list[dict[str, Any]]) -> dict[Any, int]:
        """``{id: rank}`` for each FSDP2-sharded parameter, by its id in ``saved_groups``."""
        ranks = {}
        for saved, group in zip(saved_groups, self.param_groups, strict=False):
            for key, p in zip(saved["params"], group["params"], strict=False):
                shard = row_shard(p)
                if shard is not None:
                    ranks[key] = torch.distributed.get_rank(shard.group)
        return ranks

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``; under FSDP2 the state of each sharded
        parameter (this rank's rows) is keyed by rank, e.g. ``"exp_avg@rank1"``, so that
        ``torch.distributed.checkpoint`` keeps every rank's."""
        saved = super().state_dict()
        ranks = self._shard_ranks(saved["param_groups"])
        if not ranks:
            return saved
        state = {
            index: {f"{k}{RANK_TAG}{ranks[index]}": v for k, v in entries.items()}
            if index in ranks
            else entries
            for index, entries in saved["state"].items()
        }
        return {**saved, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but checked first: a state dict
        that does not fit (another number of groups or parameters, a group setting the
        optimiser refuses, state of another shape) raises ``ValueError`` and changes
        nothing. Every state tensor keeps its saved dtype; step counters take the form of
        this optimiser's non-finite policy."""
        ranks = self._shard_ranks(state_dict["param_groups"])
        state_dict = {**state_dict, "state": _untag_ranks(state_dict["state"], ranks)}
        self._check_loadable(state_dict)
        torch.optim.Optimizer.load_state_dict(self, state_dict)
        ids: dict[Any, torch.Tensor] = {}  # torch casts state to the parameter's dtype: undo
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            ids.update(zip(saved_group["params"], group["params"], strict=True))
        for key, saved in state_dict["state"].items():
            if key in ids:
                self.state[ids[key]] = to_device(saved, ids[key].device)
        self._backward_counts.clear()
        self._reset_caches()
        self.nonfinite_policy.loaded(self)

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can take ``state_dict`` whole."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} parameter groups, the optimiser "
                f"{len(self.param_groups)}"
            )
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"parameter group {index} of the state dict has {len(saved['params'])} "
                    f"parameters, the optimiser's {len(group['params'])}"
                )
            candidate = {**saved, "params": group["params"]}
            try:
                self._validate_group(candidate)
            except KeyError as error:
                raise ValueError(
                    f"parameter group {index} of the state dict lacks {error}"
                ) from None
            for key, p in zip(saved["params"], group["params"], strict=True):
                saved_state = state_dict["state"].get(key)
                if saved_state is None:
                    continue
                if not isinstance(saved_state, dict):
                    raise ValueError(
                        f"the saved state of a parameter is a {type(saved_state).__name__}"
                    )
                self._check_state(p, candidate, saved_state)


def _untag_ranks(state: dict[Any, Any], ranks: dict[Any, int]) -> dict[Any, Any]:
    """The rank tags of :meth:`BaseOptimizer.state_dict` removed for this rank;
    ``ValueError`` for another rank's state."""
    untagged = {}
    for index, entries in state.items():
        if not isinstance(entries, dict):
            untagged[index] = entries
            continue
        plain = {}
        for key, value in entries.items():
            name, tag, rank = key.rpartition(RANK_TAG) if isinstance(key, str) else ("", "", "")
            if not tag:
                plain[key] = value
                continue
            if index not in ranks or int(rank) != ranks[index]:
                mine = f"rank {ranks[index]}" if index in ranks else "an unsharded parameter"
                raise ValueError(
                    f"the state of parameter {index} was saved by rank {rank} of an FSDP2 run "
                    f"and is loaded by {mine}: resume on the same ranks (resharding is not "
                    "supported)"
                )
            plain[name] = value
        untagged[index] = plain
    return untagged
