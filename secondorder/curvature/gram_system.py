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

An insertion reads the host once: the new row's squared norm (is it finite?), any
other number its owner wants checked with it (the sparse window's accumulator), and
the factor's verdict (Cholesky's ``info``, or the update's accuracy check) come back in
one read, before anything is committed. A failed check (then a refactorisation) and
relative damping (``λ`` from the Gram matrix's trace) read it again.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_damping, check_positive_int
from .ldl import ldl_replace_row, ldl_row_error, ldl_solve

__all__ = ["FACTOR_UPDATES", "GramSystem", "NonFiniteRow", "Proposal", "rank2_is_faster"]

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


class NonFiniteRow(ValueError):
    """The inserted row (or a number checked with it) is NaN or Inf; nothing was changed."""


class Proposal:
    """An insertion :meth:`GramSystem.propose` has begun: what :meth:`GramSystem.settle`
    commits and :meth:`GramSystem.withdraw` undoes, and the 0-d tensors to read in between."""

    def __init__(
        self,
        slot: int,
        row: torch.Tensor,
        column: torch.Tensor,
        old_row: torch.Tensor,
        saved: tuple[int, int, int, float],
    ) -> None:
        self.slot = slot
        self.row, self.column = row, column  # views of the Gram matrix, written
        self.old_row = old_row  # what they held (the system's workspace)
        self.saved = saved  # the ring's bookkeeping and the damping before
        self.reads: list[torch.Tensor] = []
        self.chol: torch.Tensor | None = None  # a refactorisation's Cholesky factor
        self.new_damp = False  # whether the last read is the new relative damping
        self.update: tuple[torch.Tensor, torch.Tensor] | None = None  # an O(n²) update's L, D


def rank2_is_faster(num_grads: int, device: torch.device) -> bool:
    """Whether the O(n²) rank-2 up/down-date of an ``n × n`` LDLᵀ factor beats refactoring it."""
    threshold = _RANK2_THRESHOLD.get(device.type)
    return threshold is not None and num_grads >= threshold


def _check_finite(values: list[float]) -> None:
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteRow("the new row holds NaN or Inf")


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
        self._gram_transpose = self.gram.mT
        # K's factor L D Lᵀ in the leading n × n block of fixed m × m buffers, so that a saved
        # state has the same shapes at every n (torch.distributed.checkpoint loads into
        # tensors of the saved shape)
        self._factor = torch.zeros(num_grads, num_grads, dtype=SMALL_DTYPE, device=device)
        self._pivots = torch.zeros(num_grads, dtype=SMALL_DTYPE, device=device)
        # a fresh Cholesky factor C = L·√D not yet split into L and D (see _cholesky_factor)
        self._fresh: torch.Tensor | None = None
        # [2m, 1], zero but for the number n at m: n e_s is the window [m − s, m − s + n)
        self._one_hot = torch.zeros(2 * num_grads, 1, dtype=SMALL_DTYPE, device=device)
        self._one_hot_scale = 0
        self.num_stored = 0
        self.next_position = 0  # the ring's next slot once full
        self.updates_since_refactor = 0
        self.num_refactors = 0
        self.num_failed_checks = 0
        # Workspace, so that a step allocates nothing small (right after a pass over a large
        # window, each allocation cost ~40 µs on the development CPU, ten times its work):
        # the numbers of the step's one host read, the replaced Gram row (for a rollback),
        # and, for a window refactored every step, two column-major m × m buffers that
        # LAPACK factors in place, in turn (the fresh factor lives in one until the next
        # step succeeds in the other).
        self._verdict = torch.empty(4, dtype=SMALL_DTYPE, device=device)
        self._verdict_entries = list(self._verdict)
        self._verdict_prefixes = [self._verdict[:k] for k in range(5)]
        self._saved_row = torch.empty(num_grads, dtype=SMALL_DTYPE, device=device)
        self._info = torch.empty((), dtype=torch.int32, device=device)
        self._scratch: list[torch.Tensor] = []
        self._scratch_transposes: list[torch.Tensor] = []
        self._cache_views()

    def _cache_views(self) -> None:
        """Views of the buffers for the ``n`` rows in use (indexing from Python costs more
        than the small operations themselves), rebuilt when ``n`` changes."""
        n, m = self.num_stored, self.num_grads
        self._views_n = n
        self._gram_n = self.gram[:n, :n]
        self._factor_n = self._factor[:n, :n]
        self._pivots_n = self._pivots[:n]
        self._saved_row_n = self._saved_row[:n]
        # the two triangular solves land here; the second's column is the coefficients
        self._halfway = torch.empty(n, 1, dtype=SMALL_DTYPE, device=self.gram.device)
        self._solution = torch.empty(n, 1, dtype=SMALL_DTYPE, device=self.gram.device)
        self._coefficients = self._solution[:, 0]
        if n == m:  # the steady state: a view per slot of its Gram row, column and entry,
            self._rows = list(self.gram)  # and of n e_s (a window of the one-hot column)
            self._columns = list(self.gram.mT)
            self._entries = list(self.gram.diagonal())
            self._unit_columns = [self._one_hot[m - s : 2 * m - s] for s in range(m)]

    def _views(self) -> None:
        if self._views_n != self.num_stored:
            self._cache_views()

    @property
    def factor(self) -> torch.Tensor:
        """``L`` of ``K = L D Lᵀ`` (unit lower triangular, ``n × n``; a view)."""
        self._split_fresh()
        self._views()
        return self._factor_n

    @property
    def pivots(self) -> torch.Tensor:
        """``D`` of ``K = L D Lᵀ`` (``n`` positive numbers; a view)."""
        self._split_fresh()
        self._views()
        return self._pivots_n

    def _set_factor(self, L: torch.Tensor, D: torch.Tensor) -> None:
        n = L.shape[0]
        self._fresh = None
        self._factor[:n, :n] = L
        self._pivots[:n] = D

    def _split_fresh(self) -> None:
        """``L = C / diag(C)`` and ``D = diag(C)²`` into the buffers, from a fresh Cholesky
        factor ``C`` kept as it came (row-major: the elementwise work of the up/down-date
        stays contiguous). Done when the factor is asked for: a window that refactors every
        step solves with ``C`` directly and never pays for it."""
        chol = self._fresh
        if chol is None:
            return
        self._fresh = None
        n = chol.shape[0]
        root = chol.diagonal()
        torch.div(chol, root, out=self._factor[:n, :n])
        torch.square(root, out=self._pivots[:n])

    @property
    def nbytes(self) -> int:
        """The Gram matrix, the factor and its pivots (what :meth:`estimate_bytes` counts).
        Not counted: workspace of ``O(m)`` numbers, and, for a window that refactors every
        step (below the rank-2 threshold, so ``m < 512``), two ``m × m`` float64 matrices
        that LAPACK factors in place (at most 4 MiB)."""
        tensors = (self.gram, self._factor, self._pivots)
        return sum(t.numel() * t.element_size() for t in tensors)

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
        self._views()
        K = self._gram_n.clone()
        K.diagonal().add_(n * self.damp)
        return K

    def insert(
        self,
        slot: int,
        gram_row: torch.Tensor,
        check: torch.Tensor | None = None,
        *,
        check_finite: bool = True,
    ) -> None:
        """Record that ``slot`` now holds a row whose dot products with the ``n`` rows in use
        are ``gram_row``, and bring the factor of ``K`` up to date.

        Raises :class:`NonFiniteRow` if the row's squared norm ``gram_row[slot]`` (NaN or Inf
        whenever the row holds one) or ``check`` (a 0-d tensor, if given) is not finite
        (unless ``check_finite=False``), and ``torch.linalg.LinAlgError`` if the new ``K`` is
        not numerically positive definite; either way the system is as it was. Both
        verdicts are read in one host synchronisation, before anything is committed.

        :meth:`propose`, a read of its ``reads`` and :meth:`settle`: an owner that reads
        other numbers too (an optimiser's verdict on the gradients, other windows') calls
        those itself, so that one synchronisation serves them all."""
        proposal = self.propose(slot, gram_row, check, check_finite=check_finite)
        self.settle(proposal, self._read(*proposal.reads))

    def propose(
        self,
        slot: int,
        gram_row: torch.Tensor,
        check: torch.Tensor | None = None,
        *,
        check_finite: bool = True,
    ) -> Proposal:
        """:meth:`insert` up to its host read: the Gram row is written and the new factor
        computed on the device, nothing is read. The returned proposal's ``reads`` (0-d
        tensors) are to be read on the host and handed to :meth:`settle`, or the proposal
        given up with :meth:`withdraw`; nothing else may change the system in between."""
        n = gram_row.shape[0]
        filling = n > self.num_stored
        if filling:
            row, column, entry = self.gram[slot, :n], self.gram[:n, slot], self.gram[slot, slot]
            old_row = self._saved_row[:n].copy_(row)
        else:  # the cached views of a full window
            self._views()
            row, column, entry = self._rows[slot], self._columns[slot], self._entries[slot]
            old_row = self._saved_row_n.copy_(row)
        saved = (self.num_stored, self.next_position, self.updates_since_refactor, self.damp)
        row.copy_(gram_row)
        column.copy_(gram_row)
        self.num_stored = n
        self.next_position = (slot + 1) % self.num_grads
        due = (
            self.refactor_every is not None
            and self.updates_since_refactor + 1 >= self.refactor_every
        )
        checks = ([entry] if check is None else [entry, check]) if check_finite else []
        proposal = Proposal(slot, row, column, old_row, saved)
        if filling or due or self.factor_update == "refactor":
            chol, info, damp = self._cholesky()
            proposal.chol, proposal.new_damp = chol, damp is not None
            proposal.reads = [*checks, info, *([] if damp is None else [damp])]
        else:
            L, D = ldl_replace_row(self.factor, self.pivots, slot, row - old_row)
            proposal.update = (L, D)
            proposal.reads = [*checks, ldl_row_error(L, D, self.matrix(), slot)]
        return proposal

    def settle(self, proposal: Proposal, values: list[float]) -> None:
        """Commit a :meth:`propose`'d insertion given the values of its ``reads``, or raise
        (:class:`NonFiniteRow`, ``torch.linalg.LinAlgError``) with the system as it was. An
        O(n²) update that fails its accuracy check is replaced by a refactorisation, which
        reads the host again."""
        values = list(values)
        try:
            if proposal.update is None:
                if proposal.new_damp:
                    self.damp = values.pop()
                *values, failed = values
                _check_finite(values)
                if failed:
                    raise torch.linalg.LinAlgError("K is not positive definite")
                assert proposal.chol is not None  # a refactorisation's proposal
                self._commit_cholesky(proposal.chol)
                return
            *values, error = values
            _check_finite(values)
            if error <= self.check_tol:  # False for NaN
                self._set_factor(*proposal.update)
                self.updates_since_refactor += 1
                return
            self.num_failed_checks += 1
            self.refactor()
        except (torch.linalg.LinAlgError, NonFiniteRow):
            self.withdraw(proposal)
            raise

    def withdraw(self, proposal: Proposal) -> None:
        """Give up a :meth:`propose`'d insertion: the system is as it was before it."""
        proposal.row.copy_(proposal.old_row)
        proposal.column.copy_(proposal.old_row)
        self.num_stored, self.next_position, self.updates_since_refactor, self.damp = proposal.saved

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
        """Factor ``K`` afresh, O(n³); with relative damping, recompute ``λ`` first. Raises
        ``torch.linalg.LinAlgError`` (the factor unchanged, ``λ`` recomputed) if ``K`` is not
        positive definite."""
        chol, info, damp = self._cholesky()
        values = self._read(info, *([] if damp is None else [damp]))
        if damp is not None:
            self.damp = values[1]
        if values[0]:
            raise torch.linalg.LinAlgError("K is not positive definite")
        self._commit_cholesky(chol)

    def _cholesky(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The Cholesky factor of ``K``, LAPACK's ``info`` (nonzero: not positive definite)
        and, under relative damping, the new ``λ`` (0-d; ``None`` otherwise), computed on the
        device for the caller to read with the rest: nothing committed, nothing read."""
        n = self.num_stored
        damp = None
        shift: torch.Tensor | float = n * self.damp
        if self.relative_damp is not None and n:
            self._views()
            mean_square = self._gram_n.diagonal().sum() / (n * self.dim)
            damp = (self.relative_damp * mean_square).clamp_min_(_SMALLEST_DAMPING)
            shift = damp * n
        if n < self.num_grads or self.factor_update != "refactor":
            self._views()
            K = self._gram_n.clone()
            K.diagonal().add_(shift)
            return (*torch.linalg.cholesky_ex(K), damp)
        if not self._scratch:
            m, device = self.num_grads, self.gram.device
            self._scratch = [
                torch.empty(m, m, dtype=SMALL_DTYPE, device=device).mT for _ in range(2)
            ]
            self._scratch_diagonals = [buffer.diagonal() for buffer in self._scratch]
            self._scratch_transposes = [buffer.mT for buffer in self._scratch]
        index = 1 if self._fresh is self._scratch[0] else 0
        # the Gram matrix is symmetric, and its transpose is laid out as the buffer: a
        # straight copy
        K = self._scratch[index].copy_(self._gram_transpose)
        self._scratch_diagonals[index].add_(shift)
        return (*torch.linalg.cholesky_ex(K, out=(K, self._info)), damp)

    def _read(self, *scalars: torch.Tensor) -> list[float]:
        """The values of 0-d tensors of the system's device, in one host synchronisation."""
        for entry, scalar in zip(self._verdict_entries, scalars, strict=False):
            entry.copy_(scalar)
        return self._verdict_prefixes[len(scalars)].tolist()

    def _commit_cholesky(self, chol: torch.Tensor) -> None:
        self._fresh = chol  # split into L and D when asked for (_split_fresh)
        self.updates_since_refactor = 0
        self.num_refactors += 1

    def solve(self, t: torch.Tensor) -> torch.Tensor:
        """``K⁻¹ t`` in float64, with one step of iterative refinement."""
        t = t.to(SMALL_DTYPE)
        L, D = self.factor, self.pivots
        c = ldl_solve(L, D, t)
        n = self.num_stored
        residual = t - self._gram_n @ c - (n * self.damp) * c
        return c + ldl_solve(L, D, residual)

    def solve_inserted(self, slot: int) -> torch.Tensor:
        r"""``K⁻¹ (n e_s)``: the coefficients of ``F⁻¹ c_s = n Cᵀ K⁻¹ e_s`` for the row in ``slot``.

        Since ``C c_s = (K − nλI) e_s``, Woodbury collapses to this for a row of the window:
        nothing is subtracted, so it keeps its accuracy for tiny ``λ``. A factor fresh from a
        Cholesky factorisation is backward stable, and one solve with it (two triangular
        solves) is as accurate as float64 allows for this ``K``, so
        it takes no refinement; a factor carried by O(n²) updates passed a relative accuracy
        check of ``check_tol`` only, and its solve takes one step of iterative refinement."""
        n = self.num_stored
        if self._one_hot_scale != n:
            self._one_hot[self.num_grads] = n
            self._one_hot_scale = n
        self._views()
        m = self.num_grads
        rhs = self._unit_columns[slot] if n == m else self._one_hot[m - slot : m - slot + n]
        if self._fresh is None:
            return self.solve(rhs[:, 0])
        # C Cᵀ c = n e_s by two triangular solves into buffers (torch.cholesky_solve would
        # allocate, which costs more than the solve here), the second's column a ready view:
        # the coefficients are used at once (converted, or read by the combine pass) and
        # overwritten only by the next solve
        C = self._fresh
        CT = next(  # a cached view if C is a workspace buffer (making one costs ~a solve)
            (
                T
                for buffer, T in zip(self._scratch, self._scratch_transposes, strict=True)
                if buffer is C
            ),
            None,
        )
        if CT is None:
            CT = C.mT
        torch.linalg.solve_triangular(C, rhs, upper=False, out=self._halfway)
        torch.linalg.solve_triangular(CT, self._halfway, upper=True, out=self._solution)
        return self._coefficients

    def reset(self) -> None:
        """Forget every row."""
        self.gram.zero_()
        self._factor.zero_()
        self._pivots.zero_()
        self._fresh = None
        self.num_stored = self.next_position = self.updates_since_refactor = 0

    def state_dict(self) -> dict[str, Any]:
        self._split_fresh()
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
        shapes: dict[str, list[tuple[int, ...]]] = {
            "gram": [(m, m)],
            "factor": [(m, m), (n, n)],
            "pivots": [(m,), (n,)],
        }
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
        self._fresh = None
        factor, pivots = state["factor"], state["pivots"]
        self._factor[: factor.shape[0], : factor.shape[1]] = factor.to(device, SMALL_DTYPE)
        self._pivots[: pivots.shape[0]] = pivots.to(device, SMALL_DTYPE)
        self.num_stored = n
        self.next_position = int(state["next_slot"])
        self.updates_since_refactor = int(state["updates_since_refactor"])
        if self.relative_damp is not None:
            self.damp = float(state["current_damp"])
