r"""The M-FAC optimiser: preconditioning by the inverse empirical Fisher of recent gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._checks import check_damping, check_positive_int
from .._common import statistics_dtype
from .._distributed import (
    Shard,
    all_gather_shards,
    all_reduce_sum,
    local,
    rank_and_world,
    row_shard,
)
from ..curvature import SlidingWindowMFAC, SparseSlidingWindowMFAC
from ..curvature.sliding_window import SlidingWindow
from ..curvature.sparse_window import check_density
from ..errors import NonFiniteError
from .base import BaseOptimizer, learning_rate, real_view
from .functional import graft_norms
from .nonfinite import check_gradients

__all__ = ["GRAFTS", "MFAC", "PRIORS", "MFACGroupConfig", "WindowSettings"]

#: the optimisers whose per-tensor step norm ``graft`` can give M-FAC's direction
GRAFTS = ("sgd", "adam", "rmsprop", "adagrad")
#: the diagonal priors of the Fisher: ``"adam"``, Adam's ``√v̂ + ε``
PRIORS = ("adam",)
#: the settings that belong to the one window, not to a group
_WINDOW_KEYS = ("num_grads", "damp", "relative_damp", "storage_dtype", "density",
                "error_feedback", "graft", "prior")  # fmt: skip
#: the per-coordinate buffers of the state record, besides the window
_BUFFERS = ("momentum", "graft_exp_avg", "graft_exp_avg_sq", "exp_avg", "exp_avg_sq")
#: ρ when neither damping is given (chosen by measurement: docs/benchmarks.md)
DEFAULT_RELATIVE_DAMP = 3e4


@dataclass(frozen=True)
class WindowSettings:
    """The settings of MFAC's one gradient window (and its grafting or prior), checked once."""

    num_grads: int
    damp: float | None
    relative_damp: float | None
    storage_dtype: str | None
    density: float | None
    error_feedback: bool
    graft: str | None
    prior: str | None

    def __post_init__(self) -> None:
        check_positive_int(self.num_grads, "num_grads")
        if (self.damp is None) == (self.relative_damp is None):
            raise ValueError("give exactly one of damp and relative_damp")
        if self.damp is not None:
            check_damping(self.damp)
        if self.relative_damp is not None:
            check_damping(self.relative_damp, "relative_damp")
        if (
            self.storage_dtype is not None
            and not getattr(torch, self.storage_dtype, torch.int64).is_floating_point
        ):
            raise TypeError(f"storage_dtype must be a floating dtype, got {self.storage_dtype}")
        if self.density is not None:
            check_density(self.density)
        elif not self.error_feedback:
            raise ValueError(
                "error_feedback=False applies to a sparse window: give a density as well"
            )
        if self.graft is not None and self.graft not in GRAFTS:
            raise ValueError(f"graft must be None or one of {GRAFTS}, got {self.graft!r}")
        if self.prior is not None and self.prior not in PRIORS:
            raise ValueError(f"prior must be None or one of {PRIORS}, got {self.prior!r}")
        if self.prior is not None and self.graft is not None:
            raise ValueError(
                f"prior={self.prior!r} and graft={self.graft!r} both set the step's scale: the "
                "prior gives every coordinate Adam's, so it takes graft=None"
            )


@dataclass(frozen=True)
class MFACGroupConfig:
    """The settings of MFAC that may differ per parameter group (``prior`` is the window's,
    read here for the checks it implies)."""

    lr: float
    momentum: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    prior: str | None

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        beta1, beta2 = self.betas
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {self.betas!r}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        if self.prior is not None and self.momentum:
            raise ValueError(
                f"momentum={self.momentum} with prior={self.prior!r}: the prior's step already "
                "averages the gradients (Adam's first moment, betas[0]); give momentum=0"
            )
        if self.prior is not None and not self.eps > 0:
            raise ValueError(f"prior={self.prior!r} needs eps > 0, got {self.eps!r}")

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> MFACGroupConfig:
        return cls(learning_rate(group), group["momentum"], group["weight_decay"],
                   tuple(group["betas"]), group["eps"], group["prior"])  # fmt: skip


def moving_average(
    old: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    active: torch.Tensor,
    *,
    square: bool = False,
) -> torch.Tensor:
    """``β · old + (1 − β) · g`` (``g²`` if ``square``) where ``active``, ``old`` elsewhere:
    Adam's first (second) moment, per coordinate, as a new tensor."""
    new = (1 - beta) * g
    if square:
        new = new * g
    return torch.where(active, beta * old + new, old)


class MFAC(BaseOptimizer):
    r"""M-FAC (Frantar, Kurtic and Alistarh, 2021) as a ``torch.optim`` optimiser.

    Every step, for the flat gradient ``g`` of the parameters in the window:

    .. math::

        g &\leftarrow g + \text{weight\_decay} \cdot w \quad \text{(L2, per group, before preconditioning)}\\
        u &= F^{-1} g, \qquad F = \lambda I + \tfrac{1}{n} \textstyle\sum_{i} g_i g_i^\top
              \text{ over the last } n \le \text{num\_grads} \text{ gradients (this one included)}\\
        u_p &\leftarrow u_p \cdot \lVert s_p \rVert / \lVert u_p \rVert
              \quad \text{(with } \texttt{graft}\text{, for each parameter tensor } p)\\
        v &\leftarrow \mu v + (1 - \mu) u \quad \text{(when momentum } \mu > 0)\\
        w &\leftarrow w - \text{lr} \cdot v

    ``F⁻¹ g`` comes from one :class:`~secondorder.curvature.SlidingWindowMFAC` spanning the
    parameters as one flat vector (README, "The M-FAC optimiser", for which parameters, the
    state and distributed runs). ``lr``, ``momentum``, ``weight_decay``, ``betas`` and
    ``eps`` may differ per parameter group; a group that sets another value of a
    :class:`WindowSettings` is refused.

    **Damping.** ``damp`` is the paper's absolute ``λ``; ``relative_damp = ρ`` sets
    ``λ = ρ · (mean squared entry of the rows in the window)``, recomputed whenever the
    window's small system is refactored (:class:`~secondorder.curvature.gram_system.GramSystem`).
    The window's eigenvalues are at most ``d`` times that mean, so ``ρ`` well below ``d``
    preconditions and ``ρ`` above ``d`` leaves ``F⁻¹g ≈ g/λ``.

    **Grafting** (Agarwal et al. 2020): each parameter tensor's ``u_p`` gets the norm of
    another optimiser's step ``s_p`` from the same gradient, M-FAC's ``momentum`` applying
    after: ``"sgd"``: ``s = g``; ``"adam"``: ``s = m̂ / (√v̂ + ε)``, ``torch.optim.Adam``'s
    step, with ``m ← β₁ m + (1 − β₁) g``, ``v ← β₂ v + (1 − β₂) g²``, ``m̂ = m / (1 − β₁ᵗ)``,
    ``v̂ = v / (1 − β₂ᵗ)``, ``t`` counting the tensor's steps; ``"rmsprop"``:
    ``s = g / (√v + ε)``; ``"adagrad"``: ``s = g / (√(Σ g²) + ε)``.

    **Adam's diagonal as prior** (``prior="adam"``): ``F = λ D + (1/n) Σᵢ gᵢgᵢᵀ`` with
    ``D = √v̂ + ε`` (Adam's moments as above, per coordinate), and the step is
    ``w ← w − lr · λ F⁻¹ m̂``, applied matrix-free through the whitened rows
    ``wᵢ = gᵢ / D^{1/2}`` that the window holds (dense or sparse; ``λ`` is the window's):

    .. math::

        \lambda F^{-1} m̂ = D^{-1/2}\, \lambda \big(\lambda I + \tfrac{1}{n}
            \textstyle\sum_i w_i w_i^\top\big)^{-1} D^{-1/2}\, m̂ .

    As ``λ`` grows the step tends to Adam's, ``D⁻¹ m̂``, so ``lr`` is on Adam's scale; the
    window adds the low-rank curvature a diagonal misses. ``D`` changes every step while
    each stored ``wᵢ`` keeps the ``D`` of its own step: ``F`` is exact for the newest
    gradient, the older ones entering as ``gᵢ`` rescaled by ``(D_now / D_then)^{1/2}``. The
    prior sets the step's scale, so it takes no ``graft`` and no ``momentum``. A step inserts
    ``w`` (one pass over the window) and solves for ``D^{-1/2} m̂`` (two passes, and one
    more host synchronisation than ``update_solve``: the solve's check of its input).

    **Defaults** (chosen by the comparison in docs/benchmarks.md, "The MFAC optimiser"):
    ``prior="adam"``, ``lr=3e-3``, ``relative_damp=3e4``, ``num_grads=32``, no momentum.
    ``prior=None, lr=1e-3, relative_damp=1e4, num_grads=64`` is the earlier default (Adam
    grafting); ``graft=None, damp=1e-6, num_grads=1024`` is the paper's M-FAC.

    **Sparse window.** With ``density``, the window keeps the top ``⌈density · d⌉`` entries
    of each row, with error feedback (EFCP, Modoranu et al. 2023;
    :class:`~secondorder.curvature.SparseSlidingWindowMFAC`): ``F̂⁻¹ c`` for the compressed
    accumulator ``c`` of ``g + e`` replaces ``F⁻¹ g``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (with ``graft`` or ``prior``, on Adam's scale).
        num_grads: gradients in the window.
        damp: absolute damping ``λ > 0``; without ``damp`` or ``relative_damp``,
            ``relative_damp=3e4``.
        momentum: ``μ`` in ``[0, 1)``.
        weight_decay: L2 coefficient added to the gradient.
        storage_dtype: dtype of the window (``torch.bfloat16`` halves its memory).
        process_group: under DDP, shard the window's coordinates over the ranks of this
            group (the gradients must be the same on every rank); under FSDP2 none is needed.
        relative_damp: ``ρ > 0``, damping relative to the window's scale (not with ``damp``).
        density: ``None`` for the dense window, or the fraction in ``(0, 1]`` of each row
            that the sparse window keeps.
        error_feedback: with ``density``, carry what compression drops into the next step.
        graft: ``"adam"``, ``"sgd"``, ``"rmsprop"``, ``"adagrad"``, ``None`` (the paper's
            step ``lr · F⁻¹g``) or ``"auto"``: ``"adam"`` without a prior, ``None`` with one.
        prior: ``"adam"`` for Adam's diagonal as the Fisher's prior, ``None`` for ``λ I``,
            or ``"auto"`` (the default): ``"adam"`` unless a ``graft`` is given.
        betas: Adam's ``(β₁, β₂)`` for the prior or the graft (``"rmsprop"`` uses ``β₂``).
        eps: the ``ε`` of the prior (``> 0``) or of the graft.
        nonfinite: ``"raise"`` or ``"skip"`` (:mod:`secondorder.optim.nonfinite`; not
            ``"skip_on_device"``, since a window's insertion takes host decisions).
    """

    nonfinite_modes = ("raise", "skip")
    #: how the parameters map onto the window, and the window: rebuilt from the state
    _transient: ClassVar[dict[str, Callable[[], Any]]] = {"_layout": lambda: None}
    _layout: _Layout | None

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-3,
        num_grads: int = 32,
        damp: float | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        storage_dtype: torch.dtype | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        *,
        relative_damp: float | None = None,
        density: float | None = None,
        error_feedback: bool = True,
        graft: str | None = "auto",
        prior: str | None = "auto",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        nonfinite: str = "raise",
    ) -> None:
        if nonfinite == "skip_on_device":  # the base's refusal, with the reason
            raise ValueError(
                "MFAC does not support nonfinite='skip_on_device': inserting a gradient into "
                "its window takes decisions on the host (the ring, the factor) that a mask on "
                "the device cannot undo, and nonfinite='skip' costs no extra synchronisation"
            )
        if damp is None and relative_damp is None:
            relative_damp = DEFAULT_RELATIVE_DAMP
        if prior == "auto":
            prior = "adam" if graft == "auto" else None
        if graft == "auto":
            graft = "adam" if prior is None else None
        storage = None if storage_dtype is None else str(storage_dtype).removeprefix("torch.")
        settings = WindowSettings(num_grads, damp, relative_damp, storage, density,
                                  error_feedback, graft, prior)  # fmt: skip
        self.process_group = process_group
        self._settings = settings
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "betas": tuple(betas), "eps": eps,
                    **{key: getattr(settings, key) for key in _WINDOW_KEYS}}  # fmt: skip
        super().__init__(params, defaults, nonfinite=nonfinite)
        self._layout = self._new_layout([p for p in self._params() if p.requires_grad])
        # the window's state and buffers, allocated up front (torch.distributed.checkpoint
        # loads into a fresh optimiser's tensors); each parameter's "step" is add_param_group's
        record = {"steps": 0, "members": self._member_indices(self._layout), "window": None}
        self._complete(record, self._layout)
        self.state[self._params()[0]][self._state_key(self._layout)] = record

    # ----------------------------------------------------------------- groups and settings
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its parameters join the window at their first step with a gradient."""
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:  # torch.distributed.checkpoint wants state
            self.state[p].setdefault("step", torch.tensor(0.0))  # for every parameter

    def _validate_group(self, group: dict[str, Any]) -> None:
        MFACGroupConfig.from_group(group)
        for key in _WINDOW_KEYS:
            if group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key}={group[key]!r} in a parameter group: {key} belongs to MFAC's one "
                    f"window ({key}={self.defaults[key]!r}); set it on the optimiser"
                )

    # ----------------------------------------------------------------- the window
    def _new_layout(self, members: list[torch.Tensor]) -> _Layout:
        """A new, empty window spanning ``members`` (in this order), and how they map onto it."""
        sizes = [real_view(local(p)).numel() for p in members]
        if not members:
            return _Layout(members, sizes, None, Shard(0, 1, 0), None, torch.zeros(0))
        devices = {p.device for p in members}
        if len(devices) > 1:
            raise ValueError(
                f"MFAC needs all parameters on one device, got {sorted(map(str, devices))}"
            )
        device = devices.pop()
        fsdp_group = self._fsdp_group(members)
        if fsdp_group is None:  # one process, or a flat shard of each rank's full gradient
            shard = Shard(*rank_and_world(self.process_group), sum(sizes))
            gather_group = window_group = self.process_group
        else:  # FSDP2: the window spans this rank's rows, nothing is gathered
            shard, gather_group, window_group = Shard(0, 1, sum(sizes)), None, fsdp_group
        dtype = statistics_dtype(*(p.dtype.to_real() for p in members))
        window = self._new_window(shard.size, device, dtype, window_group)
        # the member each coordinate of this rank's shard belongs to (padding: len(members))
        ends = torch.tensor(sizes).cumsum(0)
        coordinates = torch.arange(shard.start, shard.start + shard.size)
        segments = torch.searchsorted(ends, coordinates, right=True).to(device)
        return _Layout(members, sizes, window, shard, gather_group, segments)

    def _new_window(
        self,
        dim: int,
        device: torch.device,
        dtype: torch.dtype,
        process_group: torch.distributed.ProcessGroup | None,
    ) -> SlidingWindow:
        settings = self._settings
        storage = None if settings.storage_dtype is None else getattr(torch, settings.storage_dtype)
        options: dict[str, Any] = {"device": device, "dtype": dtype, "storage_dtype": storage,
                                   "process_group": process_group,
                                   "relative_damp": settings.relative_damp}  # fmt: skip
        damp = 1e-6 if settings.damp is None else settings.damp  # unused when relative
        if settings.density is None:
            return SlidingWindowMFAC(dim, settings.num_grads, damp, **options)
        return SparseSlidingWindowMFAC(dim, settings.num_grads, damp, settings.density,
                                       error_feedback=settings.error_feedback, **options)  # fmt: skip

    def _fsdp_group(self, members: list[torch.Tensor]) -> torch.distributed.ProcessGroup | None:
        """The group FSDP2 shards the parameters over, or ``None`` for plain tensors."""
        shards = [row_shard(p) for p in members]
        if all(shard is None for shard in shards):
            return None
        if any(shard is None for shard in shards):
            raise ValueError("MFAC needs all of its parameters sharded by FSDP2, or none of them")
        groups = {shard.group for shard in shards if shard is not None}
        if len(groups) > 1:
            raise ValueError("MFAC needs all FSDP2 parameters sharded over one process group")
        group = groups.pop()
        if self.process_group is not None and self.process_group != group:
            raise ValueError(
                "process_group differs from the group FSDP2 shards the parameters over"
            )
        return group

    @property
    def window(self) -> SlidingWindow:
        """The inverse-Fisher estimator behind the optimiser (built once a parameter needs it)."""
        window = self._current_layout().window
        if window is None:
            raise RuntimeError(
                "MFAC has no window yet: no parameter required grad when it was built, and "
                "none has had a gradient at a step since"
            )
        return window

    # ----------------------------------------------------------------- the state
    def _state_key(self, layout: _Layout) -> str:
        """Where this rank's record lives in the first parameter's state."""
        rank, world = rank_and_world(self.process_group)
        if layout.window is not None:
            rank, world = layout.window.rank, layout.window.world_size
        return "mfac" if world == 1 else f"mfac_rank{rank}_of_{world}"

    def _record(self) -> dict[str, Any]:
        return self.state[self._params()[0]][self._state_key(self._current_layout())]

    def _member_indices(self, layout: _Layout) -> list[int]:
        """Where ``layout``'s members are in the flat list of every group's parameters."""
        index = {id(p): i for i, p in enumerate(self._params())}
        return [index[id(p)] for p in layout.members]

    def _complete(self, record: dict[str, Any], layout: _Layout) -> None:
        """Point ``record`` at the window's live state, and add the buffers it lacks."""
        window = layout.window
        if window is None:
            return
        record["window"] = window.state_dict()
        wanted = {
            "momentum": any(group["momentum"] for group in self.param_groups),
            "graft_exp_avg_sq": self._settings.graft in ("adam", "rmsprop", "adagrad"),
            "graft_exp_avg": self._settings.graft == "adam",
            "exp_avg": self._settings.prior == "adam",
            "exp_avg_sq": self._settings.prior == "adam",
        }
        for name in _BUFFERS:
            if wanted[name] and name not in record:
                record[name] = torch.zeros(window.dim, dtype=window.dtype, device=window.device)

    def _current_layout(self) -> _Layout:
        """The layout, rebuilt from the state after a load or a copy."""
        if self._layout is None:
            anchor = self.state[self._params()[0]]
            record = next(v for k, v in anchor.items() if k.startswith("mfac"))
            params = self._params()
            layout = self._new_layout([params[i] for i in record["members"]])
            if layout.window is not None:
                layout.window.load_state_dict(record["window"])
            self._layout = layout
            self._complete(record, layout)
        return self._layout

    def _grow(self, newcomers: list[torch.Tensor]) -> None:
        """Add parameters to the window: their coordinates are appended, zero in every stored
        gradient (and in the error, momentum and moment buffers)."""
        old = self._current_layout()
        if old.sharded or any(row_shard(p) is not None for p in newcomers):
            raise RuntimeError(
                "a parameter that was frozen when MFAC was built (or added since) has a "
                "gradient, and a sharded window cannot grow: build the optimiser after "
                "unfreezing it"
            )
        record = self._record()
        layout = self._new_layout(old.members + newcomers)
        assert layout.window is not None  # it spans the newcomers
        if old.window is not None:
            layout.window.grow_from(old.window)
        extra = layout.shard.size - old.shard.size
        for name in _BUFFERS:
            if name in record:
                record[name] = torch.cat([record[name], record[name].new_zeros(extra)])
        record["members"] = self._member_indices(layout)
        self._layout = layout
        self._complete(record, layout)

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        for saved in state_dict["param_groups"]:
            for key in _WINDOW_KEYS:
                if key in saved and saved[key] != self.defaults[key]:
                    raise ValueError(
                        f"cannot load a window with {key}={saved[key]!r} into one with "
                        f"{key}={self.defaults[key]!r}"
                    )
        super()._check_loadable(state_dict)
        anchor = state_dict["state"].get(state_dict["param_groups"][0]["params"][0], {})
        key = self._state_key(self._current_layout())
        if key not in anchor:
            found = sorted(name for name in anchor if str(name).startswith("mfac"))
            raise ValueError(
                f"the saved state has no {key!r} record (it has {found or 'none'}): a sharded "
                "MFAC resumes only on the same rank of the same number of ranks"
            )
        self._check_record(anchor[key])

    def _check_record(self, record: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless this optimiser can resume from ``record``."""
        params = self._params()
        members = [params[i] for i in record["members"]]
        layout = self._current_layout()
        if [id(p) for p in members] != [id(p) for p in layout.members]:
            layout = self._new_layout(members)
        if (record["window"] is None) != (layout.window is None):
            raise ValueError("the saved state and this optimiser disagree on having a window")
        if layout.window is not None:
            layout.window.check_state_dict(record["window"])
        for name in _BUFFERS:
            if name in record and tuple(record[name].shape) != (layout.shard.size,):
                raise ValueError(
                    f"saved {name} has shape {tuple(record[name].shape)}, expected "
                    f"({layout.shard.size},)"
                )

    def __getstate__(self) -> dict[str, Any]:
        if self._current_layout().sharded:
            raise TypeError(
                "a distributed MFAC cannot be pickled or deep-copied (its process group cannot); "
                "save its state_dict() on every rank instead"
            )
        return super().__getstate__()

    # ----------------------------------------------------------------- stepping
    def _step(self, params: list[torch.Tensor]) -> None:
        known = {id(p) for p in self._current_layout().members}
        newcomers = [p for p in params if id(p) not in known]
        if newcomers:
            if self.process_group is None:  # before the window grows: a refused step
                check_gradients(params)  # must leave everything as it was
            self._grow(newcomers)
        layout = self._current_layout()
        groups = self._member_groups()
        flat, has_grad = self._flat_gradient(groups)
        g = layout.shard.take(flat)
        counts = None  # each member's step count, this step's included
        if "adam" in (self._settings.graft, self._settings.prior):
            counts = self._step_counts(has_grad)
        update = self._precondition(g, counts, has_grad, groups, params)
        if counts is not None:
            layout.step_counts = counts
        if self._settings.graft is not None:
            self._graft(update, g, has_grad, groups, counts)
        if any(group["momentum"] for group in groups):
            update = self._apply_momentum(update, has_grad, groups)
        direction = all_gather_shards(update, layout.shard, layout.gather_group)
        start = 0
        for p, size, group, active in zip(layout.members, layout.sizes, groups, has_grad,
                                          strict=True):  # fmt: skip
            if active:
                target = real_view(local(p))
                piece = direction[start : start + size].view_as(target).to(target.dtype)
                target.add_(piece, alpha=-learning_rate(group))
            start += size

    def _precondition(
        self,
        g: torch.Tensor,
        counts: torch.Tensor | None,
        has_grad: list[bool],
        groups: list[dict[str, Any]],
        params: list[torch.Tensor],
    ) -> torch.Tensor:
        """Insert this step's row into the window and return ``u``: ``F⁻¹ g``, or with the
        prior ``λ F⁻¹ m̂``. The state is written once the window has taken the row."""
        record = self._record()
        if self._settings.prior is not None:
            assert counts is not None
            exp_avg, exp_avg_sq, m_hat, root = self._adam_prior(g, counts, has_grad, groups)
        try:
            # The window checks the row for NaN and Inf in the same host synchronisation as
            # its factor, and takes it out again if it must (agreeing over the ranks of a
            # sharded window): no separate check of the gradients, and no sync for it.
            if self._settings.prior is None:
                update = self.window.update_solve(g)
            else:
                self.window.update(g / root)
        except NonFiniteError:
            if self.process_group is None:  # name the parameter (under DDP sharding, the
                check_gradients(params)  # window names the shards)
            raise
        record["steps"] += 1
        record["window"] = self.window.state_dict()
        for p, active in zip(self._current_layout().members, has_grad, strict=True):
            if active:
                self.state[p]["step"] = self.state[p]["step"] + 1
        if self._settings.prior is None:
            return update
        record["exp_avg"], record["exp_avg_sq"] = exp_avg, exp_avg_sq
        # λ F⁻¹ m̂ = D^(-1/2) · λ (λI + (1/n) Σ wᵢwᵢᵀ)⁻¹ · D^(-1/2) m̂; m̂ and D come from
        # gradients the window's update found finite, and D ≥ ε > 0: no second check
        whitened = m_hat / root
        return self.window.solve(whitened, check_finite=False).mul_(self.window.damp).div_(root)

    def _member_groups(self) -> list[dict[str, Any]]:
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        return [group_of[id(p)] for p in self._current_layout().members]

    def _flat_gradient(self, groups: list[dict[str, Any]]) -> tuple[torch.Tensor, list[bool]]:
        """Gradients (with L2 terms) of the window's parameters as one vector, zeros where a
        parameter has none; and which have one."""
        layout = self._current_layout()
        dtype = self.window.dtype
        pieces, has_grad = [], []
        for p, size, group in zip(layout.members, layout.sizes, groups, strict=True):
            has_grad.append(p.grad is not None)
            if p.grad is None:
                pieces.append(torch.zeros(size, dtype=dtype, device=p.device))
                continue
            g = real_view(local(p.grad)).reshape(-1).to(dtype)
            if group["weight_decay"]:
                w = real_view(local(p.detach())).reshape(-1).to(dtype)
                g = g + group["weight_decay"] * w
            pieces.append(g)
        return torch.cat(pieces), has_grad

    # ----------------------------------------------------------------- per-coordinate maths
    def _per_member(
        self, values: list[float], dtype: torch.dtype, padding: float = 0.0
    ) -> torch.Tensor:
        """One value per member and ``padding`` for the padding, on the window's device:
        cached by value, since building it copies host data to the device, which on a GPU
        waits for everything queued (settings, and which members have a gradient: the same
        step after step)."""
        cache = self._current_layout().constants
        key = ("member", tuple(values), dtype, padding)
        if key not in cache:
            if len(cache) >= 32:  # settings that change every step (a schedule) do not pile up
                cache.clear()
            device = self._current_layout().segments.device
            cache[key] = torch.tensor([*values, padding], dtype=dtype, device=device)
        return cache[key]

    def _per_coordinate(
        self, values: list[float], dtype: torch.dtype, padding: float = 0.0
    ) -> torch.Tensor:
        """:meth:`_per_member` spread over this rank's shard, cached as well."""
        cache = self._current_layout().constants
        key = ("coordinate", tuple(values), dtype, padding)
        if key not in cache:
            cache[key] = self._per_member(values, dtype, padding)[self._current_layout().segments]
        return cache[key]

    def _beta(self, groups: list[dict[str, Any]], which: int, dtype: torch.dtype) -> torch.Tensor:
        """``betas[which]`` of each coordinate's group."""
        return self._per_coordinate([group["betas"][which] for group in groups], dtype)

    def _step_counts(self, has_grad: list[bool]) -> torch.Tensor:
        """Each member's step count, this step's included (and 0 for the padding), on the
        device: the counts before it are read from the ``step`` tensors (on the CPU) once
        per layout and load, and kept in ``layout.step_counts`` once the step is taken, so
        that no step copies counts to the device."""
        layout = self._current_layout()
        if layout.step_counts is None:
            counts = [float(self.state[p]["step"]) for p in layout.members]
            layout.step_counts = torch.tensor(
                [*counts, 0.0], dtype=torch.float64, device=layout.segments.device
            )
        return layout.step_counts + self._per_member([float(h) for h in has_grad], torch.float64)

    def _bias_corrected(
        self,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        counts: torch.Tensor,
        groups: list[dict[str, Any]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``m̂ = m / (1 − β₁ᵗ)`` and ``v̂ = v / (1 − β₂ᵗ)``, ``t`` each member's step count
        (no correction where ``t = 0``)."""
        corrected = []
        for which, moment in enumerate((exp_avg, exp_avg_sq)):
            beta = self._per_member([group["betas"][which] for group in groups], torch.float64)
            correction = torch.where(counts > 0, 1 - beta**counts, 1.0)
            corrected.append(moment / correction.to(moment.dtype)[self._current_layout().segments])
        return corrected[0], corrected[1]

    def _graft(
        self,
        update: torch.Tensor,
        g: torch.Tensor,
        has_grad: list[bool],
        groups: list[dict[str, Any]],
        counts: torch.Tensor | None,
    ) -> None:
        """Scale each member's part of ``update`` (in place) to the norm of the grafting
        optimiser's step for that member."""
        kind, record = self._settings.graft, self._record()
        step = g
        if kind != "sgd":
            active = self._per_coordinate([float(h) for h in has_grad], torch.bool)
            eps = self._per_coordinate([group["eps"] for group in groups], g.dtype)
            second = record["graft_exp_avg_sq"]
            if kind == "adagrad":
                second.add_(torch.where(active, g * g, 0.0))
            else:
                beta2 = self._beta(groups, 1, g.dtype)
                second.copy_(moving_average(second, g, beta2, active, square=True))
            numerator, denominator = g, second
            if kind == "adam":  # torch.optim.Adam's step: both moments, bias-corrected
                assert counts is not None
                first = record["graft_exp_avg"]
                first.copy_(moving_average(first, g, self._beta(groups, 0, g.dtype), active))
                numerator, denominator = self._bias_corrected(first, second, counts, groups)
            step = numerator / (denominator.sqrt() + eps)
        segments = self._current_layout().segments
        norms = graft_norms(update, step, segments, len(groups) + 1)  # members and padding
        all_reduce_sum(norms, self.window.process_group)
        direction, target = norms[0].sqrt(), norms[1].sqrt()
        scale = torch.where(direction > 0, target / direction, 0.0)
        update.mul_(scale.to(update.dtype)[segments])

    def _adam_prior(
        self,
        g: torch.Tensor,
        counts: torch.Tensor,
        has_grad: list[bool],
        groups: list[dict[str, Any]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adam's moments after this step (new tensors, for the state once the step is
        taken), ``m̂``, and ``D^(1/2)`` for ``D = √v̂ + ε`` (1 on the padding)."""
        record = self._record()
        active = self._per_coordinate([float(h) for h in has_grad], torch.bool)
        eps = self._per_coordinate([group["eps"] for group in groups], g.dtype, padding=1.0)
        exp_avg = moving_average(record["exp_avg"], g, self._beta(groups, 0, g.dtype), active)
        exp_avg_sq = moving_average(record["exp_avg_sq"], g, self._beta(groups, 1, g.dtype),
                                    active, square=True)  # fmt: skip
        m_hat, v_hat = self._bias_corrected(exp_avg, exp_avg_sq, counts, groups)
        return exp_avg, exp_avg_sq, m_hat, (v_hat.sqrt() + eps).sqrt()

    def _apply_momentum(
        self, update: torch.Tensor, has_grad: list[bool], groups: list[dict[str, Any]]
    ) -> torch.Tensor:
        """``v ← μ v + (1 − μ) u`` on this rank's shard, where the member has a gradient and
        ``μ > 0``; the update is ``v`` there, ``u`` elsewhere."""
        record = self._record()
        if "momentum" not in record:
            record["momentum"] = torch.zeros_like(update)
        momenta = [
            group["momentum"] if h else 0.0 for group, h in zip(groups, has_grad, strict=True)
        ]
        mu = self._per_coordinate(momenta, update.dtype)
        moving = mu > 0
        velocity = torch.where(
            moving, mu * record["momentum"] + (1 - mu) * update, record["momentum"]
        )
        record["momentum"] = velocity
        return torch.where(moving, velocity, update)


@dataclass
class _Layout:
    """How MFAC's parameters map onto its window, and the window."""

    members: list[torch.Tensor]  # the parameters the window spans, in order
    sizes: list[int]  # their numbers of (real) coordinates on this rank
    window: SlidingWindow | None
    shard: Shard  # this rank's part of the flat vector of the members
    gather_group: torch.distributed.ProcessGroup | None  # gathers the update (DDP sharding)
    segments: torch.Tensor  # the member of each coordinate of the shard
    # per-member and per-coordinate constants on the device (MFAC._per_member)
    constants: dict[tuple, torch.Tensor] = field(default_factory=dict)
    # each member's step count before this step, on the device (None: not read yet)
    step_counts: torch.Tensor | None = None

    @property
    def sharded(self) -> bool:
        return self.window is not None and self.window.process_group is not None
