r"""GaLore (Zhao et al., 2024) and Natural GaLore: Adam in an SVD-chosen low-rank gradient space."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._checks import check_damping, check_positive_int
from .._common import statistics_dtype
from ..curvature import SlidingWindowMFAC
from .projected_adam import ProjectedAdam
from .projectors import SVDProjector

__all__ = ["FisherConfig", "GaLoreAdamW", "NaturalGaLore"]


class GaLoreAdamW(ProjectedAdam):
    r"""GaLore's AdamW: moments in the span of the top-``r`` singular vectors of the gradient.

    A drop-in for ``galore_torch.GaLoreAdamW``: the same group keys (``rank``,
    ``update_proj_gap``, ``scale``, ``proj_type``) and defaults; groups without ``rank``
    are plain AdamW::

        GaLoreAdamW([{"params": others},
                     {"params": matrices, "rank": 128, "update_proj_gap": 200,
                      "scale": 0.25, "proj_type": "std"}], lr=0.01)

    The basis is refreshed by a float32 SVD of the gradient on the first step and then
    every ``update_proj_gap`` steps. Conv weights are projected as ``out × in·k_h·k_w``
    matrices. ``on_refresh="rotate"`` (the default, chosen by the measurement in
    docs/benchmarks.md) carries the moments into the new basis; ``"keep"`` is GaLore's
    behaviour. The step and its differences from the reference are in
    :mod:`secondorder.optim.projected_adam`, as are DDP (``process_group`` broadcasts each
    new basis from the first rank) and FSDP2 (each rank steps its rows of every weight).

    Args:
        params, lr, betas, eps, weight_decay, correct_bias: as ``galore_torch.GaLoreAdamW``.
        **options: the keyword arguments of
            :class:`~secondorder.optim.projected_adam.ProjectedAdam` (``rank``,
            ``update_proj_gap``, ``scale``, ``proj_type``, ``on_refresh``, ``layerwise``,
            ``accumulation_steps``, ``process_group``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            SVDProjector(),
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            **options,
        )


class NaturalGaLore(GaLoreAdamW):
    r"""GaLore whose projected gradient is preconditioned by its inverse empirical Fisher.

    For the flattened projected gradient ``a = vec(X P)`` of a weight, before Adam:

    .. math::

        a \leftarrow F^{-1} a, \qquad
        F = \text{damp}\, I + \tfrac{1}{n} \textstyle\sum_{i=1}^{n} a_i a_i^\top

    over the last ``n ≤ history`` projected gradients of that weight, ``a`` included. The
    product comes from one :class:`~secondorder.curvature.SlidingWindowMFAC` per weight
    (its ``state_dict()`` is kept in the optimiser state under ``"fisher"``).

    Scaling against the Natural GaLore reference: it uses ``F_ref = λ I + Σ a_i a_iᵀ``
    (a sum) with ``λ = 1e-3``. Since ``F_ref = n F`` with ``damp = λ / n``, the reference's
    ``F_ref⁻¹ a`` equals ``F⁻¹ a / n`` for ``damp = λ / n``. With a full window (``n = 20``)
    ``damp = 5e-5`` is the reference's ``λ = 1e-3``, and the constant factor ``1/n`` only
    rescales Adam's ``ε`` (Adam is otherwise invariant to it). While the window fills,
    ``n`` grows, so the two differ by a changing factor there.

    The default is ``damp = 5e-3``, 100 times the reference's: at the reference's damping
    the Fisher term dominates and whitens away the direction consecutive gradients share
    (docs/benchmarks.md, "Defaults chosen by measurement").

    On a refresh of the basis, ``on_refresh="rotate"`` also carries the stored projected
    gradients into the new basis (``a_i ← a_i R`` as ``rows × r`` matrices, ``R = P_oldᵀ
    P_new``), so ``F`` becomes the Fisher of the old gradients projected onto the new
    subspace: the same transformation the moments get, and exact for the part of each
    old gradient inside the new span. The reference keeps the old-basis vectors
    (``on_refresh="keep"`` does the same), whose Fisher then mixes coordinates of two
    bases until the window has turned over; forgetting the window instead would make the
    next steps plain GaLore steps until it refills.

    Under FSDP2, a weight projected on the right has its projected gradients split by rows
    over the ranks, and so is its window: each rank keeps its rows and the window's dot
    products are all-reduced (``SlidingWindowMFAC(process_group=...)``); projected on the
    left, every rank holds the whole (small) window.

    Args:
        history: gradients in each window (20 in the reference).
        damp: ``damp > 0`` of the mean-convention Fisher above (default ``5e-3``, see
            above).
        relative_damp: if set (per group too), it replaces ``damp`` by ``relative_damp``
            times the mean squared entry of the projected gradients in the window, fixed
            between refactorisations of its small system (as ``MFAC(relative_damp=...)``):
            a damping that does not depend on the gradients' scale.
        Other arguments as for :class:`GaLoreAdamW`.
    """

    #: the windows are rebuilt from the state (``"fisher"``) by a copy and after a load
    _transient: ClassVar[dict[str, Callable[[], Any]]] = {
        **GaLoreAdamW._transient,
        "_windows": dict,
        "_pending": dict,
    }
    extra_keys = ("history", "damp", "relative_damp")
    _windows: dict[torch.Tensor, SlidingWindowMFAC]
    _pending: dict[torch.Tensor, Any]  # a window's update begun by _prepare, per weight

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        history: int = 20,
        damp: float = 5e-3,
        relative_damp: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, correct_bias,
            history=history, damp=damp, relative_damp=relative_damp, **options,
        )  # fmt: skip

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        FisherConfig.from_group(group)

    def _window(
        self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], like: torch.Tensor
    ) -> SlidingWindowMFAC:
        """The window of ``p``, built (and loaded from its saved state) on first use."""
        window = self._windows.get(p)
        if window is None:
            window = self._new_window(p, group, like.numel(), like.dtype)
            if "fisher" in state:
                window.load_state_dict(state["fisher"])
            self._windows[p] = window
        return window

    def _new_window(
        self, p: torch.Tensor, group: dict[str, Any], dim: int, dtype: torch.dtype
    ) -> SlidingWindowMFAC:
        return SlidingWindowMFAC(
            dim,
            group["history"],
            group["damp"],
            device=p.device,
            dtype=dtype,
            relative_damp=group["relative_damp"],
            # under FSDP2 with a right projection, each rank holds its rows of the window
            process_group=self._split_group(p, group) if group.get("rank") else None,
        )

    def _check_state(self, p: torch.Tensor, group: dict[str, Any], saved: dict[str, Any]) -> None:
        """The projected state, and a window that loads the saved one (then dropped: the
        window is rebuilt from the state on the next step)."""
        super()._check_state(p, group, saved)
        if "fisher" not in saved or not self._claims(p, group):
            return
        kept, _, rank = self._projected_shape(p, group)
        window = self._new_window(p, group, kept * rank, statistics_dtype(p.dtype))
        try:
            window.load_state_dict(saved["fisher"])
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"the saved Fisher window of a weight is incomplete: {error}"
            ) from None

    def _prepare(self, p: torch.Tensor, group: dict[str, Any]) -> Any:
        """Between refreshes, also begin the window's update with ``X P`` (the proxy checked
        for NaN and Inf in the same read): its factor's verdict comes back in the step's one
        host synchronisation, which this optimiser then needs on every step (under
        ``nonfinite="skip_on_device"`` too, where the step is decided on the host)."""
        prepared = super()._prepare(p, group)
        prepared.needs_host = True
        if prepared.refresh:
            return prepared
        projected = prepared.projected
        assert projected is not None  # X P, between refreshes
        window = self._window(p, self.state[p], group, projected)
        pending = window.begin_update(projected.reshape(-1))
        prepared.reads = list(pending.reads)
        self._pending[p] = pending

        def cancel() -> None:
            window.cancel_update(self._pending.pop(p))

        prepared.on_cancel = cancel
        return prepared

    def _precondition(
        self,
        p: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        projected: torch.Tensor,
        prepared: Any,
    ) -> torch.Tensor:
        window = self._window(p, state, group, projected)
        pending = self._pending.pop(p, None)
        if pending is None:  # a refresh step: X P in the new basis, read on its own
            natural = window.update_solve(projected.reshape(-1))
        else:
            prepared.on_cancel = None  # settled (or undone by settling) from here on
            natural = window.finish_update_solve(pending, prepared.values)
        state["fisher"] = window.state_dict()
        return natural.view_as(projected)

    def _rotate(
        self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], R: torch.Tensor
    ) -> None:
        super()._rotate(p, state, group, R)
        if "fisher" not in state:
            return
        window = self._window(p, state, group, state["exp_avg"])
        rank = R.shape[0]
        window.transform_(lambda rows: (rows.view(rows.shape[0], -1, rank) @ R).flatten(1))
        state["fisher"] = window.state_dict()


@dataclass(frozen=True)
class FisherConfig:
    """NaturalGaLore's settings of the Fisher window of each projected weight."""

    history: int
    damp: float
    relative_damp: float | None

    def __post_init__(self) -> None:
        check_positive_int(self.history, "history")
        check_damping(self.damp)
        if self.relative_damp is not None:
            check_damping(self.relative_damp, "relative_damp")

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> FisherConfig:
        return cls(group["history"], group["damp"], group["relative_damp"])
