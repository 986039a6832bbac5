r"""SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's preconditioner.

For each parameter ``p`` with gradient ``G`` (viewed in its working shape, see
``merge_dims``), with a basis ``Q_k`` along each preconditioned dimension
(:mod:`secondorder.optim.eigenbasis`), at step ``t``:

.. math::

    \tilde G &= G \times_k Q_k^\top, \qquad
    m \leftarrow \beta_1 m + (1 - \beta_1) \tilde G, \qquad
    v \leftarrow \beta_2 v + (1 - \beta_2) \tilde G^2 \\
    p &\leftarrow p - \text{lr}\,\frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
        \Big(\frac{m}{\sqrt v + \epsilon}\Big) \times_k Q_k, \qquad
    p \leftarrow (1 - \text{lr} \cdot \text{wd})\, p \\
    C_k &\leftarrow \beta_G C_k + (1 - \beta_G)\, G_{(k)} G_{(k)}^\top

with ``β_G = shampoo_beta`` (``betas[1]`` when negative). The first step of a parameter
only builds its preconditioner: the Grams from its gradient and their eigenvectors; it
changes no weight and counts no step. Every ``precondition_frequency`` steps the bases are
refreshed by one power iteration and a QR decomposition, the second moment ``v`` is
permuted to the new order of the columns and the first moment ``m`` is carried into the
new basis (``m ← (m ×_k Q_k^{old}) ×_k Q_k^{newᵀ}``). Dimensions larger than
``max_precond_dim`` are not rotated; a 1-D tensor is rotated only with ``precondition_1d``.
The step follows the authors' ``soap.py`` (nikhilvyas/SOAP, a1e5535; keyword names and
defaults included), with two differences that change rounding only: the moments are
updated as the rest of the library updates them (``lerp``), and ``m`` goes through the
two rotations only when the basis changes (the reference rotates it out and back in on
every step). ``shampoo_beta`` and ``precondition_frequency`` are read from the group at
every step (the reference fixes them at a parameter's first step).

Beyond the reference, per group:

- ``rank=r``: the top-``r`` eigenvectors of the Gram of the smaller of a matrix's two
  dimensions only (one-sided, as GaLore), the other dimension left as it is: moments of
  ``r × n`` numbers for an ``m × n`` weight (``m ≤ n``), kept in SOAP's running Gram and
  rotated on each refresh;
- ``basis="dct"``: the columns of the fixed orthonormal DCT-II basis with the most energy
  of the running Gram (all of them without ``rank``), chosen again on every refresh: no
  eigendecomposition.

State per parameter: ``step``, ``exp_avg`` and ``exp_avg_sq`` (in the rotated
coordinates), and for each rotated dimension ``k`` its Gram ``gram_k`` and basis
``basis_k``. Under DDP every rank computes the same bases from the same gradients (a
``process_group`` broadcasts them from the first rank, bit for bit); FSDP2-sharded
parameters are refused (a Gram needs the whole dimension). A complex parameter is stepped
as its real view (``view_as_real``: real and imaginary parts as a last dimension of 2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_positive_int
from .._common import statistics_dtype
from .._distributed import broadcast_from_first, row_shard
from .adamw_core import AdamWCore, Prepared
from .base import check_shapes, learning_rate, real_view
from .eigenbasis import (
    dct_columns,
    eigenbasis,
    merged_shape,
    mode_gram,
    power_iteration,
    project,
    project_back,
)
from .functional import adam_moments_, adam_scaling, written

__all__ = ["SOAP", "SOAPConfig"]


@dataclass(frozen=True)
class SOAPConfig:
    """SOAP's settings of one parameter group."""

    shampoo_beta: float
    precondition_frequency: int
    max_precond_dim: int
    merge_dims: bool
    precondition_1d: bool
    normalize_grads: bool
    rank: int | None
    basis: str

    def __post_init__(self) -> None:
        if not self.shampoo_beta < 1:
            raise ValueError(
                f"shampoo_beta must be < 1 (negative: betas[1]), got {self.shampoo_beta}"
            )
        check_positive_int(self.precondition_frequency, "precondition_frequency")
        check_positive_int(self.max_precond_dim, "max_precond_dim")
        if self.rank is not None:
            check_positive_int(self.rank, "rank")
        if self.basis not in ("eigh", "dct"):
            raise ValueError(f"basis must be 'eigh' or 'dct', got {self.basis!r}")

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> SOAPConfig:
        keys = ("shampoo_beta", "precondition_frequency", "max_precond_dim", "merge_dims",
                "precondition_1d", "normalize_grads", "rank", "basis")  # fmt: skip
        return cls(*(group[key] for key in keys))


class _Gradient(Prepared):
    """The gradient in its working shape and, between refreshes, rotated."""

    def __init__(self, G: torch.Tensor, rotated: torch.Tensor | None, refresh: bool) -> None:
        super().__init__(checked=rotated, needs_host=refresh)
        self.G, self.rotated, self.refresh = G, rotated, refresh


class SOAP(AdamWCore):
    r"""SOAP as a ``torch.optim`` optimiser; the maths is in the module docstring.

    Args:
        params: parameters or groups; every key below may be set per group.
        lr, betas, eps, weight_decay, correct_bias: Adam's (``weight_decay`` decoupled,
            applied after the update as in the reference).
        shampoo_beta: ``β_G`` of the running Grams; negative: ``betas[1]``.
        precondition_frequency: steps between refreshes of the bases.
        max_precond_dim: dimensions larger than this are not rotated.
        merge_dims: merge neighbouring dimensions while their product is at most
            ``max_precond_dim`` (a conv kernel's input and spatial dimensions, say).
        precondition_1d: rotate 1-D tensors too (a full Gram per bias).
        normalize_grads: divide each parameter's update by its root mean square.
        rank: keep the top ``rank`` directions of one dimension only (module docstring).
        basis: ``"eigh"`` (SOAP's eigenbases) or ``"dct"`` (DCT-II columns, no
            eigendecomposition).
        nonfinite, skip_report_every: see :class:`~secondorder.optim.base.BaseOptimizer`
            (``"skip_on_device"`` masks steady steps; refreshes are decided on the host).
        process_group: under DDP, broadcast each new basis from the group's first rank.
    """

    masks_writes = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        *,
        rank: int | None = None,
        basis: str = "eigh",
        process_group: torch.distributed.ProcessGroup | None = None,
        nonfinite: str = "raise",
        skip_report_every: int = 100,
    ) -> None:
        self.process_group = process_group
        defaults = {"lr": lr, "betas": tuple(betas), "shampoo_beta": shampoo_beta, "eps": eps,
                    "weight_decay": weight_decay, "precondition_frequency": precondition_frequency,
                    "max_precond_dim": max_precond_dim, "merge_dims": merge_dims,
                    "precondition_1d": precondition_1d, "normalize_grads": normalize_grads,
                    "correct_bias": correct_bias, "rank": rank, "basis": basis}  # fmt: skip
        super().__init__(params, defaults, nonfinite=nonfinite, skip_report_every=skip_report_every)

    # ----------------------------------------------------------------- settings
    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        SOAPConfig.from_group(group)

    def _claims(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return True  # every parameter takes SOAP's step (an unrotated one is Adam's)

    def _layout(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[list[int], list[int | None]]:
        """The working shape of ``p`` and, per dimension, how many basis columns it keeps
        (``None``: not rotated)."""
        max_dim = group["max_precond_dim"]
        shape = list(real_view(p).shape)
        if len(shape) == 1:
            rotated = group["precondition_1d"] and shape[0] <= max_dim
            return shape, [shape[0] if rotated else None]
        if group["merge_dims"]:
            shape = merged_shape(shape, max_dim)
        columns: list[int | None] = [n if n <= max_dim else None for n in shape]
        rank = group["rank"]
        if rank is not None and len(shape) >= 2:  # one side: the smaller dimension's
            side = 0 if shape[0] <= math.prod(shape[1:]) else len(shape) - 1
            columns = [min(rank, n) if k == side and n <= max_dim else None
                       for k, n in enumerate(shape)]  # fmt: skip
        return shape, columns

    def _check_state(self, p: torch.Tensor, group: dict[str, Any], saved: dict[str, Any]) -> None:
        shape, columns = self._layout(p, group)
        rotated = [c if c is not None else n for n, c in zip(shape, columns, strict=True)]
        check_shapes(saved, {"exp_avg": rotated, "exp_avg_sq": rotated}, p)
        for k, (n, c) in enumerate(zip(shape, columns, strict=True)):
            if c is not None:
                check_shapes(saved, {f"gram_{k}": (n, n), f"basis_{k}": (n, c)}, p)

    # ----------------------------------------------------------------- stepping
    def _schedule(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[Any, int, int] | None:
        step, period = self.state[p].get("step"), group["precondition_frequency"]
        return None if step is None else (step, period, period - 1)

    def _prepare(self, p: torch.Tensor, group: dict[str, Any]) -> Prepared:
        """The gradient in its working shape and rotated into the current bases (which then
        stands in for the gradient in the finiteness check); on a refresh step, decided on
        the host."""
        if row_shard(p) is not None:
            raise NotImplementedError(
                "SOAP needs the whole of each dimension for its Grams: it does not step "
                "FSDP2-sharded parameters (use it under DDP, or give it unsharded parameters)"
            )
        state = self.state[p]
        shape, _ = self._layout(p, group)
        G = real_view(p.grad).to(statistics_dtype(p.dtype)).reshape(shape)  # type: ignore[arg-type]
        if "step" not in state:
            return _Gradient(G, None, refresh=False)
        period = group["precondition_frequency"]
        due = self.nonfinite_policy.value(state["step"]) % period == period - 1
        return _Gradient(G, project(G, self._bases(state, len(shape))), due)

    def _apply(self, p: torch.Tensor, group: dict[str, Any], prepared: Prepared) -> None:
        assert isinstance(prepared, _Gradient)
        state, policy = self.state[p], self.nonfinite_policy
        if "step" not in state:
            self._build_preconditioner(p, group, prepared.G)
            return
        config, G = SOAPConfig.from_group(group), prepared.G
        assert prepared.rotated is not None  # the gradient in the bases built at the first step
        bases = self._bases(state, G.dim())
        policy.increment(state, "step")
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        adam_moments_(m, v, prepared.rotated, beta1=beta1, beta2=beta2, found_inf=policy.found_inf)
        step_size, denom = adam_scaling(v, state["step"], lr=learning_rate(group), beta1=beta1,
                                        beta2=beta2, eps=group["eps"],
                                        correct_bias=group["correct_bias"],
                                        correction_in_step_size=True)  # fmt: skip
        weight = real_view(p)
        update = project_back(m / denom, bases).reshape(weight.shape)
        if config.normalize_grads:
            update = update / (1e-30 + update.square().mean().sqrt())
        with written(weight, m.dtype, policy.found_inf) as target:
            if isinstance(step_size, torch.Tensor):
                target.addcmul_(update, (-step_size).to(update.dtype))
            else:
                target.add_(update, alpha=-step_size)
            if group["weight_decay"] > 0:
                target.add_(target, alpha=-learning_rate(group) * group["weight_decay"])
        self._update_grams(state, G, group)
        if prepared.refresh:
            self._refresh(state, group, bases)

    def _build_preconditioner(
        self, p: torch.Tensor, group: dict[str, Any], G: torch.Tensor
    ) -> None:
        """A parameter's first step: its Grams from its first gradient, their bases, zero
        moments; no update."""
        state, policy = self.state[p], self.nonfinite_policy
        shape, columns = self._layout(p, group)
        for k, (n, c) in enumerate(zip(shape, columns, strict=True)):
            if c is not None:
                state[f"gram_{k}"] = torch.zeros(n, n, dtype=G.dtype, device=G.device)
        self._update_grams(state, G, group)
        for k, c in enumerate(columns):
            if c is not None:
                state[f"basis_{k}"] = self._new_basis(state[f"gram_{k}"], c, group)
        rotated = project(G, self._bases(state, len(shape)))
        state["step"] = policy.new_counter(p.device, scheduled=True)
        state["exp_avg"] = torch.zeros_like(rotated)
        state["exp_avg_sq"] = torch.zeros_like(rotated)

    def _new_basis(self, gram: torch.Tensor, columns: int, group: dict[str, Any]) -> torch.Tensor:
        if group["basis"] == "dct":
            basis = dct_columns(gram, columns)
        else:  # all columns: the eigenbasis itself, without a cut (the reference's bits)
            basis = eigenbasis(gram, None if columns == gram.shape[0] else columns)
        if self.process_group is not None:
            broadcast_from_first(basis, self.process_group)
        return basis

    @staticmethod
    def _bases(state: dict[str, Any], dims: int) -> list[torch.Tensor | None]:
        return [state.get(f"basis_{k}") for k in range(dims)]

    def _update_grams(self, state: dict[str, Any], G: torch.Tensor, group: dict[str, Any]) -> None:
        """``C_k ← β_G C_k + (1 − β_G) G_{(k)} G_{(k)}ᵀ`` for every rotated dimension."""
        beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]
        for k in range(G.dim()):
            gram = state.get(f"gram_{k}")
            if gram is not None:
                new = G[:, None] @ G[None, :] if G.dim() == 1 else mode_gram(G, k)
                self.nonfinite_policy.keep(gram, gram.lerp(new, 1 - beta))

    def _refresh(
        self, state: dict[str, Any], group: dict[str, Any], old: list[torch.Tensor | None]
    ) -> None:
        """New bases from the Grams (a step decided on the host): ``v`` permuted to the new
        order of the columns, ``m`` carried from the old bases into the new ones."""
        m = project_back(state["exp_avg"], old)
        v = state["exp_avg_sq"]
        for k, basis in enumerate(old):
            if basis is None:
                continue
            gram = state[f"gram_{k}"]
            if group["basis"] == "dct":
                new = self._new_basis(gram, basis.shape[1], group)
                v = _moved(v, k, basis, new)
            else:
                new, order = power_iteration(gram, basis)
                v = v.index_select(k, order)
                if self.process_group is not None:
                    broadcast_from_first(new, self.process_group)
            state[f"basis_{k}"] = new
        state["exp_avg_sq"] = v
        state["exp_avg"] = project(m, self._bases(state, len(old)))


def _moved(v: torch.Tensor, k: int, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The second moment along dimension ``k`` carried from ``old`` columns to ``new`` ones of
    one fixed basis: ``v ×_k (R ∘ R)`` with ``R = oldᵀ new``, a partial permutation (a
    column kept keeps its statistics, a new one starts at zero)."""
    R = (old.mT @ new).square()
    return torch.movedim(torch.tensordot(v, R, ([k], [0])), -1, k)
