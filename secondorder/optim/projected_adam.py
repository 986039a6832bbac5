r"""One projected-Adam step for the whole low-rank family (GaLoreAdamW, NaturalGaLore, DCTAdamW).

For a weight ``W`` with gradient ``G`` in a group with a ``rank``, at step ``t``:

.. math::

    X &= G \text{ or } G^\top \quad \text{(the side compressed, see below; conv weights as } out \times in\,k_h k_w)\\
    P &\leftarrow \text{projector.refresh}(X) \quad \text{when } (t - 1) \bmod \text{update\_proj\_gap} = 0\\
    a &= \text{precondition}(X P) \quad (\text{identity here; NaturalGaLore: } F^{-1} X P)\\
    m &\leftarrow \beta_1 m + (1 - \beta_1) a, \qquad v \leftarrow \beta_2 v + (1 - \beta_2) a^2\\
    W &\leftarrow (1 - \text{lr} \cdot \text{wd})\, W
        - \frac{\text{lr}}{1 - \beta_1^t} \cdot \text{scale} \cdot
          \frac{m}{\sqrt{v / (1 - \beta_2^t)} + \epsilon} P^\top

so the Adam moments ``m, v`` live in the ``rows × r`` projected space. Groups without a
``rank`` (and 1-D parameters such as biases and norms, in any group) take the plain AdamW
step, the same arithmetic as ``torch.optim.AdamW``.

Sides (GaLore's ``proj_type``): ``"std"`` compresses the smaller dimension (right when
``rows ≥ cols``), ``"reverse_std"`` the larger, ``"right"`` / ``"left"`` always that side.

When the basis changes from ``P_old`` to ``P_new``, ``on_refresh`` decides what happens
to the moments: ``"keep"`` leaves them as they are (GaLore's and the DCT reference's
default: they then hold coordinates of the old basis), ``"rotate"`` carries them into the
new basis with ``R = P_oldᵀ P_new``: ``m ← m R`` (exact when the old moment lies in the
new span) and ``v ← v (R ∘ R)`` (exact when ``R`` is a partial permutation, as for the DCT
projector; for the SVD, exact for uncorrelated coordinates and nonnegative always).

Differences from ``galore_torch.GaLoreAdamW``, on purpose: the arithmetic is
``torch.optim.AdamW``'s (weight decay before the update, ``ε`` added after the bias
correction of ``√v``; GaLore decays after the update and adds ``ε`` before), so a group
without ``rank`` *is* AdamW; moments are float32 (float64 for float64 weights) for any
weight dtype; a rank larger than the compressed dimension is an error, not a silent
clamp; conv weights are reshaped to matrices instead of GaLore's broken Tucker path.

Data parallelism: under DDP ``process_group`` broadcasts each new basis from the group's
first rank; under FSDP2 each rank steps its own rows (docs/guides/distributed.md says what
each side of the projection communicates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from .._checks import check_positive_int
from .._common import statistics_dtype
from .._distributed import (
    RowShard,
    all_reduce_sum,
    broadcast_from_first,
    is_sharded,
    local,
    row_shard,
)
from .adamw_core import AdamWCore, Prepared
from .base import check_shapes, learning_rate
from .functional import add_scaled_, decoupled_decay_, written
from .projectors import Projector, Side, orient, rotation

__all__ = ["LowRankConfig", "ProjectedAdam"]

ProjType = Literal["std", "reverse_std", "left", "right"]
OnRefresh = Literal["keep", "rotate"]
_PROJ_TYPES = ("std", "reverse_std", "left", "right")
_ON_REFRESH = ("keep", "rotate")


@dataclass(frozen=True)
class LowRankConfig:
    """The low-rank settings of one parameter group (GaLore's group keys, plus ``on_refresh``)."""

    rank: int
    update_proj_gap: int = 200
    scale: float = 1.0
    proj_type: ProjType = "std"
    on_refresh: OnRefresh = "rotate"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        check_positive_int(self.update_proj_gap, "update_proj_gap")
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        if self.proj_type not in _PROJ_TYPES:
            raise ValueError(f"proj_type must be one of {_PROJ_TYPES}, got {self.proj_type!r}")
        if self.on_refresh not in _ON_REFRESH:
            raise ValueError(f"on_refresh must be one of {_ON_REFRESH}, got {self.on_refresh!r}")

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> LowRankConfig | None:
        """The group's settings, or ``None`` for a plain AdamW group (no ``rank``)."""
        if group.get("rank") is None:
            return None
        return cls(
            rank=group["rank"],
            update_proj_gap=group["update_proj_gap"],
            scale=group["scale"],
            proj_type=group["proj_type"],
            on_refresh=group["on_refresh"],
        )

    def side(self, rows: int, cols: int) -> Side:
        """Which side of a ``rows × cols`` matrix is compressed."""
        return compressed_side(self.proj_type, rows, cols)


def compressed_side(proj_type: str, rows: int, cols: int) -> Side:
    """Which side of a ``rows × cols`` matrix GaLore's ``proj_type`` compresses."""
    if proj_type in ("left", "right"):
        return proj_type  # type: ignore[return-value]
    smaller_is_cols = rows >= cols
    if proj_type == "std":
        return "right" if smaller_is_cols else "left"
    return "left" if smaller_is_cols else "right"


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A weight or gradient as the matrix it acts as: ``out × (everything else)``."""
    return t.reshape(t.shape[0], -1)


class ProjectedAdam(AdamWCore):
    r"""AdamW whose moments live in a rank-``r`` projection of each weight matrix.

    It claims the matrix (and conv) weights of groups with a ``rank`` from the
    :class:`~secondorder.optim.adamw_core.AdamWCore`, which steps everything else by AdamW.
    Subclasses choose the :class:`~secondorder.optim.projectors.Projector` and may
    precondition the projected gradient (:meth:`_precondition`). The maths is in the module
    docstring.

    Args:
        params: parameters or groups. A group with ``rank`` is low-rank and may set
            ``update_proj_gap``, ``scale``, ``proj_type`` and ``on_refresh``.
        projector: how each basis is chosen.
        lr, betas, eps, weight_decay: as for AdamW (decoupled weight decay).
        correct_bias: Adam's bias correction (GaLore's flag).
        rank, update_proj_gap, scale, proj_type, on_refresh: defaults for the groups.
        layerwise, accumulation_steps, nonfinite, skip_report_every: see
            :class:`~secondorder.optim.base.BaseOptimizer` (``nonfinite="skip_on_device"``
            masks a DCT refresh on the device; an SVD refresh decides on the host).
        process_group: under DDP, broadcast every new basis from the group's first rank.
            Not needed under FSDP2, whose parameters carry their group.
        **options: a subclass's own group settings (its ``extra_keys``: NaturalGaLore's
            ``history``, say); any other keyword is a ``TypeError``, as in ``torch.optim``.
    """

    #: each weight's basis, kept from one step to the next while its state's choice stays
    _transient: ClassVar[dict[str, Callable[[], Any]]] = {"_bases": dict}
    _bases: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
    masks_writes = True
    #: the group settings a subclass adds (NaturalGaLore's window), passed as keywords
    extra_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        projector: Projector,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: ProjType = "std",
        on_refresh: OnRefresh = "rotate",
        process_group: torch.distributed.ProcessGroup | None = None,
        **options: Any,
    ) -> None:
        self.projector = projector
        self.process_group = process_group
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias, "rank": rank, "update_proj_gap": update_proj_gap,
                    "scale": scale, "proj_type": proj_type, "on_refresh": on_refresh}  # fmt: skip
        extra = {k: options.pop(k) for k in list(options) if k not in _BASE_OPTIONS}
        unknown = sorted(set(extra) - set(self.extra_keys))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {unknown}")
        super().__init__(params, {**defaults, **extra}, **options)

    # ----------------------------------------------------------------- settings
    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        config = LowRankConfig.from_group(group)
        if config is None:
            return
        for p in group["params"]:
            if p.dim() < 2:
                continue
            if p.is_complex():
                raise ValueError(
                    f"a complex weight of shape {tuple(p.shape)} is in a group with 'rank': the "
                    "low-rank projection is defined for real matrices only; put complex "
                    "parameters in a group without 'rank' (AdamW on their real view)"
                )
            rows, cols = p.shape[0], math.prod(p.shape[1:])
            side = config.side(rows, cols)
            size = cols if side == "right" else rows
            if config.rank > size:
                raise ValueError(
                    f"rank {config.rank} is larger than the dimension it compresses: a weight of "
                    f"shape {tuple(p.shape)} projected on the {side} has {size}; lower the rank "
                    f"or put this weight in a group without 'rank'"
                )

    def _claims(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return group.get("rank") is not None and p.dim() >= 2

    def _projected_shape(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[int, int, int]:
        """``(kept, size, rank)``: ``X P`` (and the moments) is ``kept × rank`` on this rank,
        the basis ``size × rank``."""
        rows, cols = p.shape[0], math.prod(p.shape[1:])
        if compressed_side(group["proj_type"], rows, cols) == "left":
            return cols, rows, group["rank"]  # Pᵀ G summed over the ranks: all of it on each
        return local(p).shape[0], cols, group["rank"]

    def _check_state(self, p: torch.Tensor, group: dict[str, Any], saved: dict[str, Any]) -> None:
        if not self._claims(p, group):
            super()._check_state(p, group, saved)
            return
        kept, size, rank = self._projected_shape(p, group)
        check_shapes(saved, {"exp_avg": (kept, rank), "exp_avg_sq": (kept, rank)}, p)
        if "basis" not in saved:
            return
        try:
            basis = self.projector.basis(saved["basis"], size, torch.float32)
        except (IndexError, RuntimeError, TypeError, AttributeError) as error:
            raise ValueError(f"the saved basis of a weight does not fit it: {error}") from None
        check_shapes({"basis": basis}, {"basis": (size, rank)}, p)

    # ----------------------------------------------------------------- stepping
    def _schedule(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[Any, int, int] | None:
        step = self.state[p].get("step")
        return None if step is None else (step, group["update_proj_gap"], 0)

    def _prepare(self, p: torch.Tensor, group: dict[str, Any]) -> _Projection:
        """Between refreshes, project the gradient (``X P``): the projection stands in for the
        gradient in the finiteness check (NaN or Inf in ``G`` makes its rows of ``G P``
        non-finite), so the gradient is read once, not twice. On a refresh step nothing is
        computed (a NaN gradient would break the SVD): the gradient itself is checked."""
        state = self.state[p]
        grad = local(p.grad).to(statistics_dtype(p.dtype))  # type: ignore[arg-type]
        rows, cols = p.shape[0], math.prod(p.shape[1:])
        side = compressed_side(group["proj_type"], rows, cols)
        prepared = _Projection(grad, side, cols if side == "right" else rows)
        gap = group["update_proj_gap"]
        prepared.refresh = gap == 1 or self.nonfinite_policy.value(state.get("step", 0)) % gap == 0
        if prepared.refresh:
            # a refresh on a schedule is decided on the host (after the read of the counters
            # that found it due): masked, it would leave the count due, and the host copy past
            prepared.needs_host = gap > 1 or not self.projector.refreshes_on_device
            return prepared
        shard = row_shard(p)
        basis = self._basis(p, state["basis"], prepared.size, grad.dtype)
        split = self._split_group(p, group) is not None  # X P's rows are split over ranks
        # a left projection of row-sharded weights uses this rank's rows of P, summed over ranks
        prepared.basis = basis if shard is None or split else basis[shard.start : shard.stop]
        G = as_matrix(grad)
        # X P, as (Pᵀ G)ᵀ on the left: G is read in its own layout, not transposed
        projected = G @ prepared.basis if side == "right" else (prepared.basis.mT @ G).mT
        if shard is not None and not split:
            all_reduce_sum(projected, shard.group)
        prepared.projected = prepared.checked = projected
        return prepared

    def _apply(self, p: torch.Tensor, group: dict[str, Any], prepared: Prepared) -> None:
        """The projected step for a matrix (or conv) weight ``p`` (this rank's rows of it
        when FSDP2 shards ``p``): a refresh if due, then Adam in the projected space."""
        assert isinstance(prepared, _Projection)
        state, policy = self.state[p], self.nonfinite_policy
        if "step" not in state:
            state["step"] = policy.new_counter(p.device, scheduled=True)
        side, dtype = prepared.side, prepared.grad.dtype
        if prepared.refresh:
            projected, basis = self._refresh_basis(p, group, prepared)
        else:
            assert prepared.projected is not None and prepared.basis is not None
            projected, basis = prepared.projected, prepared.basis
        projected = self._precondition(p, state, group, projected, prepared)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(projected.shape, dtype=dtype, device=projected.device)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        step_size, denom = self._adam(state, projected, group)
        N = state["exp_avg"] / denom
        # N Pᵀ oriented back, formed in the weight's own layout (a contiguous update)
        update = (N @ basis.mT if side == "right" else basis @ N.mT).reshape(local(p).shape)
        with written(local(p), dtype, policy.found_inf) as target:
            decoupled_decay_(target, learning_rate(group), group["weight_decay"])
            add_scaled_(target, update, -step_size * group["scale"])

    def _refresh_basis(
        self, p: torch.Tensor, group: dict[str, Any], prepared: _Projection
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A new basis (rotating what lives in the old one): ``X P`` and this rank's rows of
        ``P``. Under ``found_inf`` the old basis and moments are kept unless the step is taken."""
        state, found_inf = self.state[p], self.nonfinite_policy.found_inf
        side, size, dtype = prepared.side, prepared.size, prepared.grad.dtype
        shard = row_shard(p)
        X = orient(as_matrix(prepared.grad), side)
        choice, projected = self._refresh(p, X, side, size, group["rank"], shard)
        before = {key: state.get(key) for key in ("basis", "exp_avg", "exp_avg_sq")}
        if "basis" in state and group["on_refresh"] == "rotate":
            R = rotation(
                self.projector.basis(state["basis"], size, dtype),
                self.projector.basis(choice, size, dtype),
            )
            self._rotate(p, state, group, R)
        if found_inf is not None:
            choice = torch.where(found_inf.to(choice.device), before["basis"], choice)
            for key in ("exp_avg", "exp_avg_sq"):
                if before[key] is not None and state[key] is not before[key]:
                    state[key] = torch.where(found_inf.to(p.device), before[key], state[key])
        state["basis"] = choice
        split = self._split_group(p, group) is not None
        basis = self.projector.basis(choice, size, dtype)
        return projected, basis if shard is None or split else basis[shard.start : shard.stop]

    def _basis(
        self, p: torch.Tensor, choice: torch.Tensor, size: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """``P`` for ``choice``, kept from one step to the next while ``choice`` (the state's
        tensor) stays the same object: a DCT basis is otherwise gathered anew every step."""
        cached = self._bases.get(p)
        if cached is not None and cached[0] is choice and cached[1].dtype == dtype:
            return cached[1]
        basis = self.projector.basis(choice, size, dtype)
        self._bases[p] = (choice, basis)
        return basis

    def _refresh(
        self,
        p: torch.Tensor,
        X: torch.Tensor,
        side: Side,
        size: int,
        rank: int,
        shard: RowShard | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A new basis for the oriented gradient ``X`` and ``X P``, the same on every rank."""
        if shard is None:
            choice, projected = self.projector.refresh(X, rank)
            if self.process_group is None:
                return choice, projected
            broadcast_from_first(choice, self.process_group)  # DDP: one basis, bit for bit
            return choice, X @ self.projector.basis(choice, size, X.dtype)
        if side == "right" and self.projector.refreshes_row_shards:
            return self.projector.refresh_row_shard(X, rank, shard.group)
        grad = p.grad
        assert grad is not None and is_sharded(grad)  # FSDP2 made p's gradient a DTensor
        full = orient(as_matrix(grad.full_tensor()).to(X.dtype), side)  # all-gather the rows
        choice, projected = self.projector.refresh(full, rank)
        return choice, (projected[shard.start : shard.stop] if side == "right" else projected)

    @staticmethod
    def _split_group(
        p: torch.Tensor, group: dict[str, Any]
    ) -> torch.distributed.ProcessGroup | None:
        """The group whose ranks each hold some rows of ``X P``: FSDP2 shards ``p``'s rows
        and the projection is on the right. ``None`` when every rank holds all of ``X P``."""
        shard = row_shard(p)
        rows, cols = p.shape[0], math.prod(p.shape[1:])
        if shard is None or compressed_side(group["proj_type"], rows, cols) != "right":
            return None
        return shard.group

    def _precondition(
        self,
        p: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        projected: torch.Tensor,
        prepared: _Projection,
    ) -> torch.Tensor:
        """Transform the projected gradient before Adam sees it; the identity here."""
        return projected

    def _rotate(
        self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], R: torch.Tensor
    ) -> None:
        """Carry what lives in the old basis into the new one: ``m ← m R``, ``v ← v (R ∘ R)``."""
        if "exp_avg" in state:
            state["exp_avg"] = state["exp_avg"] @ R
            state["exp_avg_sq"] = state["exp_avg_sq"] @ R.square()


#: the keyword arguments of :class:`~secondorder.optim.base.BaseOptimizer`
_BASE_OPTIONS = ("layerwise", "accumulation_steps", "nonfinite", "skip_report_every")


class _Projection(Prepared):
    """What :meth:`ProjectedAdam._prepare` hands to :meth:`ProjectedAdam._apply`."""

    def __init__(self, grad: torch.Tensor, side: Side, size: int) -> None:
        super().__init__()
        self.grad, self.side, self.size = grad, side, size
        self.refresh = False
        self.projected: torch.Tensor | None = None  # X P, between refreshes
        self.basis: torch.Tensor | None = None  # this rank's rows of P, between refreshes
