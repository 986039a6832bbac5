r"""The small system shared by every sliding M-FAC window, whatever its rows hold.

A window keeps ``m = num_grads`` slots of rows ``c_1 … c_n`` (``n ≤ m`` in use), dense
gradients or compressed ones. Whatever they are, its inverse Fisher needs only their
Gram matrix: with ``C`` the ``n`` rows in use and damping ``λ``,

    F = λ I + (1/n) Cᵀ C,        F⁻¹ x = (1/λ) (x − Cᵀ K⁻¹ C x),        K = n λ I + C Cᵀ,

so a window is "rows, and two passes over them" (``C x`` and ``Cᵀ y``) plus this
module's :class:`GramSystem`: the ``m × m`` Gram matrix ``C Cᵀ`` in float64, ``K``'s
LDLᵀ factor, and the ring's bookkeeping (which slot is next, how many are in use).

Replacing one row changes one row and column of ``K``: a rank-2 modification of the
factor, done in O(n²) (:func:`~.ldl.ldl_replace_row`) and checked on the changed row
and the diagonal; while the window fills, ``n`` (and so the shift ``nλ``) changes every
step and ``K`` is refactored, O(n³) for the first ``m`` steps only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_damping, check_positive_int
from .ldl import ldl_factor, ldl_replace_row, ldl_row_error, ldl_solve

__all__ = ["FACTOR_UPDATES", "GramSystem", "rank2_is_faster"]

# The n × n system is small; it is always solved in float64.
SMALL_DTYPE = torch.float64

FACTOR_UPDATES = ("auto", "rank2", "refactor")

# The relative damping of rows that are all zero: the smallest normal float64, so that
# K stays invertible (F⁻¹ is then applied to zero gradients only).
_SMALLEST_DAMPING = torch.finfo(torch.float64).tiny

# Smallest window for which the O(n²) up/down-date of K's factor beats a fresh
# Cholesky, per device type (docs/benchmarks.md, "Small system"). CPU, measured: they
# tie at 256; the update wins 1.2-2.5x at 512 and 1.9-2.7x from 1024 to 4096.
# CUDA: an estimate (no GPU was available to measure it): ~40 small kernels against
# a latency-bound cuSOLVER factorisation.
_RANK2_THRESHOLD: dict[str, int | None] = {"cuda": 256, "cpu": 512}


def rank2_is_faster(num_grads: int, device: torch.device) -> bool:
    """Whether the O(n²) rank-2 up/down-date of an ``n × n`` LDLᵀ factor beats refactoring it."""
    threshold = _RANK2_THRESHOLD.get(device.type)
    return threshold is not None and num_grads >= threshold


class GramSystem:
    r"""``K = n·damp·I + C Cᵀ`` over the rows in use of a ring of ``num_grads`` slots.

    The owner writes a row into :meth:`next_slot`'s slot, computes its dot products
    with every row in use (itself included) and hands them to :meth:`insert`, which
    brings ``K``'s factor up to date or, if ``K`` is no longer numerically positive
    definite, restores everything and raises ``torch.linalg.LinAlgError``.

    Damping is absolute (``λ = damp``), or relative to the scale of the gradients held:
    with ``relative_damp = ρ``, ``λ = ρ · tr(C Cᵀ) / (n · dim)``, ``ρ`` times the mean
    squared entry of the rows (the mean diagonal of ``(1/n) Cᵀ C``), as the pruner's
    ``relative_damp``. A ``λ`` that changed every step would spoil the O(n²) factor
    update (the shift ``nλ`` moves), so it is recomputed only when ``K`` is refactored
    anyway: every step while the window fills, then every ``refactor_every`` updates and
    after a failed check.

    Args:
        num_grads: slots in the ring, ``m``.
        damp: ``λ > 0`` (with ``relative_damp``, only the value before the first row).
        device: where the ``m × m`` matrices live.
        refactor_every: refactor at least every this many updates (``None``: only when a
            check fails; ``-1``: every ``num_grads``, O(n²) amortised).
        check_tol: relative error of an updated factor that triggers a refactorisation.
        factor_update: ``"rank2"``, ``"refactor"`` or ``"auto"`` (:func:`rank2_is_faster`).
        relative_damp: ``ρ > 0`` for relative damping, or ``None``.
        dim: the number of coordinates of a row (over every rank of a sharded window), for
            relative damping.
    """

    def __init__(
        self,
        num_grads: int,
        damp: float,
        *,
        device: torch.device,
        refactor_every: int | None = -1,
        check_tol: float = 1e-10,
        factor_update: str = "auto",
        relative_damp: float | None = None,
        dim: int = 1,
    ) -> None:
        self.num_grads = check_positive_int(num_grads, "num_grads")
        self.damp = check_damping(damp)
        self.relative_damp = (
            None if relative_damp is None else check_damping(relative_damp, "relative_damp")
        )
        self.dim = check_positive_int(dim, "dim")
        if refactor_every == -1:
            refactor_every = num_grads
        if refactor_every is not None:
            check_positive_int(refactor_every, "refactor_every")
        if factor_update not in FACTOR_UPDATES:
            raise ValueError(
                f"factor_update must be 'auto', 'rank2' or 'refactor', got {factor_update!r}"
            )
        if factor_update == "auto":
            factor_update = "rank2" if rank2_is_faster(num_grads, device) else "refactor"
        self.refactor_every = refactor_every
        self.check_tol = check_tol
        self.factor_update = factor_update
        self.gram = torch.zeros(num_grads, num_grads, dtype=SMALL_DTYPE, device=device)
        # K's factor L D Lᵀ in the leading n × n block of fixed m × m buffers, so that a saved
        # state has the same shapes at every n (torch.distributed.checkpoint loads into
        # tensors of the saved shape)
        self._factor = torch.zeros(num_grads, num_grads, dtype=SMALL_DTYPE, device=device)
        self._pivots = torch.zeros(num_grads, dtype=SMALL_DTYPE, device=device)
        self.num_stored = 0
        self.next_position = 0  # the ring's next slot once full
        self.updates_since_refactor = 0
        self.num_refactors = 0
        self.num_failed_checks = 0

    @property
    def factor(self) -> torch.Tensor:
        """``L`` of ``K = L D Lᵀ`` (unit lower triangular, ``n × n``; a view)."""
        n = self.num_stored
        return self._factor[:n, :n]

    @property
    def pivots(self) -> torch.Tensor:
        """``D`` of ``K = L D Lᵀ`` (``n`` positive numbers; a view)."""
        return self._pivots[: self.num_stored]

    def _set_factor(self, L: torch.Tensor, D: torch.Tensor) -> None:
        n = L.shape[0]
        self._factor[:n, :n] = L
        self._pivots[:n] = D

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gram, self._factor, self._pivots))

    @staticmethod
    def estimate_bytes(num_grads: int) -> int:
        """The Gram matrix and the factor (two ``m × m`` float64 matrices) and its pivots."""
        return (2 * num_grads + 1) * num_grads * 8

    def next_slot(self) -> tuple[int, int]:
        """``(slot, n)``: where the next row goes and how many rows are in use once it is there."""
        filling = self.num_stored < self.num_grads
        slot = self.num_stored if filling else self.next_position
        return slot, self.num_stored + filling

    def slots_oldest_first(self) -> list[int]:
        """The slots in use, from the oldest row to the newest."""
        n = self.num_stored
        if n < self.num_grads:
            return list(range(n))
        return [(self.next_position + i) % n for i in range(n)]

    def matrix(self) -> torch.Tensor:
        """``K = n·damp·I + C Cᵀ`` for the ``n`` rows in use (a new tensor)."""
        n = self.num_stored
        K = self.gram[:n, :n].clone()
        K.diagonal().add_(n * self.damp)
        return K

    def insert(self, slot: int, gram_row: torch.Tensor) -> None:
        """Record that ``slot`` now holds a row whose dot products with the ``n`` rows in use
        are ``gram_row``, and bring the factor of ``K`` up to date.

        Raises ``torch.linalg.LinAlgError``, with the system as it was, if the new ``K`` is
        not numerically positive definite."""
        gram_row = gram_row.to(SMALL_DTYPE)
        filling = self.num_stored < self.num_grads
        n = gram_row.shape[0]
        old_row = self.gram[slot, :n].clone()
        saved = (self.num_stored, self.next_position, self.updates_since_refactor, self.damp)
        self.gram[slot, :n] = gram_row
        self.gram[:n, slot] = gram_row
        self.num_stored = n
        self.next_position = (slot + 1) % self.num_grads
        due = (
            self.refactor_every is not None
            and self.updates_since_refactor + 1 >= self.refactor_every
        )
        try:
            if filling or due or self.factor_update == "refactor":
                self.refactor()
            else:
                self._update_factor(slot, gram_row - old_row)
        except torch.linalg.LinAlgError:
            self.gram[slot, :n] = old_row
            self.gram[:n, slot] = old_row
            self.num_stored, self.next_position, self.updates_since_refactor, self.damp = saved
            raise

    def replace(self, slots: list[int], gram: torch.Tensor) -> None:
        """The rows in ``slots`` (all rows in use) were all changed and their Gram matrix is now
        ``gram`` (in the order of ``slots``): refactor ``K``. Raises
        ``torch.linalg.LinAlgError``, with the system as it was, if ``K`` is not positive
        definite."""
        index = torch.tensor(slots, device=self.gram.device)
        saved, damp = self.gram.clone(), self.damp
        self.gram[index[:, None], index[None, :]] = gram.to(SMALL_DTYPE)
        try:
            self.refactor()
        except torch.linalg.LinAlgError:
            self.gram.copy_(saved)
            self.damp = damp
            raise

    def refactor(self) -> None:
        """Factor ``K`` afresh, O(n³); with relative damping, recompute ``λ`` first."""
        if self.relative_damp is not None and self.num_stored:
            n = self.num_stored
            mean_square = float(self.gram[:n, :n].diagonal().sum()) / (n * self.dim)
            self.damp = max(self.relative_damp * mean_square, _SMALLEST_DAMPING)
        self._set_factor(*ldl_factor(self.matrix()))
        self.updates_since_refactor = 0
        self.num_refactors += 1

    def _update_factor(self, slot: int, delta: torch.Tensor) -> None:
        updated = ldl_replace_row(self.factor, self.pivots, slot, delta)
        if updated is not None:
            error = ldl_row_error(*updated, self.matrix(), slot)
            if math.isfinite(error) and error <= self.check_tol:
                self._set_factor(*updated)
                self.updates_since_refactor += 1
                return
        self.num_failed_checks += 1
        self.refactor()

    def solve(self, t: torch.Tensor) -> torch.Tensor:
        """``K⁻¹ t`` in float64, with one step of iterative refinement."""
        t = t.to(SMALL_DTYPE)
        c = ldl_solve(self.factor, self.pivots, t)
        n = self.num_stored
        residual = t - self.gram[:n, :n] @ c - (n * self.damp) * c
        return c + ldl_solve(self.factor, self.pivots, residual)

    def solve_inserted(self, slot: int) -> torch.Tensor:
        r"""``K⁻¹ (n e_s)``: the coefficients of ``F⁻¹ c_s = n Cᵀ K⁻¹ e_s`` for the row in ``slot``.

        Since ``C c_s = (K − nλI) e_s``, Woodbury collapses to this for a row of the window:
        nothing is subtracted, so it keeps its accuracy for tiny ``λ``."""
        n = self.num_stored
        unit = torch.zeros(n, dtype=SMALL_DTYPE, device=self.gram.device)
        unit[slot] = n
        return self.solve(unit)

    def reset(self) -> None:
        """Forget every row."""
        self.gram.zero_()
        self._factor.zero_()
        self._pivots.zero_()
        self.num_stored = self.next_position = self.updates_since_refactor = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "current_damp": self.damp,
            "num_stored": self.num_stored,
            "next_slot": self.next_position,
            "updates_since_refactor": self.updates_since_refactor,
            "gram": self.gram,
            "factor": self._factor,
            "pivots": self._pivots,
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state`` can be loaded (nothing is changed)."""
        m = self.num_grads
        n = int(state["num_stored"])
        if not 0 <= n <= m or not 0 <= int(state["next_slot"]) < m:
            raise ValueError(f"a saved ring position is outside a window of {m} slots")
        # the first release saved the n × n factor itself
        shapes = {"gram": [(m, m)], "factor": [(m, m), (n, n)], "pivots": [(m,), (n,)]}
        for key, allowed in shapes.items():
            if tuple(state[key].shape) not in allowed:
                raise ValueError(
                    f"saved {key} has shape {tuple(state[key].shape)}, expected {allowed[0]}"
                )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (call :meth:`check_state` first)."""
        device = self.gram.device
        self.gram.copy_(state["gram"])
        n = int(state["num_stored"])
        self._factor.zero_()
        self._pivots.zero_()
        factor, pivots = state["factor"], state["pivots"]
        self._factor[: factor.shape[0], : factor.shape[1]] = factor.to(device, SMALL_DTYPE)
        self._pivots[: pivots.shape[0]] = pivots.to(device, SMALL_DTYPE)
        self.num_stored = n
        self.next_position = int(state["next_slot"])
        self.updates_since_refactor = int(state["updates_since_refactor"])
        if self.relative_damp is not None:
            self.damp = float(state["current_damp"])
