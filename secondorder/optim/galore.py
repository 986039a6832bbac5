r"""GaLore (Zhao et al., 2024) and Natural GaLore: Adam in an SVD-chosen low-rank gradient space."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from .._checks import check_damping, check_positive_int
from .._common import statistics_dtype
from ..curvature import SlidingWindowMFAC
from .projected_adam import LowRankConfig, ProjectedAdam
from .projectors import SVDProjector

__all__ = ["GaLoreAdamW", "NaturalGaLore"]


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

    The default is ``damp = 5e-3``, 100 times the reference's, because it trains better:
    at the reference's damping the Fisher term dominates (``‖a‖²/(n·damp)`` has a median
    of 26-67 on the tiny Llama) and whitens away the direction consecutive gradients
    share. Tiny Llama, 300 steps, 3 seeds (``benchmarks/lowrank_bench.py --part
    natural-damping``, validation nats/byte): GaLoreAdamW 1.938 ± 0.035, ``damp=5e-5``
    1.979 ± 0.024, ``damp=5e-3`` 1.924 ± 0.010; ``relative_damp`` of 10 to 1e4 lost to
    both (2.03 to 2.15).

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
            a damping that does not depend on the gradients' scale. It lost to ``damp`` in
            the measurement above; a likely cause (not isolated) is that the damping, and
            with it the scale of ``F⁻¹a``, jumps at each refactorisation while Adam's
            second moment adapts over about a thousand steps.
        Other arguments as for :class:`GaLoreAdamW`.
    """

    #: a copy rebuilds the windows from the state, as a loaded optimiser does
    _transient: ClassVar[dict[str, Callable[[], Any]]] = {
        **GaLoreAdamW._transient,
        "_windows": dict,
    }

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
        self._windows: dict[torch.Tensor, SlidingWindowMFAC] = {}
        super().__init__(
            params, lr, betas, eps, weight_decay, correct_bias,
            history=history, damp=damp, relative_damp=relative_damp, **options,
        )  # fmt: skip

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_positive_int(group["history"], "history")
        check_damping(group["damp"])
        if group["relative_damp"] is not None:
            check_damping(group["relative_damp"], "relative_damp")

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
        config = LowRankConfig.from_group(group)
        return SlidingWindowMFAC(
            dim,
            group["history"],
            group["damp"],
            device=p.device,
            dtype=dtype,
            relative_damp=group["relative_damp"],
            # under FSDP2 with a right projection, each rank holds its rows of the window
            process_group=None if config is None else self._split_group(p, config),
        )

    def _check_claimed_state(
        self, p: torch.Tensor, group: dict[str, Any], saved: dict[str, Any]
    ) -> None:
        """The projected state, and a window that loads the saved one (then dropped: the
        window is rebuilt from the state on the next step)."""
        super()._check_claimed_state(p, group, saved)
        if "fisher" not in saved:
            return
        config = LowRankConfig.from_group(group)
        assert config is not None  # the group claimed p: it has a rank
        kept, _, rank = self._projected_shape(p, config)
        window = self._new_window(p, group, kept * rank, statistics_dtype(p.dtype))
        try:
            window.load_state_dict(saved["fisher"])
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"the saved Fisher window of a weight is incomplete: {error}"
            ) from None

    def _prepare_claimed(
        self, p: torch.Tensor, group: dict[str, Any], index: int
    ) -> tuple[torch.Tensor | None, Any]:
        """Between refreshes, also begin the window's update with ``X P`` (the proxy checked
        for NaN and Inf in the same read): its factor's verdict comes back in the step's one
        host synchronisation, which this optimiser then needs on every step (under
        ``nonfinite="skip_on_device"`` too, where the step is decided on the host)."""
        proxy, prepared = super()._prepare_claimed(p, group, index)
        prepared.needs_host = True
        if prepared.refresh:
            return proxy, prepared
        low = prepared.low
        assert low is not None  # X P, between refreshes
        window = self._window(p, self.state[p], group, low)
        pending = window.begin_update(low.reshape(-1))
        prepared.reads = list(pending.reads)
        prepared.pending = pending
        prepared.on_cancel = lambda: window.cancel_update(pending)
        return proxy, prepared

    def _precondition(
        self,
        p: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        low: torch.Tensor,
        prepared: Any,
    ) -> torch.Tensor:
        window = self._window(p, state, group, low)
        pending = getattr(prepared, "pending", None)
        if pending is None:  # a refresh step: X P in the new basis, read on its own
            natural = window.update_solve(low.reshape(-1))
        else:
            prepared.on_cancel = None  # settled (or undone by settling) from here on
            natural = window.finish_update_solve(pending, prepared.values)
        state["fisher"] = window.state_dict()
        return natural.view_as(low)

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._windows.clear()  # rebuilt from the loaded state on the next step
