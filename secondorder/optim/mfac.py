r"""The M-FAC optimiser: preconditioning by the inverse empirical Fisher of recent gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .._checks import check_damping, check_positive_int
from .._common import statistics_dtype
from .._distributed import Shard, all_gather_shards, local, rank_and_world, row_shard
from ..curvature import SlidingWindowMFAC, SparseSlidingWindowMFAC
from ..curvature.sliding_window import SlidingWindow
from ..curvature.sparse_window import check_density

__all__ = ["MFAC"]


class MFAC(torch.optim.Optimizer):
    r"""M-FAC (Frantar, Kurtic and Alistarh, 2021) as a ``torch.optim`` optimiser.

    Every step, for the flat gradient ``g`` of all parameters:

    .. math::

        g &\leftarrow g + \text{weight\_decay} \cdot w \quad \text{(L2, per group, before preconditioning)}\\
        u &= F^{-1} g, \qquad F = \text{damp}\, I + \tfrac{1}{n} \textstyle\sum_{i} g_i g_i^\top
              \text{ over the last } n \le \text{num\_grads} \text{ gradients (this one included)}\\
        v &\leftarrow \mu v + (1 - \mu) u \quad \text{(when momentum } \mu > 0)\\
        w &\leftarrow w - \text{lr} \cdot v

    ``F⁻¹ g`` comes from a :class:`~secondorder.curvature.SlidingWindowMFAC`
    spanning every parameter that requires grad, as one flat vector. ``lr``,
    ``momentum`` and ``weight_decay`` may differ per parameter group;
    ``num_grads``, ``damp``, ``storage_dtype`` and ``density`` belong to the one window.

    With ``density`` set, the window keeps only the top ``⌈density · d⌉`` entries of each
    gradient, with error feedback (EFCP, Modoranu et al. 2023; a
    :class:`~secondorder.curvature.SparseSlidingWindowMFAC`): ``u = F̂⁻¹ c`` for the
    compressed accumulator ``c`` of ``g + e`` replaces ``F⁻¹ g`` above, and the window
    takes about ``8 · density · num_grads`` bytes per parameter instead of
    ``4 · num_grads`` (1% keeps a 40th at ``num_grads = 1024``).

    A parameter whose ``.grad`` is ``None`` at a step enters the window as zeros
    and is neither updated nor decayed, and its momentum is left as it was. A
    step where no parameter has a gradient does nothing. A gradient with NaN or
    Inf raises :class:`~secondorder.errors.NonFiniteError` before anything changes.

    The window and the momentum are float32 (float64 if every parameter is
    float64), whatever the parameters' dtype, so bf16 models work.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimiser.
        lr: learning rate.
        num_grads: gradients in the window (512 to 1024 in the paper).
        damp: Fisher damping ``λ > 0`` (1e-5 to 1e-6 in the paper).
        momentum: ``μ`` in ``[0, 1)``.
        weight_decay: L2 coefficient added to the gradient.
        storage_dtype: dtype of the gradient window; ``torch.bfloat16`` halves its memory.
        density: ``None`` for the dense window; a number in ``(0, 1]`` for the sparse window
            keeping that fraction of each gradient (the reference uses 0.01).
        error_feedback: with ``density``, carry what compression drops into the next step
            (EFCP); ``False`` is plain top-k, an ablation.
        process_group: under data parallelism (DDP), shard the window over the ranks of
            this group: each rank keeps the last ``num_grads`` gradients only for its
            contiguous ``1/world`` of the flat coordinates, so the window's memory
            per rank is ``num_grads · d / world``. A step all-reduces ``num_grads``
            partial dot products (independent of ``d``), solves the same small
            system on every rank, forms this rank's shard of the update and
            all-gathers the update (``d`` numbers, as much as DDP's gradient
            all-reduce). The gradients must be the same on every rank, as DDP
            leaves them. ``state_dict()`` then holds this rank's shard: save one
            per rank and resume on the same number of ranks. With ``density``, each
            rank keeps the top entries of its own shard (blockwise top-k, not global).

    Under FSDP2 (parameters sharded by ``fully_shard``) no ``process_group`` is needed: each
    rank's window covers the rows of every weight that FSDP2 gave it, the dot products are
    all-reduced over the parameters' group, and each rank updates its own rows, so nothing
    is gathered at all.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        num_grads: int = 1024,
        damp: float = 1e-6,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        storage_dtype: torch.dtype | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        *,
        density: float | None = None,
        error_feedback: bool = True,
    ) -> None:
        check_positive_int(num_grads, "num_grads")
        check_damping(damp)
        if density is not None:
            check_density(density)
        elif not error_feedback:
            raise ValueError(
                "error_feedback=False applies to a sparse window: give a density as well"
            )
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self._window: SlidingWindow | None = None
        super().__init__(params, defaults)

        self._params = [
            p for group in self.param_groups for p in group["params"] if p.requires_grad
        ]
        if not self._params:
            raise ValueError("MFAC got no parameters that require grad")
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            raise ValueError(
                f"MFAC needs all parameters on one device, got {sorted(map(str, devices))}"
            )
        self._dtype = statistics_dtype(*(p.dtype for p in self._params))
        self._sizes = [local(p).numel() for p in self._params]
        fsdp_group = self._fsdp_group(process_group)
        if fsdp_group is None:  # one process, or a flat shard of each rank's full gradient
            self._shard = Shard(*rank_and_world(process_group), sum(self._sizes))
            self._process_group = process_group
        else:  # FSDP2: the window spans this rank's rows, nothing is gathered
            self._shard = Shard(0, 1, sum(self._sizes))
            self._process_group = None
        options = {
            "device": devices.pop(),
            "dtype": self._dtype,
            "storage_dtype": storage_dtype,
            "process_group": process_group if fsdp_group is None else fsdp_group,
        }
        self._window = (
            SlidingWindowMFAC(self._shard.size, num_grads, damp, **options)
            if density is None
            else SparseSlidingWindowMFAC(
                self._shard.size, num_grads, damp, density, error_feedback=error_feedback, **options
            )
        )
        self._momentum: torch.Tensor | None = None
        self._steps = 0

    def _fsdp_group(self, process_group):
        """The group FSDP2 shards the parameters over, or ``None`` for plain tensors."""
        shards = [row_shard(p) for p in self._params]
        if all(shard is None for shard in shards):
            return None
        if any(shard is None for shard in shards):
            raise ValueError("MFAC needs all of its parameters sharded by FSDP2, or none of them")
        groups = {shard.group for shard in shards}
        if len(groups) > 1:
            raise ValueError("MFAC needs all FSDP2 parameters sharded over one process group")
        group = groups.pop()
        if process_group is not None and process_group != group:
            raise ValueError(
                "process_group differs from the group FSDP2 shards the parameters over"
            )
        return group

    @property
    def window(self) -> SlidingWindow:
        """The inverse-Fisher estimator behind the optimiser."""
        assert self._window is not None
        return self._window

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._window is not None:
            raise RuntimeError(
                "MFAC's gradient window spans the parameters it was created with; "
                "create a new optimiser to add parameters"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not group["lr"] >= 0:
            raise ValueError(f"lr must be >= 0, got {group['lr']}")
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
        if not group["weight_decay"] >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")

    def _flat_gradient(self) -> torch.Tensor | None:
        """Gradients (with L2 terms) of all parameters as one vector; ``None`` if none has one."""
        decay = {p: group["weight_decay"] for group in self.param_groups for p in group["params"]}
        pieces, found = [], False
        for p, size in zip(self._params, self._sizes, strict=True):
            if p.grad is None:
                pieces.append(torch.zeros(size, dtype=self._dtype, device=p.device))
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MFAC does not support sparse gradients")
            found = True
            g = local(p.grad).reshape(-1).to(self._dtype)
            if decay[p]:
                g = g + decay[p] * local(p.detach()).reshape(-1).to(self._dtype)
            pieces.append(g)
        return torch.cat(pieces) if found else None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flat = self._flat_gradient()
        if flat is None:
            return loss
        update = self.window.update_solve(self._shard.take(flat))
        self._steps += 1
        if any(group["momentum"] for group in self.param_groups):
            self._apply_momentum(update)
        direction = all_gather_shards(update, self._shard, self._process_group)
        lr = {p: group["lr"] for group in self.param_groups for p in group["params"]}
        for p, coordinates in zip(self._params, self._slices(), strict=True):
            if p.grad is not None:
                target = local(p)
                target.add_(direction[coordinates].view_as(target).to(p.dtype), alpha=-lr[p])
        return loss

    def _slices(self) -> list[slice]:
        """Each parameter's coordinates in the flat vector."""
        ends = torch.tensor(self._sizes).cumsum(0).tolist()
        return [slice(end - size, end) for end, size in zip(ends, self._sizes, strict=True)]

    def _apply_momentum(self, update: torch.Tensor) -> None:
        """``v ← μ v + (1 − μ) u`` on this rank's shard, then ``u ← v``, per parameter."""
        if self._momentum is None:
            self._momentum = torch.zeros_like(update)
        mu = {p: group["momentum"] for group in self.param_groups for p in group["params"]}
        for p, coordinates in zip(self._params, self._slices(), strict=True):
            start = max(coordinates.start, self._shard.start) - self._shard.start
            stop = min(coordinates.stop, self._shard.stop) - self._shard.start
            if p.grad is None or not mu[p] or stop <= start:
                continue
            velocity = self._momentum[start:stop]
            velocity.mul_(mu[p]).add_(update[start:stop], alpha=1 - mu[p])
            update[start:stop] = velocity

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["state"]["mfac"] = {
            "steps": self._steps,
            "window": self.window.state_dict(),
            "momentum": self._momentum,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = {**state_dict, "state": dict(state_dict["state"])}
        saved = state_dict["state"].pop("mfac", None)
        super().load_state_dict(state_dict)
        if saved is None:
            return
        self.window.load_state_dict(saved["window"])
        momentum = saved["momentum"]
        self._momentum = None if momentum is None else momentum.to(self.window.device, copy=True)
        self._steps = int(saved["steps"])
