r"""The M-FAC optimiser: preconditioning by the inverse empirical Fisher of recent gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
from ._nonfinite import check_nonfinite_policy, skip_step
from ._state import load_state_dict_exactly
from .adamw_core import check_gradients, grad_of, learning_rate

__all__ = ["GRAFTS", "MFAC", "WindowSettings"]

#: the optimisers whose per-tensor step norm ``graft`` can give M-FAC's direction
GRAFTS = ("sgd", "adam", "rmsprop", "adagrad")
# the group keys that belong to the one window, not to a group
_WINDOW_KEYS = (
    "num_grads",
    "damp",
    "relative_damp",
    "storage_dtype",
    "density",
    "error_feedback",
    "graft",
)
_STATE_FORMAT = 2
#: ρ when neither damping is given. Of 10², 10³ and 10⁴ for grafted M-FAC at its best
#: learning rate (docs/benchmarks.md): the best on the digits CNN (0.074 against 0.103 at
#: 10³) and within 0.006 nats of the best (10³) on the tiny Llama
DEFAULT_RELATIVE_DAMP = 1e4


@dataclass(frozen=True)
class WindowSettings:
    """The settings of MFAC's one gradient window (and its grafting), checked once."""

    num_grads: int
    damp: float | None
    relative_damp: float | None
    storage_dtype: str | None
    density: float | None
    error_feedback: bool
    graft: str | None

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

    @classmethod
    def from_defaults(cls, defaults: dict[str, Any]) -> WindowSettings:
        return cls(**{key: defaults[key] for key in _WINDOW_KEYS})


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _real(t: torch.Tensor) -> torch.Tensor:
    """``t`` as real numbers: a complex tensor as its (real, imaginary) pairs, a view."""
    return torch.view_as_real(t) if t.is_complex() else t


class MFAC(torch.optim.Optimizer):
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

    ``F⁻¹ g`` comes from a :class:`~secondorder.curvature.SlidingWindowMFAC` spanning the
    parameters, as one flat vector. ``lr``, ``momentum``, ``weight_decay`` and the grafting
    optimiser's ``betas`` and ``eps`` may differ per parameter group; everything in
    :class:`WindowSettings` belongs to the one window, and a group that sets another value
    of it is refused.

    **Damping.** ``damp`` is the paper's absolute ``λ``; ``relative_damp = ρ`` sets
    ``λ = ρ · (mean squared entry of the gradients in the window)``, recomputed whenever
    the window's small system is refactored (every step while it fills, then every
    ``num_grads`` steps), so that the same ``ρ`` means the same thing whatever the scale
    of the gradients (:class:`~secondorder.curvature.gram_system.GramSystem`). The
    window's own eigenvalues are at most ``d`` times that mean (``d`` coordinates), so
    ``ρ`` well below ``d`` preconditions and ``ρ`` above ``d`` leaves ``F⁻¹g ≈ g/λ``.

    **Defaults** (chosen by the comparison in docs/benchmarks.md, "The MFAC optimiser"):
    ``graft="adam"``, ``relative_damp=1e4``, ``num_grads=64``, ``momentum=0`` and
    ``lr=1e-3``, Adam's default rate, since grafting gives each tensor Adam's step norm
    (tuned, grafted M-FAC's best rate was 1 to 5 times AdamW's). Grafted, M-FAC matched
    tuned AdamW on a tiny Llama at 300 steps (2.048 ± 0.066 against 2.051 ± 0.022
    nats/byte held-out) where plain M-FAC lost by 0.33, and trailed it by 0.02 to 0.05 at
    1,000 steps; 16 gradients did worse than 64 there, and 256 no better. ``graft=None, damp=1e-6, num_grads=1024`` is the paper's M-FAC.

    **Sparse window.** With ``density``, the window keeps only the top ``⌈density · d⌉``
    entries of each gradient, with error feedback (EFCP, Modoranu et al. 2023; a
    :class:`~secondorder.curvature.SparseSlidingWindowMFAC`): ``u = F̂⁻¹ c`` for the
    compressed accumulator ``c`` of ``g + e`` replaces ``F⁻¹ g``, and the window takes about
    ``8 · density · num_grads`` bytes per parameter instead of ``4 · num_grads`` (1% keeps
    a 40th at ``num_grads = 1024``).

    **Grafting** (Agarwal et al. 2020; Distributed Shampoo's ``grafting_config``): M-FAC's
    direction for each parameter tensor, with the norm of another optimiser's step for that
    tensor, ``s_p`` above, computed from the same gradient ``g + weight_decay · w``:

    - ``"sgd"``: ``s = g``;
    - ``"adam"``: ``torch.optim.Adam``'s step, ``s = m̂ / (√v̂ + ε)`` with
      ``m ← β₁ m + (1 − β₁) g``, ``v ← β₂ v + (1 − β₂) g²`` and their bias corrections
      ``m̂ = m / (1 − β₁ᵗ)``, ``v̂ = v / (1 − β₂ᵗ)``, ``t`` counting this tensor's steps.
      Distributed Shampoo grafts Adam's second moment only; with the first moment too the
      tiny Llama of the benchmarks reached 2.135 nats/byte where the second moment alone
      reached 2.627 (same lr, damping and seed, ``MFAC`` momentum 0; docs/benchmarks.md),
      so the norm here is that of Adam's whole step;
    - ``"rmsprop"``: ``s = g / (√v + ε)``, the second moment only, not bias-corrected;
    - ``"adagrad"``: ``s = g / (√(Σ g²) + ε)``.

    The grafting optimiser's moments are its own: M-FAC's ``momentum`` applies after
    grafting, to the grafted direction. Under a sharded window the norms need one
    all-reduce of two numbers per tensor.

    **Which parameters.** The window spans every parameter that requires grad when the
    optimiser is built. A parameter frozen then (or added later with ``add_param_group``)
    joins the window at the first step where it has a gradient: the window grows, its
    stored gradients being zero there (not possible for a sharded window, which raises
    instead). A parameter of the window whose ``.grad`` is ``None`` enters as zeros and is
    neither updated nor decayed; its momentum and grafting moments are left as they were.
    A step where no parameter has a gradient does nothing. A gradient with NaN or Inf
    raises :class:`~secondorder.errors.NonFiniteError` before anything changes. Complex
    parameters are handled as pairs of real numbers (``torch.view_as_real``), as
    ``torch.optim.AdamW`` does.

    The window, the momentum and the grafting moments are float32 (float64 if every
    parameter is float64), whatever the parameters' dtype, so bf16 models work. They
    live in ``self.state`` of the first parameter (``state_dict()`` loads with
    ``weights_only=True`` and through ``torch.distributed.checkpoint``), under a key
    naming the rank and world size, since under sharding each rank holds its own part.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimiser.
        lr: learning rate (with ``graft``, on the grafting optimiser's scale).
        num_grads: gradients in the window (512 to 1024 in the paper; 64 by default).
        damp: absolute Fisher damping ``λ > 0`` (1e-5 to 1e-6 in the paper). Without
            ``damp`` or ``relative_damp``, ``relative_damp=1e4``.
        momentum: ``μ`` in ``[0, 1)``.
        weight_decay: L2 coefficient added to the gradient.
        storage_dtype: dtype of the gradient window; ``torch.bfloat16`` halves its memory.
        process_group: under data parallelism (DDP), shard the window over the ranks of
            this group: each rank keeps the last ``num_grads`` gradients only for its
            contiguous ``1/world`` of the flat coordinates, so the window's memory per
            rank is ``num_grads · d / world``. A step all-reduces ``num_grads`` partial dot
            products (independent of ``d``), solves the same small system on every rank,
            forms this rank's shard of the update and all-gathers the update (``d``
            numbers, as much as DDP's gradient all-reduce). The gradients must be the same
            on every rank, as DDP leaves them. ``state_dict()`` then holds this rank's
            shard: save one per rank and resume on the same number of ranks. With
            ``density``, each rank keeps the top entries of its own shard (blockwise
            top-k, not global).
        relative_damp: ``ρ > 0`` for damping relative to the gradients' scale (instead of
            ``damp``; give at most one of the two).
        density: ``None`` for the dense window; a number in ``(0, 1]`` for the sparse window
            keeping that fraction of each gradient (the reference uses 0.01).
        error_feedback: with ``density``, carry what compression drops into the next step
            (EFCP); ``False`` is plain top-k, an ablation.
        graft: the optimiser whose per-tensor step norms M-FAC takes: ``"adam"`` (the
            default), ``"sgd"``, ``"rmsprop"`` or ``"adagrad"``; ``None`` for the paper's
            M-FAC, whose step is ``lr · F⁻¹g`` itself.
        betas: the grafting optimiser's ``(β₁, β₂)`` (``"adam"`` uses both, ``"rmsprop"``
            ``β₂``).
        eps: the grafting optimiser's ``ε``.
        nonfinite: ``"raise"`` (NaN or Inf in a gradient raises, nothing changed) or
            ``"skip"`` (the step is skipped, counted in ``state[first parameter]
            ["skipped_steps"]`` and warned about, as ``torch.amp.GradScaler`` does). Not
            ``"skip_on_device"``, which the AdamW-core optimisers offer (see
            :mod:`secondorder.optim._nonfinite` for why).

    Under FSDP2 (parameters sharded by ``fully_shard``) no ``process_group`` is needed: each
    rank's window covers the rows of every weight that FSDP2 gave it, the dot products are
    all-reduced over the parameters' group, and each rank updates its own rows, so nothing
    is gathered at all.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        num_grads: int = 64,
        damp: float | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        storage_dtype: torch.dtype | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        *,
        relative_damp: float | None = None,
        density: float | None = None,
        error_feedback: bool = True,
        graft: str | None = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        nonfinite: str = "raise",
    ) -> None:
        if nonfinite == "skip_on_device":
            raise ValueError(
                "MFAC does not support nonfinite='skip_on_device': inserting a gradient into "
                "its window advances the ring's bookkeeping on the host and updates the n × n "
                "factor with decisions taken there (refactor or not), which a mask on the "
                "device cannot undo; and its step already reads the host once (the window's "
                "verdict), so nonfinite='skip' skips at no extra cost"
            )
        self.nonfinite = check_nonfinite_policy(nonfinite, ("raise", "skip"))
        if damp is None and relative_damp is None:
            relative_damp = DEFAULT_RELATIVE_DAMP
        settings = WindowSettings(
            num_grads=num_grads,
            damp=damp,
            relative_damp=relative_damp,
            storage_dtype=_dtype_name(storage_dtype),
            density=density,
            error_feedback=error_feedback,
            graft=graft,
        )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "betas": tuple(betas),
            "eps": eps,
            **{key: getattr(settings, key) for key in _WINDOW_KEYS},
        }
        self._process_group = process_group
        self._settings = settings
        super().__init__(params, defaults)
        for p in self._all_params():
            if p.device.type == "meta":
                raise ValueError(
                    "MFAC cannot step parameters on the meta device: materialise them first "
                    "(e.g. model.to_empty(device=...)) and build the optimiser then"
                )
        self._layout_ = self._layout([p for p in self._all_params() if p.requires_grad])
        self._steps = 0
        self._momentum: torch.Tensor | None = None
        self._graft_state: dict[str, torch.Tensor] = {}
        self._allocate_buffers()
        self._publish_state()

    # ----------------------------------------------------------------- groups and settings
    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its parameters join the window at their first step with a gradient."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except (ValueError, TypeError):
            self.param_groups.pop()  # a refused group leaves the optimiser as it was
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        lr = learning_rate(group)
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {group['lr']}")
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
        if not group["weight_decay"] >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
        beta1, beta2 = group["betas"]
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {group['betas']!r}")
        if not group["eps"] >= 0:
            raise ValueError(f"eps must be >= 0, got {group['eps']!r}")
        for key in _WINDOW_KEYS:
            if group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key}={group[key]!r} in a parameter group: {key} belongs to MFAC's one "
                    f"window ({key}={self.defaults[key]!r}); set it on the optimiser"
                )

    # ----------------------------------------------------------------- the window
    def _layout(self, members: list[torch.Tensor]) -> _Layout:
        """A new, empty window spanning ``members`` (in this order), and how they map onto it."""
        sizes = [_real(local(p)).numel() for p in members]
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
            shard = Shard(*rank_and_world(self._process_group), sum(sizes))
            gather_group = window_group = self._process_group
        else:  # FSDP2: the window spans this rank's rows, nothing is gathered
            shard, gather_group, window_group = Shard(0, 1, sum(sizes)), None, fsdp_group
        settings = self._settings
        options: dict[str, Any] = {
            "device": device,
            "dtype": statistics_dtype(*(p.dtype.to_real() for p in members)),
            "storage_dtype": None
            if settings.storage_dtype is None
            else getattr(torch, settings.storage_dtype),
            "process_group": window_group,
            "relative_damp": settings.relative_damp,
        }
        damp = 1e-6 if settings.damp is None else settings.damp  # unused when relative
        window = (
            SlidingWindowMFAC(shard.size, settings.num_grads, damp, **options)
            if settings.density is None
            else SparseSlidingWindowMFAC(
                shard.size,
                settings.num_grads,
                damp,
                settings.density,
                error_feedback=settings.error_feedback,
                **options,
            )
        )
        # the member each coordinate of this rank's shard belongs to (padding: len(members))
        ends = torch.tensor(sizes).cumsum(0)
        coordinates = torch.arange(shard.start, shard.start + shard.size)
        segments = torch.searchsorted(ends, coordinates, right=True).to(device)
        return _Layout(members, sizes, window, shard, gather_group, segments)

    def _fsdp_group(self, members: list[torch.Tensor]):
        """The group FSDP2 shards the parameters over, or ``None`` for plain tensors."""
        shards = [row_shard(p) for p in members]
        if all(shard is None for shard in shards):
            return None
        if any(shard is None for shard in shards):
            raise ValueError("MFAC needs all of its parameters sharded by FSDP2, or none of them")
        groups = {shard.group for shard in shards if shard is not None}  # all of them, as checked
        if len(groups) > 1:
            raise ValueError("MFAC needs all FSDP2 parameters sharded over one process group")
        group = groups.pop()
        if self._process_group is not None and self._process_group != group:
            raise ValueError(
                "process_group differs from the group FSDP2 shards the parameters over"
            )
        return group

    @property
    def window(self) -> SlidingWindow:
        """The inverse-Fisher estimator behind the optimiser (built once a parameter needs it)."""
        if self._layout_.window is None:
            raise RuntimeError(
                "MFAC has no window yet: no parameter required grad when it was built, and "
                "none has had a gradient at a step since"
            )
        return self._layout_.window

    def _allocate_buffers(self) -> None:
        """The momentum (if a group uses it) and grafting buffers, zero, allocated up front so
        that a fresh optimiser's state has every tensor a saved one has (which is what
        ``torch.distributed.checkpoint`` loads into)."""
        window = self._layout_.window
        if window is None:
            return
        zeros = torch.zeros(window.dim, dtype=window.dtype, device=window.device)
        if self._momentum is None and any(group["momentum"] for group in self.param_groups):
            self._momentum = zeros.clone()
        if self._settings.graft in ("adam", "rmsprop", "adagrad"):
            self._graft_state.setdefault("exp_avg_sq", zeros.clone())
        if self._settings.graft == "adam":
            self._graft_state.setdefault("exp_avg", zeros.clone())

    def _grow(self, newcomers: list[torch.Tensor]) -> None:
        """Add parameters to the window: their coordinates are appended, zero in every stored
        gradient (and in the error, momentum and grafting buffers)."""
        old = self._layout_
        if old.sharded or any(row_shard(p) is not None for p in newcomers):
            raise RuntimeError(
                "a parameter that was frozen when MFAC was built (or added since) has a "
                "gradient, and a sharded window cannot grow: build the optimiser after "
                "unfreezing it"
            )
        layout = self._layout(old.members + newcomers)
        extra = layout.shard.size - old.shard.size
        if old.window is not None:
            assert layout.window is not None  # it spans the newcomers
            layout.window.load_state_dict(_widened(old.window.state_dict(), extra, layout.window))
        self._layout_ = layout
        if self._momentum is not None:
            self._momentum = torch.cat([self._momentum, self._momentum.new_zeros(extra)])
        for name, buffer in self._graft_state.items():
            self._graft_state[name] = torch.cat([buffer, buffer.new_zeros(extra)])
        self._allocate_buffers()  # the first members of a window that did not exist

    # ----------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._step()
        except NonFiniteError as error:
            if self.nonfinite == "raise":
                raise
            skip_step(self, error)
        return loss

    def _step(self) -> None:
        with_grad = [p for p in self._all_params() if p.grad is not None]
        if not with_grad:
            return
        for p in with_grad:
            if grad_of(p).is_sparse:
                raise RuntimeError("MFAC does not support sparse gradients")
        known = {id(p) for p in self._layout_.members}
        newcomers = [p for p in with_grad if id(p) not in known]
        if newcomers:
            if self._process_group is None:  # before the window grows: a refused step
                check_gradients(with_grad)  # must leave everything as it was
            self._grow(newcomers)
        layout = self._layout_
        groups = self._member_groups()
        flat, has_grad = self._flat_gradient(groups)
        g = layout.shard.take(flat)
        try:
            # The window checks g for NaN and Inf in the same host synchronisation as its
            # factor, and takes the gradient out again if it must (agreeing over the ranks
            # of a sharded window): no separate check of the gradients, and no sync for it.
            update = self.window.update_solve(g)
        except NonFiniteError:
            if self._process_group is None:  # name the parameter, as before (under DDP
                check_gradients(with_grad)  # sharding, the window names the shards)
            raise
        self._steps += 1
        for p, active in zip(layout.members, has_grad, strict=True):
            if active:
                state = self.state[p]
                state["step"] = state.get("step", torch.tensor(0.0)) + 1
        if self._settings.graft is not None:
            self._graft(update, g, has_grad, groups)
        if any(group["momentum"] for group in groups):
            update = self._apply_momentum(update, has_grad, groups)
        direction = all_gather_shards(update, layout.shard, layout.gather_group)
        start = 0
        for p, size, group, active in zip(
            layout.members, layout.sizes, groups, has_grad, strict=True
        ):
            if active:
                target = _real(local(p))
                piece = direction[start : start + size].view_as(target).to(target.dtype)
                target.add_(piece, alpha=-learning_rate(group))
            start += size

    def _member_groups(self) -> list[dict[str, Any]]:
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        return [group_of[id(p)] for p in self._layout_.members]

    def _flat_gradient(self, groups: list[dict[str, Any]]) -> tuple[torch.Tensor, list[bool]]:
        """Gradients (with L2 terms) of the window's parameters as one vector, zeros where a
        parameter has none; and which have one."""
        layout = self._layout_
        dtype = self.window.dtype
        pieces, has_grad = [], []
        for p, size, group in zip(layout.members, layout.sizes, groups, strict=True):
            if p.grad is None:
                pieces.append(torch.zeros(size, dtype=dtype, device=p.device))
                has_grad.append(False)
                continue
            has_grad.append(True)
            g = _real(local(p.grad)).reshape(-1).to(dtype)
            if group["weight_decay"]:
                w = _real(local(p.detach())).reshape(-1).to(dtype)
                g = g + group["weight_decay"] * w
            pieces.append(g)
        return torch.cat(pieces), has_grad

    def _per_member(self, values: list[float], dtype: torch.dtype) -> torch.Tensor:
        """One value per member and a zero for the padding, on the window's device: cached by
        value, since building it copies host data to the device, which on a GPU waits for
        everything queued (the values are settings, and which members have a gradient: the
        same step after step)."""
        cache = self._layout_.constants
        key = ("member", tuple(values), dtype)
        if key not in cache:
            if len(cache) >= 32:  # settings that change every step (a schedule) do not pile up
                cache.clear()
            device = self._layout_.segments.device
            cache[key] = torch.tensor([*values, 0.0], dtype=dtype, device=device)
        return cache[key]

    def _per_coordinate(self, values: list[float], dtype: torch.dtype) -> torch.Tensor:
        """One value per member, spread over this rank's shard (zero on the padding); cached
        as :meth:`_per_member`."""
        cache = self._layout_.constants
        key = ("coordinate", tuple(values), dtype)
        if key not in cache:
            cache[key] = self._per_member(values, dtype)[self._layout_.segments]
        return cache[key]

    def _step_counts(self, has_grad: list[bool]) -> torch.Tensor:
        """Each member's step count, this step's included (and 0 for the padding), on the
        device: read from the ``step`` tensors (on the CPU) once per layout and load, then
        advanced with the members that have a gradient, so that no step copies counts to
        the device. Called once per step."""
        layout = self._layout_
        if layout.step_counts is None:
            counts = [float(self.state[p]["step"]) for p in layout.members]
            layout.step_counts = torch.tensor(
                [*counts, 0.0], dtype=torch.float64, device=layout.segments.device
            )
        else:
            layout.step_counts.add_(self._per_member([float(h) for h in has_grad], torch.float64))
        return layout.step_counts

    def _bias_correction(
        self, counts: torch.Tensor, groups: list[dict[str, Any]], which: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """``1 − βᵗ`` per coordinate (1 where ``t = 0``) for ``β = betas[which]`` of each
        member's group and ``t`` its step count."""
        beta = self._per_member([group["betas"][which] for group in groups], torch.float64)
        corrections = torch.where(counts > 0, 1 - beta**counts, 1.0)
        return corrections.to(dtype)[self._layout_.segments]

    def _graft(
        self,
        update: torch.Tensor,
        g: torch.Tensor,
        has_grad: list[bool],
        groups: list[dict[str, Any]],
    ) -> None:
        """Scale each member's part of ``update`` (in place) to the norm of the grafting
        optimiser's step for that member (the maths is in the class docstring)."""
        kind = self._settings.graft
        step = g
        if kind != "sgd":
            active = self._per_coordinate([float(h) for h in has_grad], torch.bool)
            eps = self._per_coordinate([group["eps"] for group in groups], g.dtype)
            second = self._graft_state["exp_avg_sq"]
            if kind == "adagrad":
                second.add_(torch.where(active, g * g, 0.0))
            else:
                beta2 = self._per_coordinate([group["betas"][1] for group in groups], g.dtype)
                second.copy_(torch.where(active, beta2 * second + (1 - beta2) * g * g, second))
            numerator, denominator = g, second
            if kind == "adam":  # torch.optim.Adam's step: both moments, bias-corrected
                first = self._graft_state["exp_avg"]
                beta1 = self._per_coordinate([group["betas"][0] for group in groups], g.dtype)
                first.copy_(torch.where(active, beta1 * first + (1 - beta1) * g, first))
                counts = self._step_counts(has_grad)
                numerator = first / self._bias_correction(counts, groups, 0, g.dtype)
                denominator = second / self._bias_correction(counts, groups, 1, g.dtype)
            step = numerator / (denominator.sqrt() + eps)
        count = len(groups) + 1  # the members, and the padding
        segments = self._layout_.segments
        norms = torch.zeros(2, count, dtype=torch.float64, device=update.device)
        norms[0].index_add_(0, segments, update.double().square())
        norms[1].index_add_(0, segments, step.double().square())
        all_reduce_sum(norms, self.window.process_group)
        direction, target = norms[0].sqrt(), norms[1].sqrt()
        scale = torch.where(direction > 0, target / direction, 0.0)
        update.mul_(scale.to(update.dtype)[segments])

    def _apply_momentum(
        self, update: torch.Tensor, has_grad: list[bool], groups: list[dict[str, Any]]
    ) -> torch.Tensor:
        """``v ← μ v + (1 − μ) u`` on this rank's shard, where the member has a gradient and
        ``μ > 0``; the update is ``v`` there, ``u`` elsewhere."""
        if self._momentum is None:
            self._momentum = torch.zeros_like(update)
        mu = self._per_coordinate(
            [group["momentum"] if h else 0.0 for group, h in zip(groups, has_grad, strict=True)],
            update.dtype,
        )
        moving = mu > 0
        velocity = torch.where(moving, mu * self._momentum + (1 - mu) * update, self._momentum)
        self._momentum = velocity
        return torch.where(moving, velocity, update)

    # ----------------------------------------------------------------- state
    def _state_key(self, layout: _Layout | None = None) -> str:
        """Where this rank's record lives in the first parameter's state."""
        layout = self._layout_ if layout is None else layout
        rank, world = rank_and_world(self._process_group)
        if layout.window is not None:
            rank, world = layout.window.rank, layout.window.world_size
        return "mfac" if world == 1 else f"mfac_rank{rank}_of_{world}"

    def _anchor(self) -> torch.Tensor:
        return self.param_groups[0]["params"][0]

    def _publish_state(self) -> None:
        """Put what MFAC keeps into ``self.state`` of the first parameter: tensors and plain
        values only, references (no copies). Done when built, loaded, saved and copied:
        between those, the record may refer to buffers a step has since replaced."""
        layout = self._layout_
        index = {id(p): i for i, p in enumerate(self._all_params())}
        record: dict[str, Any] = {
            "format": _STATE_FORMAT,
            "steps": self._steps,
            "members": [index[id(p)] for p in layout.members],
            "window": None if layout.window is None else layout.window.state_dict(),
        }
        if self._momentum is not None:
            record["momentum"] = self._momentum
        for name, buffer in self._graft_state.items():
            record[f"graft_{name}"] = buffer
        for p in self._all_params():  # torch.distributed.checkpoint wants state for each
            self.state[p].setdefault("step", torch.tensor(0.0))
        self.state[self._anchor()][self._state_key()] = record

    def state_dict(self) -> dict[str, Any]:
        self._publish_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (or by the first release, whose
        ``state["mfac"]`` format is converted); the next step is bit-identical.

        Everything is checked before anything changes: a refused load leaves the optimiser
        exactly as it was."""
        state_dict = _convert_first_release(state_dict, self)
        layout, record = self._check_saved(state_dict)
        load_state_dict_exactly(self, state_dict)
        layout.step_counts = None  # the step counts come from the loaded state
        self._layout_ = layout
        if layout.window is not None:
            layout.window.load_state_dict(record["window"])
        self._restore_buffers(record)

    def _check_saved(self, state_dict: dict[str, Any]) -> tuple[_Layout, dict[str, Any]]:
        """The layout the saved state needs and this rank's record, after checking that they
        fit this optimiser; raises ``ValueError`` and changes nothing."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"])
            for a, b in zip(saved_groups, self.param_groups, strict=True)
        ):
            raise ValueError("the saved state has other parameter groups than this optimiser")
        for saved in saved_groups:
            for key in _WINDOW_KEYS:
                if key in saved and saved[key] != self.defaults[key]:
                    raise ValueError(
                        f"cannot load a window with {key}={saved[key]!r} into one with "
                        f"{key}={self.defaults[key]!r}"
                    )
            self._validate_group({**self.defaults, **saved})
        records = state_dict["state"].get(saved_groups[0]["params"][0], {})
        key = self._state_key()
        if key not in records:
            found = sorted(name for name in records if name.startswith("mfac"))
            raise ValueError(
                f"the saved state has no {key!r} record (it has {found or 'none'}): a sharded "
                "MFAC resumes only on the same rank of the same number of ranks"
            )
        record = records[key]
        if record.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown MFAC state format {record.get('format')!r}")
        params = self._all_params()
        members = [params[i] for i in record["members"]]
        same = [id(p) for p in members] == [id(p) for p in self._layout_.members]
        layout = self._layout_ if same else self._layout(members)
        if (record["window"] is None) != (layout.window is None):
            raise ValueError("the saved state and this optimiser disagree on having a window")
        if layout.window is not None:
            layout.window.check_state_dict(record["window"])
        for name in ("momentum", "graft_exp_avg_sq"):
            if name in record and tuple(record[name].shape) != (layout.shard.size,):
                raise ValueError(
                    f"saved {name} has shape {tuple(record[name].shape)}, expected "
                    f"({layout.shard.size},)"
                )
        return layout, record

    def _restore_buffers(self, record: dict[str, Any]) -> None:
        window = self._layout_.window
        device = None if window is None else window.device
        self._steps = int(record["steps"])
        momentum = record.get("momentum")
        self._momentum = None if momentum is None else momentum.to(device, copy=True)
        self._graft_state = {
            name.removeprefix("graft_"): value.to(device, copy=True)
            for name, value in record.items()
            if name.startswith("graft_")
        }
        self._publish_state()

    def __getstate__(self) -> dict[str, Any]:
        if self._process_group is not None or self._layout_.sharded:
            raise TypeError(
                "a distributed MFAC cannot be pickled or deep-copied (its process group cannot); "
                "save its state_dict() on every rank instead"
            )
        self._publish_state()
        return {**super().__getstate__(), "nonfinite": self.nonfinite}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "defaults" not in state:  # torch's load_state_dict, which MFAC's finishes itself
            return
        self._process_group = None
        self._settings = WindowSettings.from_defaults(self.defaults)
        record = self.state[self._anchor()]["mfac"]
        params = self._all_params()
        self._layout_ = self._layout([params[i] for i in record["members"]])
        if self._layout_.window is not None:
            self._layout_.window.load_state_dict(record["window"])
        self._restore_buffers(record)


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
    # each member's step count on the device, for Adam's bias correction (None: not read yet)
    step_counts: torch.Tensor | None = None

    @property
    def sharded(self) -> bool:
        return self.window is not None and self.window.process_group is not None


def _widened(saved: dict[str, Any], extra: int, window: SlidingWindow) -> dict[str, Any]:
    """A window's ``state_dict`` with ``extra`` zero coordinates appended to every gradient."""
    widened = {**saved, "dim": saved["dim"] + extra}
    if saved.get("kind", "dense") == "dense":
        grads = saved["grads"]
        widened["grads"] = torch.cat([grads, grads.new_zeros(grads.shape[0], extra)], dim=1)
        return widened
    k = window.state_dict()["k"]
    for name in ("values", "indices"):  # rows keep their entries, padded with zeros at 0
        rows = saved[name]
        widened[name] = torch.cat([rows, rows.new_zeros(rows.shape[0], k - rows.shape[1])], dim=1)
    widened["error"] = torch.cat([saved["error"], saved["error"].new_zeros(extra)])
    widened["k"] = k
    return widened


def _convert_first_release(state_dict: dict[str, Any], optimizer: MFAC) -> dict[str, Any]:
    """A state saved by the first release (``state["mfac"] = {steps, window, momentum}``, the
    window over the parameters that required grad) in the current format."""
    old = state_dict["state"].get("mfac")
    if old is None:
        return state_dict
    if not isinstance(old, dict) or not {"steps", "window"} <= old.keys():
        raise ValueError("state['mfac'] is not an MFAC state saved by the first release")
    members = [i for i, p in enumerate(optimizer._all_params()) if p.requires_grad]
    window = old["window"]
    record = {"format": _STATE_FORMAT, "steps": old["steps"], "members": members, "window": window}
    if old.get("momentum") is not None:
        record["momentum"] = old["momentum"]
    world, rank = window.get("world_size", 1), window.get("rank", 0)
    key = "mfac" if world == 1 else f"mfac_rank{rank}_of_{world}"
    state = {k: v for k, v in state_dict["state"].items() if k != "mfac"}
    state[state_dict["param_groups"][0]["params"][0]] = {key: record}
    settings = {k: optimizer.defaults[k] for k in ("betas", "eps", *_WINDOW_KEYS)}
    groups = [{**settings, **group} for group in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}
