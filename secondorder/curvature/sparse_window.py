r"""M-FAC at a fraction of the memory: a sliding window of sparse gradients with error feedback.

EFCP (Modoranu, Kalinov, Kurtic, Frantar and Alistarh, NeurIPS 2023). For each gradient
``g`` (length ``d``) and ``k = ⌈density · d⌉``:

1. ``a = e + g``, the error-feedback accumulator (``e`` starts at zero);
2. ``c = topk(a)``: the ``k`` entries of largest magnitude, ties broken by the lower
   coordinate, the rest zero (zeros may be among the ``k`` when ``a`` has fewer than ``k``
   nonzeros);
3. ``e = a − c``, with ``c`` as stored (rounded to ``storage_dtype``), so that nothing is
   lost to rounding either;
4. ``c`` enters the window, evicting the oldest row once full;
5. ``u = F̂⁻¹ c`` with ``F̂ = λ I + (1/n) Σ c_i c_iᵀ`` over the ``n`` compressed rows held.

Over ``T`` steps nothing is dropped: ``Σ_t c_t + e_T = Σ_t g_t``. A row is ``k`` values and
their ``k`` int32 coordinates, so the window holds ``num_grads · k`` of each and nothing of
size ``num_grads × d`` is ever allocated; the ``n × n`` system is the dense window's
(:class:`~.gram_system.GramSystem`), and the two passes gather (``t = C x``: ``O(n k)``) and
scatter (``Cᵀ y``: ``O(n k + d)``) instead of streaming whole rows.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

from .. import kernels
from .._checks import check_positive_int
from .gram_system import GramSystem
from .sliding_window import SlidingWindow, check_saved_tensor

__all__ = ["SparseSlidingWindowMFAC", "kept_entries", "top_k_indices"]

_INDEX_DTYPE = torch.int32


def kept_entries(dim: int, density: float) -> int:
    """``k = ⌈density · dim⌉``, with ``density`` read as the decimal it was written as (so that
    ``0.07 · 100`` is 7, not the 8 that binary rounding of ``0.07`` would give)."""
    return max(1, math.ceil(Fraction(repr(float(density))) * dim))


def top_k_indices(a: torch.Tensor, k: int) -> torch.Tensor:
    """The coordinates of the ``k`` entries of ``a`` of largest magnitude, ascending.

    Ties at the threshold go to the lowest coordinates, so the choice is a function of
    ``a`` alone (``torch.topk`` leaves ties unspecified). No host synchronisation. If ``a``
    holds NaN the choice is meaningless but the coordinates are still valid (the caller
    refuses the step)."""
    d = a.numel()
    if k >= d:
        return torch.arange(d, device=a.device)
    magnitude = a.abs()
    threshold = torch.topk(magnitude, k, sorted=False).values.min()
    above = magnitude > threshold
    tied = magnitude == threshold
    room = k - above.sum()  # slots left for entries equal to the threshold
    chosen = above | (tied & (tied.cumsum(0) <= room))
    return torch.nonzero_static(chosen, size=k, fill_value=0).squeeze(1)


class SparseSlidingWindowMFAC(SlidingWindow):
    r"""Inverse Fisher of the last ``num_grads`` top-``k`` compressed gradients, with error feedback.

    The algorithm is in the module docstring. Each :meth:`update_solve` (an optimiser
    step) costs one top-``k`` selection over ``d`` coordinates, a gather over the
    ``n × k`` stored entries for the new Gram row, the dense window's O(n²) update of the
    small system, and a scatter of ``n × k`` entries for the result.

    The window holds, per row, ``k`` values in ``storage_dtype`` and ``k`` int32
    coordinates; besides, the error buffer ``e`` (``dim`` numbers in ``dtype``) and the two
    ``num_grads × num_grads`` float64 matrices of the small system (:attr:`nbytes`). At
    ``density = 0.01`` and float32 values that is 0.08 bytes per coordinate and row
    against 4 for a dense float32 window (docs/benchmarks.md, "Sparse windows").

    Args:
        dim: length ``d`` of the gradients (of this rank's shard under ``process_group``).
        num_grads: window size ``m``; bounded only by memory, checked before allocating.
        damp: ``λ > 0``.
        density: the fraction of coordinates kept per gradient, in ``(0, 1]``; the
            reference's default is 1%. ``k = ⌈density · dim⌉`` (see :func:`kept_entries`).
        error_feedback: carry what compression drops into the next gradient (EFCP);
            ``False`` gives plain top-``k`` (``e`` stays zero), an ablation.
        device, dtype, storage_dtype, refactor_every, check_tol, factor_update,
        relative_damp, total_dim: as for
            :class:`~secondorder.curvature.SlidingWindowMFAC`; ``storage_dtype`` is the
            dtype of the stored values (``torch.bfloat16`` allowed: ``e`` then absorbs
            the rounding).
        process_group: shard the coordinates over this group's ranks, as the dense window
            does. Selection is shard-local: each rank keeps the top
            ``⌈density · dim⌉`` of its own shard (with its own error buffer), which is
            blockwise top-k of the whole gradient, not global top-k; the dot products
            are all-reduced.
    """

    kind = "sparse"

    def __init__(
        self,
        dim: int,
        num_grads: int = 1024,
        damp: float = 1e-6,
        density: float = 0.01,
        *,
        error_feedback: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        storage_dtype: torch.dtype | None = None,
        refactor_every: int | None = -1,
        check_tol: float = 1e-10,
        factor_update: str = "auto",
        process_group: torch.distributed.ProcessGroup | None = None,
        relative_damp: float | None = None,
        total_dim: int | None = None,
    ) -> None:
        self.density = check_density(density)
        self.error_feedback = bool(error_feedback)
        if check_positive_int(dim, "dim") >= 2**31:
            raise ValueError(
                f"dim={dim} does not fit the window's int32 coordinates; shard it "
                "(process_group) or split it over several windows"
            )
        self.k = kept_entries(dim, self.density)
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
            total_dim=total_dim,
        )

    @staticmethod
    def estimate_bytes(
        dim: int,
        num_grads: int,
        density: float,
        storage_dtype: torch.dtype = torch.float32,
        dtype: torch.dtype = torch.float32,
    ) -> int:
        """Bytes held by a window: ``num_grads`` rows of ``k`` values and ``k`` int32
        coordinates (each padded to a multiple of :data:`~secondorder.kernels.ROW_ALIGNMENT`
        entries), a spare row (it puts back what a failed step evicted), the error buffer
        and the ``n × n`` Gram matrix and its factor."""
        k = kept_entries(dim, density)
        value_size = torch.empty(0, dtype=storage_dtype).element_size()
        index_size = torch.empty(0, dtype=_INDEX_DTYPE).element_size()
        error_size = torch.empty(0, dtype=dtype).element_size()
        entries = num_grads * kernels.padded_width(k) + k
        rows = entries * (value_size + index_size)
        return rows + dim * error_size + GramSystem.estimate_bytes(num_grads)

    @property
    def nbytes(self) -> int:
        tensors = (
            self._value_rows,
            self._index_rows,
            self._evicted_values,
            self._evicted_indices,
            self._error,
        )
        return sum(t.numel() * t.element_size() for t in tensors) + self._system.nbytes

    @property
    def error(self) -> torch.Tensor:
        """The error-feedback buffer ``e`` (a copy: changing it changes nothing)."""
        return self._error.clone()

    def _compress(
        self, g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-3: ``(values as stored, int32 coordinates, the new e, Σ a)``. The sum is
        finite exactly when the accumulator ``a`` is (barring overflow), for the insertion to
        check; with NaN in ``a`` the coordinates are still valid, and the step is refused."""
        accumulator = self._error + g if self.error_feedback else g
        indices = top_k_indices(accumulator, self.k)
        values = accumulator[indices].to(self.storage_dtype)
        total = accumulator.sum()
        if not self.error_feedback:
            return values, indices.to(_INDEX_DTYPE), self._error, total
        error = accumulator  # a new tensor: self._error is untouched until the step succeeds
        error[indices] -= values.to(self.dtype)
        return values, indices.to(_INDEX_DTYPE), error, total

    def update(self, g: torch.Tensor) -> None:
        """Compress ``g`` (with error feedback) and add it to the window.

        Raises :class:`~secondorder.errors.NonFiniteError` for NaN or Inf, and
        :class:`~secondorder.errors.NotPositiveDefiniteError` when ``damp`` is too small
        for the new system to be factored in floating point; either way the window and
        ``e`` are left unchanged.
        """
        self._update(g)

    def update_solve(self, g: torch.Tensor) -> torch.Tensor:
        r"""Compress ``g``, add it to the window and return ``F̂⁻¹ c`` for its compressed ``c``.

        As for the dense window, ``c`` is row ``s`` of the window, so ``F̂⁻¹ c = n Cᵀ K⁻¹ e_s``
        (nothing subtracted): one scatter of the stored rows. The result is dense.
        """
        return self._solve_inserted(self._update(g))

    def _update(self, g: torch.Tensor) -> int:
        x = self._vector(g, "gradient", check_finite=False)
        values, indices, error, total = self._compress(x)
        slot = self._insert((values, indices), x, total)
        # in place: an owner's state (MFAC's) may hold the buffer, and a new one each step
        # would keep the old alive there
        self._error.copy_(error)
        return slot

    # ---------------------------------------------------------------- sparse rows
    def _required_bytes(self) -> int:
        return self.estimate_bytes(
            self.dim, self.num_grads, self.density, self.storage_dtype, self.dtype
        )

    def _row_description(self) -> str:
        return f"sparse gradients ({self.k} of {self.dim} coordinates)"

    def _memory_advice(self) -> str:
        return "lower num_grads or density, or store the values in bfloat16"

    def _allocate_rows(self) -> None:
        # Rows padded to a multiple of kernels.ROW_ALIGNMENT entries with value 0 at
        # coordinate 0, whose contributions to both passes are exactly zero: the passes run
        # over the padded rows (vectorised loads in the Triton kernels, no padding of any
        # vector), everything else sees the [num_grads, k] views.
        shape, device = (self.num_grads, kernels.padded_width(self.k)), self.device
        self._value_rows = torch.zeros(shape, dtype=self.storage_dtype, device=device)
        self._index_rows = torch.zeros(shape, dtype=_INDEX_DTYPE, device=device)
        self._values = self._value_rows[:, : self.k]
        self._indices = self._index_rows[:, : self.k]
        self._evicted_values = torch.empty_like(self._values[0])
        self._evicted_indices = torch.empty_like(self._indices[0])
        self._error = torch.zeros(self.dim, dtype=self.dtype, device=device)

    def _write_row(self, slot: int, row: tuple[torch.Tensor, torch.Tensor], n: int) -> torch.Tensor:
        values, indices = row
        self._evicted_values.copy_(self._values[slot])
        self._evicted_indices.copy_(self._indices[slot])
        self._values[slot] = values
        self._indices[slot] = indices
        accumulation = kernels.reference.accumulation_dtype(self.storage_dtype, self.dtype)
        dense = torch.zeros(self.dim, dtype=accumulation, device=self.device)
        dense[indices] = values.to(accumulation)  # the new row as stored
        return kernels.gather_dots(self._value_rows, self._index_rows, dense, n)

    def _restore_row(self, slot: int) -> None:
        self._values[slot] = self._evicted_values
        self._indices[slot] = self._evicted_indices

    def _row_dots(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return kernels.gather_dots(self._value_rows, self._index_rows, x, n)

    def _combine(
        self, c: torch.Tensor, n: int, x: torch.Tensor | None = None, scale: float = 0.0
    ) -> torch.Tensor:
        rows = (self._value_rows, self._index_rows)
        return kernels.scatter_combine(*rows, c, n, self.dim, x, scale)

    def _dense_rows(self, slots: list[int]) -> torch.Tensor:
        dense = torch.zeros(len(slots), self.dim, dtype=self.dtype, device=self.device)
        return dense.scatter_(1, self._indices[slots].long(), self._values[slots].to(self.dtype))

    def _rows_state(self) -> dict[str, Any]:
        return {
            "density": self.density,
            "k": self.k,
            "error_feedback": self.error_feedback,
            "values": self._values,
            "indices": self._indices,
            "error": self._error,
        }

    def _widened_rows(self, state: dict[str, Any], extra: int) -> dict[str, Any]:
        """Each row keeps its entries, padded to this window's ``k`` with zeros at coordinate 0."""
        rows = {}
        for name in ("values", "indices"):
            saved = state[name]
            rows[name] = torch.cat(
                [saved, saved.new_zeros(saved.shape[0], self.k - saved.shape[1])], 1
            )
        rows["error"] = torch.cat([state["error"], state["error"].new_zeros(extra)])
        return {**rows, "k": self.k}

    def _check_rows_state(self, state: dict[str, Any]) -> None:
        for key, mine in (("density", self.density), ("error_feedback", self.error_feedback)):
            if state.get(key) != mine:
                raise ValueError(
                    f"cannot load a window with {key}={state.get(key)!r} into one with "
                    f"{key}={mine!r}"
                )
        check_saved_tensor(state, "values", self._values)
        check_saved_tensor(state, "indices", self._indices)
        check_saved_tensor(state, "error", self._error)

    def _load_rows_state(self, state: dict[str, Any]) -> None:
        self._values.copy_(state["values"])
        self._indices.copy_(state["indices"])
        self._value_rows[:, self.k :].zero_()  # padding: value 0 at coordinate 0
        self._index_rows[:, self.k :].zero_()
        self._error = state["error"].to(self.device, copy=True)

    def _reset_rows(self) -> None:
        self._value_rows.zero_()
        self._index_rows.zero_()
        self._error.zero_()


def check_density(density: float) -> float:
    """``density`` as a float in ``(0, 1]``, or a clear ``ValueError``."""
    if (
        isinstance(density, bool)
        or not isinstance(density, (int, float))
        or not math.isfinite(density)
        or not 0 < density <= 1
    ):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)
