r"""Sliding M-FAC windows: the inverse empirical Fisher of the last ``num_grads`` gradients.

A window is *rows* (where the gradients live and how two passes run over them) on top
of the :class:`~.gram_system.GramSystem` every window shares (the ``n × n`` system and
its O(n²) factor updates). :class:`SlidingWindow` is that skeleton; a subclass fills in
the rows:

- :class:`SlidingWindowMFAC` keeps whole gradients, ``num_grads × dim`` numbers;
- :class:`~.sparse_window.SparseSlidingWindowMFAC` keeps ``k = ⌈density·dim⌉`` values and
  their coordinates per gradient, with error feedback (EFCP).

With the rows ``C`` in use (``n`` of them), damping ``λ`` and ``K = nλI + C Cᵀ``:

    F = λ I + (1/n) Cᵀ C,      F⁻¹ x = (x − Cᵀ K⁻¹ C x) / λ,      F⁻¹ c_s = n Cᵀ K⁻¹ e_s,

the last for a row ``c_s`` of the window itself (the optimiser's product), which
subtracts nothing and so keeps its accuracy for tiny ``λ``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from .. import kernels
from .._checks import check_damping, check_finite, check_positive_int, ensure_fits
from .._distributed import all_reduce_sum, rank_and_world
from ..errors import NonFiniteError, NotPositiveDefiniteError
from .fisher_operators import FisherOperator, InverseFisherOperator
from .gram_system import GramSystem, NonFiniteRow, Proposal

__all__ = ["PendingUpdate", "SlidingWindow", "SlidingWindowMFAC"]


class PendingUpdate:
    """A gradient :meth:`SlidingWindowMFAC.begin_update` has written: ``reads`` are the 0-d
    tensors whose values :meth:`SlidingWindow.finish_update_solve` needs."""

    def __init__(self, proposal: Proposal, gram_row: torch.Tensor) -> None:
        self.proposal, self.gram_row = proposal, gram_row

    @property
    def reads(self) -> list[torch.Tensor]:
        return self.proposal.reads


class SlidingWindow(InverseFisherOperator, ABC):
    """The skeleton of a sliding M-FAC window; subclasses say where the rows live.

    A window is the linear operator ``F⁻¹`` of the gradients it holds (``window @ v``,
    ``shape``; the estimators run on it) and :meth:`fisher` gives ``F``; a sharded window
    is the operator of its own shard (``shape`` is its local ``dim``).

    A subclass sets its own settings, then calls ``super().__init__`` (which validates
    the common ones, checks memory with :meth:`_required_bytes` and calls
    :meth:`_allocate_rows`), and fills in the row methods below. Everything else (the
    checks on input vectors, the small system, distributed reductions, rollback on
    failure, ``solve``, state dicts) is shared.
    """

    #: saved in :meth:`state_dict` so that one kind of window refuses another's state
    kind: ClassVar[str]

    def __init__(
        self,
        dim: int,
        num_grads: int,
        damp: float,
        *,
        device: torch.device | str | None,
        dtype: torch.dtype,
        storage_dtype: torch.dtype | None,
        refactor_every: int | None,
        check_tol: float,
        factor_update: str,
        process_group: torch.distributed.ProcessGroup | None,
        relative_damp: float | None = None,
    ) -> None:
        self.dim = check_positive_int(dim, "dim")
        self.num_grads = check_positive_int(num_grads, "num_grads")
        self._damp_setting = check_damping(damp)
        self.relative_damp = (
            None if relative_damp is None else check_damping(relative_damp, "relative_damp")
        )
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        storage_dtype = dtype if storage_dtype is None else storage_dtype
        if not isinstance(storage_dtype, torch.dtype) or not storage_dtype.is_floating_point:
            raise TypeError(f"storage_dtype must be a floating dtype, got {storage_dtype}")
        self.dtype = dtype
        self.storage_dtype = storage_dtype
        self.process_group = process_group
        self.rank, self.world_size = rank_and_world(process_group)
        device = torch.device("cpu") if device is None else torch.device(device)
        ensure_fits(
            self._required_bytes(),
            device,
            what=f"a window of {num_grads} {self._row_description()} in {storage_dtype}",
            advice=self._memory_advice(),
        )
        total_dim = dim
        if process_group is not None and self.relative_damp is not None:
            size = torch.tensor([dim], dtype=torch.float64, device=device)
            total_dim = int(all_reduce_sum(size, process_group).item())
        self._system = GramSystem(
            num_grads,
            damp,
            device=device,
            refactor_every=refactor_every,
            check_tol=check_tol,
            factor_update=factor_update,
            relative_damp=self.relative_damp,
            dim=total_dim,
        )
        self.device = self._system.gram.device  # "cuda" resolved to "cuda:0"
        self._coefficients = torch.empty(num_grads, dtype=dtype, device=self.device)
        self._allocate_rows()

    # ---------------------------------------------------------------- what subclasses fill in
    @abstractmethod
    def _required_bytes(self) -> int:
        """Bytes the window will hold, from its settings (checked before allocating)."""

    @abstractmethod
    def _row_description(self) -> str:
        """What one row is, for error messages (e.g. "gradients of 1000")."""

    @abstractmethod
    def _memory_advice(self) -> str:
        """What to change when the window does not fit."""

    @abstractmethod
    def _allocate_rows(self) -> None:
        """Allocate the storage of ``num_grads`` rows (zeros)."""

    @abstractmethod
    def _write_row(self, slot: int, row: Any, n: int) -> torch.Tensor:
        """Store ``row`` in ``slot`` (keeping what it replaces for :meth:`_restore_row`) and
        return its dot products with the ``n`` rows in use (this rank's part of them)."""

    @abstractmethod
    def _restore_row(self, slot: int) -> None:
        """Put back the row that the last :meth:`_write_row` replaced."""

    def _commit_row(self, slot: int) -> None:
        """The step that wrote ``slot`` was accepted (a row may be written only now)."""

    @abstractmethod
    def _row_dots(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``C[:n] x`` for a dense ``x`` (this rank's part)."""

    @abstractmethod
    def _combine(
        self, c: torch.Tensor, n: int, x: torch.Tensor | None = None, scale: float = 0.0
    ) -> torch.Tensor:
        """``scale · x + C[:n]ᵀ c``, dense, in the accumulation dtype."""

    @abstractmethod
    def _dense_rows(self, slots: list[int]) -> torch.Tensor:
        """The rows in ``slots`` as a dense ``[len(slots), dim]`` tensor in ``dtype``."""

    @abstractmethod
    def _rows_state(self) -> dict[str, Any]:
        """The rows' tensors and settings, for :meth:`state_dict`."""

    @abstractmethod
    def _check_rows_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`_load_rows_state` can load ``state``."""

    @abstractmethod
    def _load_rows_state(self, state: dict[str, Any]) -> None:
        """Restore the rows from a checked ``state``."""

    @abstractmethod
    def _reset_rows(self) -> None:
        """Forget every row."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held by the window: its rows, the ``n × n`` system and any other buffer of
        its size (not small workspace: see :attr:`~.gram_system.GramSystem.nbytes`)."""

    @abstractmethod
    def update(self, g: torch.Tensor) -> None:
        """Add gradient ``g`` to the window (evicting the oldest once full)."""

    @abstractmethod
    def update_solve(self, g: torch.Tensor) -> torch.Tensor:
        """Add ``g`` to the window and return the inverse-Fisher product of it (as the window
        stores it) with the new window: one optimiser step."""

    # ---------------------------------------------------------------- the shared machinery
    @property
    def num_stored(self) -> int:
        """Number of gradients held, ``n ≤ num_grads``."""
        return self._system.num_stored

    @property
    def damp(self) -> float:
        """The damping ``λ`` in use (with ``relative_damp``, as last recomputed)."""
        return self._system.damp

    @property
    def factor_update(self) -> str:
        """How a full window keeps ``K``'s factor current: ``"rank2"`` or ``"refactor"``."""
        return self._system.factor_update

    @factor_update.setter
    def factor_update(self, value: str) -> None:
        if value not in ("rank2", "refactor"):
            raise ValueError(f"factor_update must be 'rank2' or 'refactor', got {value!r}")
        self._system.factor_update = value

    @property
    def num_refactors(self) -> int:
        """How many times the small system was factored afresh."""
        return self._system.num_refactors

    @property
    def num_failed_checks(self) -> int:
        """How many O(n²) factor updates failed their accuracy check (then refactored)."""
        return self._system.num_failed_checks

    def gradients(self) -> torch.Tensor:
        """The gradients held, oldest first, as a dense ``[num_stored, dim]`` tensor in ``dtype``
        (a copy, as stored: rounded to ``storage_dtype``, compressed for a sparse window)."""
        return self._dense_rows(self._system.slots_oldest_first())

    def _vector(self, x: torch.Tensor, name: str, *, check_finite: bool = True) -> torch.Tensor:
        """``x`` checked (type, shape, device; NaN and Inf unless ``check_finite=False``, as
        for a gradient, whose insertion checks it) and converted to ``dtype``, contiguous."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.shape != (self.dim,):
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; this window holds vectors of shape ({self.dim},)"
            )
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the window is on {self.device}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if check_finite:
            self._check_finite(x, name)
        # (each call into torch costs microseconds even when it does nothing; this runs on
        # every step)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return x if x.is_contiguous() else x.contiguous()

    def _check_finite(self, x: torch.Tensor, name: str) -> None:
        """Raise :class:`NonFiniteError` naming the NaN and Inf entries of ``x`` (under a
        process group, of every rank's shard: every rank raises, or the others would wait
        in the next all-reduce)."""
        if self.process_group is None:
            check_finite(x, name)
            return
        bad = 0 if bool(torch.isfinite(x.sum())) else int((~torch.isfinite(x)).sum())
        total = all_reduce_sum(torch.tensor([bad], device=self.device), self.process_group)
        if total.item():
            raise NonFiniteError(
                f"{name} has {total.item()} NaN or Inf entries in the shards of "
                f"{self.world_size} ranks ({bad} here, on rank {self.rank})"
            )

    def _insert(self, row: Any, x: torch.Tensor, check: torch.Tensor | None = None) -> int:
        """Write ``row`` (made from the gradient ``x``) into the ring and bring the small
        system up to date; return its slot.

        Whether the gradient is finite is not asked beforehand: the row's squared norm (the
        new diagonal entry of the Gram matrix, NaN or Inf whenever ``x`` has one there)
        and ``check`` (a 0-d tensor, finite exactly when ``x`` is; all-reduced with the dot
        products under a process group) are read in the small system's one host
        synchronisation. If either is not finite, the row is put back and ``x`` itself is
        checked, which raises :class:`NonFiniteError`, unless a square or a sum overflowed
        while every entry is finite: the row is then inserted without the check.

        If ``K`` is no longer numerically positive definite, the window is restored as it
        was and :class:`NotPositiveDefiniteError` is raised."""
        for verified in (True, False):
            slot, n = self._system.next_slot()
            dots = self._write_row(slot, row, n)
            if check is None:
                gram_row = all_reduce_sum(dots, self.process_group)
            else:
                # one all-reduce carries the dot products and the number checked with them
                reduced = all_reduce_sum(
                    torch.cat([dots, check.reshape(1).to(dots.dtype)]), self.process_group
                )
                gram_row, check = reduced[:-1], reduced[-1]
            try:
                self._system.insert(slot, gram_row, check, check_finite=verified)
                self._commit_row(slot)
                return slot
            except NonFiniteRow:
                self._restore_row(slot)
                self._check_finite(x, "gradient")
            except torch.linalg.LinAlgError:
                self._restore_row(slot)
                raise self._singular(n, gram_row) from None
        raise AssertionError("unreachable: an unverified insertion cannot fail its check")

    def _singular(self, n: int, gram_row: torch.Tensor) -> NotPositiveDefiniteError:
        accumulation = kernels.reference.accumulation_dtype(self.storage_dtype, self.dtype)
        rounding = torch.finfo(accumulation).eps * float(gram_row.abs().max())
        return NotPositiveDefiniteError(
            f"adding this gradient makes n·damp·I + G Gᵀ singular in floating point: "
            f"n·damp = {n * self.damp:.3g} is below the rounding of the dot products "
            f"(about eps·‖g‖² = {rounding:.3g}), as happens when gradients repeat. Use "
            "a larger damp, or dtype=torch.float64; the window is unchanged"
        )

    # ---------------------------------------------------------------- an update in two halves
    def finish_update_solve(self, pending: PendingUpdate, values: list[float]) -> torch.Tensor:
        """Commit a :meth:`begin_update` given the values of its ``reads`` and return ``F⁻¹ g``
        with the new window (as ``update_solve``). Raises
        :class:`~secondorder.errors.NotPositiveDefiniteError` with the window unchanged if
        the new system cannot be factored."""
        slot = pending.proposal.slot
        try:
            self._system.settle(pending.proposal, values)
        except torch.linalg.LinAlgError:
            self._restore_row(slot)
            raise self._singular(pending.gram_row.shape[0], pending.gram_row) from None
        self._commit_row(slot)
        return self._solve_inserted(slot)

    def cancel_update(self, pending: PendingUpdate) -> None:
        """Give up a :meth:`begin_update`: the window is as it was before it."""
        self._system.withdraw(pending.proposal)
        self._restore_row(pending.proposal.slot)

    def _solve_inserted(self, slot: int) -> torch.Tensor:
        """``F⁻¹ c_s = n Cᵀ K⁻¹ e_s`` for the row just inserted in ``slot``."""
        coefficients = self._system.solve_inserted(slot)
        n = self.num_stored
        if coefficients.dtype != self.dtype:  # into a buffer: no allocation (see GramSystem)
            buffer = self._coefficients if n == self.num_grads else self._coefficients[:n]
            coefficients = buffer.copy_(coefficients)
        return self._combine(coefficients, n)

    def solve(self, x: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
        """``F⁻¹ x = (x − Cᵀ K⁻¹ C x) / λ`` for any vector ``x`` of length ``dim``.

        When ``x`` lies mostly in the span of the window and ``λ`` is tiny the two
        terms nearly cancel, and float32 loses ``log10(‖x‖² / (n λ))`` digits
        (all of them at λ = 1e-7 for unit-scale gradients). Use ``dtype=torch.float64``
        there; ``update_solve``, the optimiser's product, has no such cancellation.
        ``check_finite=False`` skips the check of ``x`` for NaN and Inf (a host
        synchronisation), for a caller that has checked what ``x`` is made of.
        """
        x = self._vector(x, "x", check_finite=check_finite)
        n = self.num_stored
        if n == 0:
            return x / self.damp
        t = all_reduce_sum(self._row_dots(x, n), self.process_group)
        coefficients = -self._system.solve(t) / self.damp
        return self._combine(coefficients.to(self.dtype), n, x, 1.0 / self.damp)

    def fisher(self) -> FisherOperator:
        """The operator ``F = λ I + (1/n) Cᵀ C`` of the gradients held: ``F x`` is two passes."""
        return FisherOperator(self.dim, self.dtype, self.device, self._apply_fisher)

    def _apply_fisher(self, x: torch.Tensor) -> torch.Tensor:
        x = self._vector(x, "x")
        n = self.num_stored
        if n == 0:
            return self.damp * x
        t = all_reduce_sum(self._row_dots(x, n), self.process_group)
        return self._combine((t / n).to(self.dtype), n, x, self.damp)

    def reset(self) -> None:
        """Forget every gradient."""
        self._system.reset()
        self._reset_rows()

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only; loads with ``torch.load(weights_only=True)``."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "num_grads": self.num_grads,
            "damp": self._damp_setting,
            "relative_damp": self.relative_damp,
            "storage_dtype": str(self.storage_dtype).removeprefix("torch."),
            "world_size": self.world_size,
            "rank": self.rank,
            **self._system.state_dict(),
            **self._rows_state(),
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can load ``state`` (changes nothing)."""
        kind = state.get("kind", "dense")  # windows saved before sparse ones existed are dense
        if kind != self.kind:
            raise ValueError(f"cannot load the state of a {kind} window into a {self.kind} one")
        if (state.get("world_size", 1), state.get("rank", 0)) != (self.world_size, self.rank):
            raise ValueError(
                f"this window was saved by rank {state.get('rank', 0)} of "
                f"{state.get('world_size', 1)} and is loaded by rank {self.rank} of "
                f"{self.world_size}: a sharded window resumes only on the same ranks "
                "(resharding is not supported)"
            )
        mine = self.state_dict()
        state = {"relative_damp": None, **state}  # saved before relative damping existed
        keys: tuple[str, ...] = ("dim", "num_grads", "relative_damp", "storage_dtype")
        if self.relative_damp is None:
            keys += ("damp",)
        for key in keys:
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot load a window with {key}={state[key]!r} into one with {key}={mine[key]!r}"
                )
        self._system.check_state(state)
        self._check_rows_state(state)

    def grow_from(self, narrower: SlidingWindow) -> None:
        """Take the gradients of ``narrower``, a window of the same kind over the first
        ``narrower.dim`` of this window's coordinates: zero in the others (an optimiser's
        window growing for parameters that join it)."""
        state = narrower.state_dict()
        extra = self.dim - state["dim"]
        if extra < 0 or state["kind"] != self.kind:
            raise ValueError(f"cannot grow a {state['kind']} window of dim {state['dim']} into "
                             f"a {self.kind} one of dim {self.dim}")  # fmt: skip
        self.load_state_dict({**state, "dim": self.dim, **self._widened_rows(state, extra)})

    @abstractmethod
    def _widened_rows(self, state: dict[str, Any], extra: int) -> dict[str, Any]:
        """The rows' entries of a window's ``state`` with ``extra`` zero coordinates appended."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a window saved by :meth:`state_dict`; the next step is bit-identical.

        Everything is checked before anything changes (:meth:`check_state_dict`): a refused
        state leaves the window as it was."""
        self.check_state_dict(state)
        self._system.load_state_dict(state)
        self._load_rows_state(state)


def check_saved_tensor(state: dict[str, Any], key: str, like: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``state[key]`` is a tensor of ``like``'s shape and dtype."""
    saved = state.get(key)
    if not isinstance(saved, torch.Tensor):
        raise ValueError(f"the saved window has no tensor {key!r}")
    if saved.shape != like.shape or saved.dtype != like.dtype:
        raise ValueError(
            f"saved {key} is {saved.dtype} of shape {tuple(saved.shape)}, expected "
            f"{like.dtype} of shape {tuple(like.shape)}"
        )


class SlidingWindowMFAC(SlidingWindow):
    r"""Inverse empirical Fisher of the last ``num_grads`` gradients, one gradient at a time.

    ``F = damp·I + (1/n) Σ g_i g_iᵀ`` over the ``n ≤ num_grads`` gradients held;
    once full, each new gradient evicts the oldest.

    One :meth:`update_solve` (an optimiser step) makes two passes over the
    ``num_grads × dim`` window, the floor of the algorithm: one that writes the
    new gradient into its slot and computes ``t = G g`` at the same time, and
    one that forms ``n Gᵀ K⁻¹ e_s``. In between, the ``n × n`` system
    ``K = n·damp·I + G Gᵀ = L D Lᵀ`` is kept current
    (:class:`~secondorder.curvature.gram_system.GramSystem`):

    - while the window fills, ``n`` (and so the shift ``n·damp``) changes every
      step, and ``K`` is refactored: O(n³), for the first ``num_grads`` steps only;
    - once full, a new gradient changes one row and column of ``K``, a rank-2
      modification of ``L D Lᵀ`` done in O(n²) (:func:`~.ldl.ldl_replace_row`).
      The factor is checked against ``K`` on the changed row and the diagonal
      (O(n²)) and refactored if the error exceeds ``check_tol``, and anyway every
      ``refactor_every`` updates (default ``num_grads``: O(n²) amortised), so
      rounding errors cannot build up. A solve with an updated factor takes one step
      of iterative refinement; with a fresh Cholesky factor it needs none.

    Whether the new gradient is finite is read from the step itself (its squared norm,
    the new diagonal entry of ``G Gᵀ``) together with the factor's verdict, in one host
    synchronisation; a NaN or Inf gradient is then taken out again and
    :class:`~secondorder.errors.NonFiniteError` raised, the window unchanged.

    Each row is stored padded with zeros to a multiple of 16 numbers
    (:data:`~secondorder.kernels.ROW_ALIGNMENT`): the Triton passes run over the padded
    width, which they read with 128-bit loads; everything else sees ``[num_grads, dim]``.

    The O(n²) modification is some twenty memory-bound passes over ``n × n``
    float64, while a refactorisation is one compute-bound Cholesky of ``n³/3``
    flops; which is faster depends on the device and on ``n``
    (``factor_update="auto"``, see :func:`~.gram_system.rank2_is_faster` and
    docs/benchmarks.md).

    Args:
        dim: length ``d`` of the gradients.
        num_grads: window size ``m``; bounded only by memory, checked before allocating.
        damp: ``λ > 0``.
        device: where the window lives.
        dtype: dtype of the vectors returned (float32 or float64).
        relative_damp: if given, ``λ`` is ``relative_damp`` times the mean squared entry
            of the gradients held, recomputed whenever the small system is refactored (see
            :class:`~.gram_system.GramSystem`), and ``damp`` is unused: a damping that does
            not depend on the gradients' scale.
        storage_dtype: dtype of the window; ``torch.bfloat16`` halves its memory
            while the small system stays in float64 and the passes accumulate in
            float32 (relative error about 2e-3, docs/benchmarks.md). On CPU the passes
            upcast it tile by tile and run about 3-4x slower than a float32 window;
            the Triton kernels read it directly. Defaults to ``dtype``.
        refactor_every: refactor at least every this many updates (``None``: only when a check fails).
        check_tol: relative error of the factor that triggers a refactorisation.
        factor_update: how a full window keeps ``K``'s factor current: ``"rank2"``
            (the O(n²) up/down-date), ``"refactor"`` (O(n³) each step) or ``"auto"``
            (whichever :func:`~.gram_system.rank2_is_faster` says for the device and
            ``num_grads``).
        process_group: shard the window over the ranks of this ``torch.distributed``
            group. ``dim`` is then the length of this rank's shard of the coordinates
            and the Fisher is over the concatenation of all shards; each rank passes
            its own shard of the same gradient, in the same order. The only extra
            communication is one all-reduce of ``n`` numbers per pass over the
            window (and one of a single number for the NaN check); every rank
            solves the same ``n × n`` system and returns its shard of the result.
    """

    kind = "dense"

    def __init__(
        self,
        dim: int,
        num_grads: int = 1024,
        damp: float = 1e-6,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        storage_dtype: torch.dtype | None = None,
        refactor_every: int | None = -1,
        check_tol: float = 1e-10,
        factor_update: str = "auto",
        process_group: torch.distributed.ProcessGroup | None = None,
        relative_damp: float | None = None,
    ) -> None:
        super().__init__(
            dim,
            num_grads,
            damp,
            device=device,
            dtype=dtype,
            storage_dtype=storage_dtype,
            refactor_every=refactor_every,
            check_tol=check_tol,
            factor_update=factor_update,
            process_group=process_group,
            relative_damp=relative_damp,
        )

    @staticmethod
    def estimate_bytes(dim: int, num_grads: int, storage_dtype: torch.dtype = torch.float32) -> int:
        """Bytes held by a window: the gradients (each row padded with zeros to a multiple of
        :data:`~secondorder.kernels.ROW_ALIGNMENT` numbers), one spare row (a failed step puts
        the evicted gradient back from it), and the ``n × n`` Gram matrix and its factor."""
        itemsize = torch.empty(0, dtype=storage_dtype).element_size()
        rows = num_grads * kernels.padded_width(dim) + dim
        return rows * itemsize + GramSystem.estimate_bytes(num_grads)

    @property
    def nbytes(self) -> int:
        rows = (self._rows, self._evicted)
        return sum(t.numel() * t.element_size() for t in rows) + self._system.nbytes

    def update(self, g: torch.Tensor) -> None:
        """Add gradient ``g`` to the window (evicting the oldest once full).

        Raises :class:`~secondorder.errors.NonFiniteError` for NaN or Inf, and
        :class:`~secondorder.errors.NotPositiveDefiniteError` when ``damp`` is too small
        for the new system to be factored in floating point; either way the window is
        left unchanged.
        """
        x = self._vector(g, "gradient", check_finite=False)
        self._insert(x, x)

    def update_solve(self, g: torch.Tensor) -> torch.Tensor:
        r"""Add ``g`` to the window and return ``F⁻¹ g`` with the new window: one optimiser step.

        ``g`` is now row ``s`` of ``G``, so ``G g = (K − nλI) e_s`` and the Woodbury
        form collapses to ``F⁻¹ g = n Gᵀ K⁻¹ e_s``. Unlike ``(g − Gᵀ c) / λ`` this
        subtracts nothing, so it keeps its accuracy for tiny ``λ`` and with a
        half-precision window (where it is the inverse applied to ``g`` as stored).
        """
        x = self._vector(g, "gradient", check_finite=False)
        return self._solve_inserted(self._insert(x, x))

    def begin_update(self, g: torch.Tensor) -> PendingUpdate:
        """The first half of :meth:`update` (or of ``update_solve``), for an owner that has
        checked ``g`` for NaN and Inf itself and reads its verdict in the same host
        synchronisation as the window's: ``g`` is written into its slot and the small
        system's new factor computed, nothing is read. Read the returned update's ``reads``
        (0-d tensors) and hand their values to :meth:`finish_update_solve`, or give it up
        with :meth:`cancel_update`; nothing else may change the window in between."""
        x = self._vector(g, "gradient", check_finite=False)
        slot, n = self._system.next_slot()
        dots = self._write_row(slot, x, n)
        gram_row = all_reduce_sum(dots, self.process_group)
        proposal = self._system.propose(slot, gram_row, check_finite=False)
        return PendingUpdate(proposal, gram_row)

    def transform_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the gradients held by ``fn`` of them, in place, keeping their order.

        ``fn`` takes the ``[num_stored, dim]`` gradients (oldest first, in ``dtype``) and
        returns new ones of that shape; the Gram matrix and its factor are then rebuilt, in
        O(n² d + n³). Natural GaLore uses it to carry its window into a new basis
        (``fn = lambda rows: (rows.view(n, -1, r) @ R).view(n, -1)``). Under a
        ``process_group`` every rank transforms its own shard. On an error (a result of the
        wrong shape, NaN, a system that cannot be factored) the window is left as it was.
        """
        slots = self._system.slots_oldest_first()
        if not slots:
            return
        old_rows = self._grads[slots].clone()
        new_rows = fn(old_rows.to(self.dtype))
        if not isinstance(new_rows, torch.Tensor) or new_rows.shape != old_rows.shape:
            raise ValueError(
                f"fn must return a tensor of shape {tuple(old_rows.shape)}, got "
                f"{tuple(getattr(new_rows, 'shape', ()))}"
            )
        check_finite(new_rows, "the transformed gradients")
        self._grads[slots] = new_rows.to(self.storage_dtype)
        stored = self._grads[slots]
        accumulation = kernels.reference.accumulation_dtype(self.storage_dtype, self.dtype)
        gram = stored.to(accumulation) @ stored.to(accumulation).T
        try:
            self._system.replace(slots, all_reduce_sum(gram, self.process_group))
        except torch.linalg.LinAlgError:
            self._grads[slots] = old_rows
            raise NotPositiveDefiniteError(
                "the transformed gradients make n·damp·I + G Gᵀ singular in floating point; "
                "the window is unchanged"
            ) from None

    # ---------------------------------------------------------------- dense rows
    def _required_bytes(self) -> int:
        return self.estimate_bytes(self.dim, self.num_grads, self.storage_dtype)

    def _row_description(self) -> str:
        return f"gradients of {self.dim}"

    def _memory_advice(self) -> str:
        return (
            "lower num_grads, store the window in half precision "
            "(storage_dtype=torch.bfloat16), or keep a sparse window (SparseSlidingWindowMFAC)"
        )

    def _allocate_rows(self) -> None:
        # Rows padded to a multiple of kernels.ROW_ALIGNMENT numbers, zero beyond dim: the
        # Triton passes run over the padded width (vectorised loads); everything else sees
        # the [num_grads, dim] view.
        width = kernels.padded_width(self.dim)
        self._rows = torch.zeros(
            self.num_grads, width, dtype=self.storage_dtype, device=self.device
        )
        self._grads = self._rows[:, : self.dim]
        self._evicted = torch.empty_like(self._grads[0])
        self._pending: torch.Tensor | None = None  # a row to write once its step is accepted
        self._slot_rows = list(self._grads)  # a view per slot (cheaper than indexing each step)
        self._triton = False  # whether this step's passes run the Triton kernels

    # Which implementation the passes take is decided once per step, by the pass that opens
    # it (_write_row or _row_dots), and _combine, which closes it, follows: the Triton kernels
    # run over the padded rows with padded vectors, the torch twins over the [m, dim] view.
    def _write_row(self, slot: int, row: torch.Tensor, n: int) -> torch.Tensor:
        self._triton = kernels.pads_rows(self._rows)
        if self._triton:
            # the Triton pass writes the row as it reads the window: keep the evicted one
            self._evicted.copy_(self._grads[slot])
            self._pending = None
            row = kernels.padded_vector(row, self._rows.shape[1])
            return kernels.write_row_and_dot(self._rows, slot, row, n)
        # the torch twin: the same dot products, the row written once the step is accepted
        # (nothing to put back otherwise, and no copy of the evicted row)
        stored = row if row.dtype == self.storage_dtype else row.to(self.storage_dtype)
        self._pending = stored
        return kernels.reference.row_dots_as_written(self._grads, slot, stored, n)

    def _restore_row(self, slot: int) -> None:
        if self._pending is None:
            self._grads[slot].copy_(self._evicted)
        self._pending = None

    def _commit_row(self, slot: int) -> None:
        if self._pending is not None:
            self._slot_rows[slot].copy_(self._pending)
            self._pending = None

    def _row_dots(self, x: torch.Tensor, n: int) -> torch.Tensor:
        self._triton = kernels.pads_rows(self._rows)
        if self._triton:
            return kernels.row_dots(self._rows, kernels.padded_vector(x, self._rows.shape[1]), n)
        return kernels.reference.row_dots(self._grads, x, n)

    def _combine(
        self, c: torch.Tensor, n: int, x: torch.Tensor | None = None, scale: float = 0.0
    ) -> torch.Tensor:
        if not self._triton:
            return kernels.reference.combine(self._grads, c, n, x, scale)
        x = None if x is None else kernels.padded_vector(x, self._rows.shape[1])
        return kernels.combine(self._rows, c, n, x, scale)[: self.dim]

    def _dense_rows(self, slots: list[int]) -> torch.Tensor:
        return self._grads[slots].to(self.dtype)

    def _rows_state(self) -> dict[str, Any]:
        return {"grads": self._grads}

    def _widened_rows(self, state: dict[str, Any], extra: int) -> dict[str, Any]:
        grads = state["grads"]
        return {"grads": torch.cat([grads, grads.new_zeros(grads.shape[0], extra)], dim=1)}

    def _check_rows_state(self, state: dict[str, Any]) -> None:
        check_saved_tensor(state, "grads", self._grads)

    def _load_rows_state(self, state: dict[str, Any]) -> None:
        self._grads.copy_(state["grads"])
        self._rows[:, self.dim :].zero_()  # the padding the Triton passes read

    def _reset_rows(self) -> None:
        self._rows.zero_()
