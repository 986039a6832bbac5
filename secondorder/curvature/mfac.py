r"""M-FAC: matrix-free products with the inverse of the damped empirical Fisher.

For gradients ``g_1 … g_n`` (the rows of ``G``, ``n × d``) and damping ``λ > 0``

    F = λ I + (1/n) Gᵀ G.

By Woodbury, with the small ``n × n`` matrix ``K = n λ I + G Gᵀ``,

    F⁻¹ x = (1/λ) (x − Gᵀ K⁻¹ G x),

so a product costs two passes over ``G`` plus an ``n × n`` solve, and ``d × d``
is never formed. ``n`` is the number of gradients actually held, so the
estimate is right while a window is still filling.

- :class:`SlidingWindowMFAC` (the dynamic algorithm, for optimisers) holds the
  last ``num_grads`` gradients in a ring buffer and keeps ``K = L D Lᵀ``
  current in O(n²) per new gradient.
- :class:`DenseMFAC` (the static algorithm, for pruning) factors ``K = L Lᵀ`` once
  for a fixed ``G``, after which ``F⁻¹ x = (x − Gᵀ K⁻¹ G x) / λ``; on request,
  ``[F⁻¹]_kk = (1 − ‖W[:, k]‖²) / λ`` with ``W = L⁻¹ G``, formed a piece at a time;
  optionally block-diagonally, one block of ``block_size`` coordinates at a time.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import kernels
from .._checks import (
    check_damping,
    check_finite,
    check_positive_int,
    ensure_fits,
)
from .._distributed import all_reduce_sum, rank_and_world
from ..errors import NonFiniteError, NotPositiveDefiniteError
from .ldl import ldl_factor, ldl_replace_row, ldl_row_error, ldl_solve

__all__ = ["DenseMFAC", "SlidingWindowMFAC", "rank2_is_faster"]

# The n × n system is small; it is always solved in float64.
_SMALL = torch.float64


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


class SlidingWindowMFAC:
    r"""Inverse empirical Fisher of the last ``num_grads`` gradients, one gradient at a time.

    ``F = damp·I + (1/n) Σ g_i g_iᵀ`` over the ``n ≤ num_grads`` gradients held;
    once full, each new gradient evicts the oldest.

    One :meth:`update_solve` (an optimiser step) makes two passes over the
    ``num_grads × dim`` window, the floor of the algorithm: one that writes the
    new gradient into its slot and computes ``t = G g`` at the same time, and
    one that forms ``(g − Gᵀ c) / damp``. In between, the ``n × n`` system
    ``K = n·damp·I + G Gᵀ = L D Lᵀ`` is kept current:

    - while the window fills, ``n`` (and so the shift ``n·damp``) changes every
      step, and ``K`` is refactored: O(n³), for the first ``num_grads`` steps only;
    - once full, a new gradient changes one row and column of ``K``, a rank-2
      modification of ``L D Lᵀ`` done in O(n²) (:func:`~.ldl.ldl_replace_row`).
      The factor is checked against ``K`` on the changed row and the diagonal
      (O(n²)) and refactored if the error exceeds ``check_tol``, and anyway every
      ``refactor_every`` updates (default ``num_grads``: O(n²) amortised), so
      rounding errors cannot build up. Each solve with ``K`` takes one step of
      iterative refinement.

    The O(n²) modification is some twenty memory-bound passes over ``n × n``
    float64, while a refactorisation is one compute-bound Cholesky of ``n³/3``
    flops; which is faster depends on the device and on ``n``
    (``factor_update="auto"``, see :func:`rank2_is_faster` and docs/benchmarks.md).

    Args:
        dim: length ``d`` of the gradients.
        num_grads: window size ``m``; bounded only by memory, checked before allocating.
        damp: ``λ > 0``.
        device: where the window lives.
        dtype: dtype of the vectors returned (float32 or float64).
        storage_dtype: dtype of the window; ``torch.bfloat16`` halves its memory
            while the small system stays in float64 and the passes accumulate in
            float32 (relative error about 2e-3, docs/benchmarks.md). On CPU the passes
            upcast it tile by tile and run about 3-4x slower than a float32 window;
            the Triton kernels read it directly. Defaults to ``dtype``.
        refactor_every: refactor at least every this many updates (``None``: only when a check fails).
        check_tol: relative error of the factor that triggers a refactorisation.
        factor_update: how a full window keeps ``K``'s factor current: ``"rank2"``
            (the O(n²) up/down-date), ``"refactor"`` (O(n³) each step) or ``"auto"``
            (whichever :func:`rank2_is_faster` says for the device and ``num_grads``).
        process_group: shard the window over the ranks of this ``torch.distributed``
            group. ``dim`` is then the length of this rank's shard of the coordinates
            and the Fisher is over the concatenation of all shards; each rank passes
            its own shard of the same gradient, in the same order. The only extra
            communication is one all-reduce of ``n`` numbers per pass over the
            window (and one of a single number for the NaN check); every rank
            solves the same ``n × n`` system and returns its shard of the result.
    """

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
    ) -> None:
        self.dim = check_positive_int(dim, "dim")
        self.num_grads = check_positive_int(num_grads, "num_grads")
        self.damp = check_damping(damp)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        storage_dtype = dtype if storage_dtype is None else storage_dtype
        if not storage_dtype.is_floating_point:
            raise TypeError(f"storage_dtype must be a floating dtype, got {storage_dtype}")
        if refactor_every == -1:
            refactor_every = num_grads
        if refactor_every is not None:
            check_positive_int(refactor_every, "refactor_every")
        if factor_update not in ("auto", "rank2", "refactor"):
            raise ValueError(
                f"factor_update must be 'auto', 'rank2' or 'refactor', got {factor_update!r}"
            )
        self.process_group = process_group
        self.rank, self.world_size = rank_and_world(process_group)
        self.dtype = dtype
        self.storage_dtype = storage_dtype
        self.refactor_every = refactor_every
        self.check_tol = check_tol

        device = torch.device("cpu") if device is None else torch.device(device)
        ensure_fits(
            self.estimate_bytes(dim, num_grads, storage_dtype),
            device,
            what=f"a gradient window of {num_grads} x {dim} in {storage_dtype}",
            advice="lower num_grads, or store the window in half precision "
            "(storage_dtype=torch.bfloat16)",
        )
        self._grads = torch.zeros(num_grads, dim, dtype=storage_dtype, device=device)
        self._evicted = torch.empty_like(self._grads[0])  # the row a failed step puts back
        self.device = self._grads.device
        if factor_update == "auto":
            factor_update = "rank2" if rank2_is_faster(num_grads, self.device) else "refactor"
        self.factor_update = factor_update
        self._gram = torch.zeros(num_grads, num_grads, dtype=_SMALL, device=self.device)
        self._factor = torch.zeros(0, 0, dtype=_SMALL, device=self.device)
        self._pivots = torch.zeros(0, dtype=_SMALL, device=self.device)
        self._num_stored = 0
        self._next_slot = 0
        self._updates_since_refactor = 0
        self.num_refactors = 0
        self.num_failed_checks = 0

    @staticmethod
    def estimate_bytes(dim: int, num_grads: int, storage_dtype: torch.dtype = torch.float32) -> int:
        """Bytes held by a window: the gradients, one spare row (a failed step puts the
        evicted gradient back from it), and the ``n × n`` Gram matrix and its factor."""
        itemsize = torch.empty(0, dtype=storage_dtype).element_size()
        return (num_grads + 1) * dim * itemsize + 2 * num_grads * num_grads * 8

    @property
    def num_stored(self) -> int:
        """Number of gradients held, ``n ≤ num_grads``."""
        return self._num_stored

    def _small_matrix(self) -> torch.Tensor:
        n = self._num_stored
        K = self._gram[:n, :n].clone()
        K.diagonal().add_(n * self.damp)
        return K

    def _refactor(self) -> None:
        self._factor, self._pivots = ldl_factor(self._small_matrix())
        self._updates_since_refactor = 0
        self.num_refactors += 1

    def _vector(self, x: torch.Tensor, name: str) -> torch.Tensor:
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
        if self.process_group is None:
            check_finite(x, name)
        else:  # every rank must raise, or the others would wait in the next all-reduce
            bad = 0 if bool(torch.isfinite(x.sum())) else int((~torch.isfinite(x)).sum())
            total = all_reduce_sum(torch.tensor([bad], device=self.device), self.process_group)
            if total.item():
                raise NonFiniteError(
                    f"{name} has {total.item()} NaN or Inf entries in the shards of "
                    f"{self.world_size} ranks ({bad} here, on rank {self.rank})"
                )
        return x.to(self.dtype).contiguous()

    def _insert(self, g: torch.Tensor) -> int:
        """Write ``g`` into the ring and bring ``K``'s factor up to date; return its slot.

        If ``K`` is no longer numerically positive definite, the window is restored
        as it was and :class:`NotPositiveDefiniteError` is raised."""
        filling = self._num_stored < self.num_grads
        slot = self._num_stored if filling else self._next_slot
        n = self._num_stored + filling
        old_gram_row = self._gram[slot, :n].clone()
        self._evicted.copy_(self._grads[slot])
        counters = (self._num_stored, self._next_slot, self._updates_since_refactor)
        partial = kernels.write_row_and_dot(self._grads, slot, g, n)
        gram_row = all_reduce_sum(partial, self.process_group).to(_SMALL)
        self._gram[slot, :n] = gram_row
        self._gram[:n, slot] = gram_row
        self._num_stored = n
        self._next_slot = (slot + 1) % self.num_grads
        due = (
            self.refactor_every is not None
            and self._updates_since_refactor + 1 >= self.refactor_every
        )
        try:
            if filling or due or self.factor_update == "refactor":
                self._refactor()
            else:
                self._update_factor(slot, gram_row - old_gram_row)
        except torch.linalg.LinAlgError:
            self._grads[slot].copy_(self._evicted)
            self._gram[slot, :n] = old_gram_row
            self._gram[:n, slot] = old_gram_row
            self._num_stored, self._next_slot, self._updates_since_refactor = counters
            rounding = torch.finfo(
                kernels.reference.accumulation_dtype(self._grads.dtype, self.dtype)
            ).eps
            raise NotPositiveDefiniteError(
                f"adding this gradient makes n·damp·I + G Gᵀ singular in floating point: "
                f"n·damp = {n * self.damp:.3g} is below the rounding of the dot products "
                f"(about eps·‖g‖² = {rounding * float(gram_row.abs().max()):.3g}), as happens "
                "when gradients repeat. Use a larger damp, or dtype=torch.float64; "
                "the window is unchanged"
            ) from None
        return slot

    def _update_factor(self, slot: int, delta: torch.Tensor) -> None:
        updated = ldl_replace_row(self._factor, self._pivots, slot, delta)
        if updated is not None:
            error = ldl_row_error(*updated, self._small_matrix(), slot)
            if math.isfinite(error) and error <= self.check_tol:
                self._factor, self._pivots = updated
                self._updates_since_refactor += 1
                return
        self.num_failed_checks += 1
        self._refactor()

    def _solve_small(self, t: torch.Tensor) -> torch.Tensor:
        """``K⁻¹ t`` with one step of iterative refinement."""
        t = t.to(_SMALL)
        c = ldl_solve(self._factor, self._pivots, t)
        n = self._num_stored
        residual = t - self._gram[:n, :n] @ c - (n * self.damp) * c
        return c + ldl_solve(self._factor, self._pivots, residual)

    def update(self, g: torch.Tensor) -> None:
        """Add gradient ``g`` to the window (evicting the oldest once full).

        Raises :class:`~secondorder.errors.NonFiniteError` for NaN or Inf, and
        :class:`~secondorder.errors.NotPositiveDefiniteError` when ``damp`` is too small
        for the new system to be factored in floating point; either way the window is
        left unchanged.
        """
        self._insert(self._vector(g, "gradient"))

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """``F⁻¹ x = (x − Gᵀ K⁻¹ G x) / λ`` for a vector ``x`` of length ``dim``.

        When ``x`` lies mostly in the span of the window and ``λ`` is tiny the two
        terms nearly cancel, and float32 loses ``log10(‖x‖² / (n λ))`` digits
        (all of them at λ = 1e-7 for unit-scale gradients). Use ``dtype=torch.float64``
        there; :meth:`update_solve`, the optimiser's product, has no such cancellation.
        """
        x = self._vector(x, "x")
        n = self._num_stored
        if n == 0:
            return x / self.damp
        t = all_reduce_sum(kernels.row_dots(self._grads, x, n), self.process_group)
        coef = -self._solve_small(t) / self.damp
        return kernels.combine(self._grads, coef.to(self.dtype), n, x, 1.0 / self.damp)

    def update_solve(self, g: torch.Tensor) -> torch.Tensor:
        r"""Add ``g`` to the window and return ``F⁻¹ g`` with the new window: one optimiser step.

        ``g`` is now row ``s`` of ``G``, so ``G g = (K − nλI) e_s`` and the Woodbury
        form collapses to ``F⁻¹ g = n Gᵀ K⁻¹ e_s``. Unlike ``(g − Gᵀ c) / λ`` this
        subtracts nothing, so it keeps its accuracy for tiny ``λ`` and with a
        half-precision window (where it is the inverse applied to ``g`` as stored).
        """
        slot = self._insert(self._vector(g, "gradient"))
        n = self._num_stored
        unit = torch.zeros(n, dtype=_SMALL, device=self.device)
        unit[slot] = n
        return kernels.combine(self._grads, self._solve_small(unit).to(self.dtype), n)

    def reset(self) -> None:
        """Forget every gradient."""
        self._grads.zero_()
        self._gram.zero_()
        self._factor = self._factor.new_zeros(0, 0)
        self._pivots = self._pivots.new_zeros(0)
        self._num_stored = self._next_slot = self._updates_since_refactor = 0

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only; loads with ``torch.load(weights_only=True)``."""
        return {
            "dim": self.dim,
            "num_grads": self.num_grads,
            "damp": self.damp,
            "storage_dtype": str(self.storage_dtype).removeprefix("torch."),
            "world_size": self.world_size,
            "rank": self.rank,
            "num_stored": self._num_stored,
            "next_slot": self._next_slot,
            "updates_since_refactor": self._updates_since_refactor,
            "grads": self._grads,
            "gram": self._gram,
            "factor": self._factor,
            "pivots": self._pivots,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a window saved by :meth:`state_dict`; the next step is bit-identical."""
        mine = self.state_dict()
        for key in ("world_size", "rank"):
            if state.get(key, mine[key] if key == "rank" else 1) != mine[key]:
                raise ValueError(
                    f"this window was saved by rank {state.get('rank', 0)} of "
                    f"{state.get('world_size', 1)} and is loaded by rank {self.rank} of "
                    f"{self.world_size}: a sharded window resumes only on the same ranks "
                    "(resharding is not supported)"
                )
        for key in ("dim", "num_grads", "storage_dtype"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot load a window with {key}={state[key]!r} into one with {key}={mine[key]!r}"
                )
        if state["damp"] != self.damp:
            raise ValueError(
                f"cannot load a window with damp={state['damp']!r} into one with damp={self.damp!r}"
            )
        self._grads.copy_(state["grads"])
        self._gram.copy_(state["gram"])
        self._factor = state["factor"].to(self.device, _SMALL, copy=True)
        self._pivots = state["pivots"].to(self.device, _SMALL, copy=True)
        self._num_stored = int(state["num_stored"])
        self._next_slot = int(state["next_slot"])
        self._updates_since_refactor = int(state["updates_since_refactor"])


# Float64 pieces of the gradients are made into a buffer reused piece after piece: about
# _PIECE_ELEMENTS numbers (2 MiB, within the last-level cache) but at least _PIECE_COLUMNS
# columns (GEMMs and triangular solves stay efficient at large n), and at most
# _CHUNK_ELEMENTS numbers; whole blocks of that many columns in all when blockwise
# (docs/benchmarks.md, "Static precomputation").
_PIECE_ELEMENTS = 1 << 18
_PIECE_COLUMNS = 1024
_CHUNK_ELEMENTS = 1 << 24
# Rows per block of the lower-triangular Gram matrix, and of the squared column norms.
_GRAM_ROWS = 256
_NORM_ROWS = 64


# Scalars and short vectors (finiteness checks, n-vectors) allowed for in estimate_bytes.
_SMALL_TEMPORARIES = 1 << 14


def _piece_width(n: int) -> int:
    """Columns of ``n`` rows per float64 piece."""
    return max(1, min(max(_PIECE_COLUMNS, _PIECE_ELEMENTS // n), _CHUNK_ELEMENTS // n))


def _blocks_per_step(count: int, n: int, size: int) -> int:
    """Whole blocks of ``size`` columns per float64 piece (1 when a block is cut in columns)."""
    return min(count, max(1, _piece_width(n) // size))


def _piece_elements(count: int, n: int, size: int) -> int:
    """Numbers in the largest float64 piece of ``[count, n, size]`` blocks (see :func:`_pieces`)."""
    return _blocks_per_step(count, n, size) * n * min(size, _piece_width(n))


def _kept_bytes(count: int, n: int, size: int, itemsize: int) -> int:
    """What a group of ``count`` blocks keeps after construction."""
    if size < n:  # explicit: the inverse (result dtype) and its float64 diagonal
        return count * size * (size * itemsize + 8)
    # Woodbury: the float64 factor, and K_b⁻¹ that the second solve caches when count > 1
    return count * n * n * 8 * (2 if count > 1 else 1)


def _build_working_bytes(count: int, n: int, size: int) -> int:
    """Float64 temporaries of one group's construction at their peak: the piece and the
    Gram matrices in hand with their factors (Woodbury), or the piece and the blocks'
    Fisher, factor and inverse with a product's temporary (explicit)."""
    step = _blocks_per_step(count, n, size)
    if size < n:
        return 8 * (step * n * size + 3 * step * size * size)
    return 8 * (_piece_elements(count, n, size) + 2 * step * n * n)


def _diag_peak_bytes(groups: list[tuple[int, int]], n: int, dim: int, itemsize: int) -> int:
    """Bytes :meth:`DenseMFAC.diag` adds at its peak, for groups of ``(count, size)`` blocks:
    the diagonals made so far with one group's temporaries, their concatenation when there
    are two groups, then the copy returned (``itemsize`` bytes a number)."""
    working = max(_diag_working_bytes(count, n, size) for count, size in groups)
    concatenation = dim * 8 if len(groups) > 1 else 0
    return max(dim * 8 + working, dim * 8 + concatenation, dim * (8 + itemsize))


def _diag_working_bytes(count: int, n: int, size: int) -> int:
    """Float64 temporaries of one Woodbury group's diagonal at their peak: the piece, its
    image under ``L⁻¹`` and the column norms' temporaries (row blocks of ``_NORM_ROWS``)."""
    if size < n:
        return 0  # formed with the explicit inverse
    piece = _piece_elements(count, n, size)
    return 8 * (2 * piece + (piece // n) * (min(_NORM_ROWS, n) + 6))


class DenseMFAC:
    r"""Inverse empirical Fisher of a fixed set of gradients (the static M-FAC algorithm).

    ``F = damp·I + (1/n) Gᵀ G`` for ``grads = G`` of shape ``[n, d]``.

    Construction forms only the small system: ``K = n·damp·I + G Gᵀ = L Lᵀ``, the Gram
    matrix in float64 (``G`` converted a cache-sized piece at a time) and its Cholesky
    factor, O(n² d). ``G`` itself is kept, not copied (do not modify it in place while
    this inverse is in use; half-precision gradients are kept as a float32 copy). Then

    - :meth:`solve`: ``F⁻¹ x = (x − Gᵀ K⁻¹ G x) / damp``: two passes over ``G`` and an
      ``n × n`` triangular solve in float64, O(n d);
    - :meth:`diag`: ``[F⁻¹]_kk = (1 − ‖W[:, k]‖²) / damp`` with ``W = L⁻¹ G``, computed
      in float64 on the first call (a second O(n² d) pass, a piece of ``W`` at a time:
      ``W`` is never held whole) and kept; floored at the bound ``1 / F_kk``.

    With ``block_size = B`` the Fisher is replaced by its block-diagonal part on
    consecutive blocks of ``B`` coordinates (the last may be shorter), each
    block using only its own columns of ``G``. A block of ``b`` coordinates
    keeps whichever representation is smaller and faster: the explicit ``b × b``
    inverse when ``b < n`` (``b²`` numbers, ``n b² + 4b³/3`` flops, with its diagonal,
    formed at construction) or the Woodbury form above when ``b ≥ n`` (the ``n × n``
    factor, ``2 n² b + n³/3`` flops with the diagonal); the two costs cross at ``b = n``.

    Args:
        grads: ``[n, d]`` gradients, one per row.
        damp: ``λ > 0``.
        block_size: ``None`` for the full Fisher, else the block length.
    """

    def __init__(
        self, grads: torch.Tensor, damp: float = 1e-6, block_size: int | None = None
    ) -> None:
        if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or not grads.is_floating_point():
            raise ValueError("grads must be a floating [num_grads, dim] tensor")
        if grads.shape[0] == 0 or grads.shape[1] == 0:
            raise ValueError(
                f"grads must hold at least one gradient of length >= 1, got {tuple(grads.shape)}"
            )
        self.damp = check_damping(damp)
        self.num_grads, self.dim = grads.shape
        self.block_size = (
            None if block_size is None else check_positive_int(block_size, "block_size")
        )
        self.device = grads.device
        self.dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
        ensure_fits(
            self.estimate_bytes(
                self.num_grads, self.dim, self.block_size, grads.dtype, with_diag=False
            ),
            self.device,
            what=f"the M-FAC inverse of {self.num_grads} gradients of length {self.dim}",
            advice="lower num_grads or block_size",
        )
        G = grads.to(self.dtype)  # the caller's tensor itself for float32 and float64
        size = self.dim if block_size is None else min(block_size, self.dim)
        full_blocks, remainder = divmod(self.dim, size)
        self._groups = [_BlockGroup(G[:, : full_blocks * size], size, self.damp)]
        if remainder:
            self._groups.append(_BlockGroup(G[:, full_blocks * size :], remainder, self.damp))
        if not all(group.factored for group in self._groups):
            # NaN or Inf in G reaches the diagonal of its Gram matrix (a sum of squares,
            # which cannot overflow in float64 from float32 numbers): no separate pass over G
            check_finite(grads, "grads")
            raise NotPositiveDefiniteError(
                "the damped system of the gradients (n·damp·I + G Gᵀ, or damp·I + G_bᵀ G_b / n "
                f"for explicit blocks) could not be factored in float64: damp={self.damp:g} is "
                "below the rounding of the products, or the gradients overflow float64; "
                "raise damp"
            )
        self._diagonal: torch.Tensor | None = None
        self._itemsize = G.element_size()

    @staticmethod
    def estimate_bytes(
        num_grads: int,
        dim: int,
        block_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        with_diag: bool = True,
    ) -> int:
        """Peak bytes allocated by building the inverse of ``[num_grads, dim]`` gradients of
        ``dtype`` (and then by :meth:`diag` when ``with_diag``), beyond the gradients.

        Kept: the float64 ``n × n`` factor of each Woodbury block (and its inverse, which
        the second :meth:`solve` forms when there are several blocks); the explicit ``b × b``
        inverse (float32, or float64 for float64 gradients) and float64 diagonal of each
        explicit block; a float32 copy of half-precision gradients. Working, at the peak of
        a pass, one group of blocks at a time: the float64 piece of ``G`` and the float64
        Gram matrices (or explicit blocks) in hand; for :meth:`diag`, the piece, its image
        ``W`` under ``L⁻¹``, the column norms' temporaries, the float64 diagonal and the copy
        returned. ``tests/test_dense_mfac.py`` checks it against measured peaks.
        """
        n = num_grads
        itemsize = 8 if dtype == torch.float64 else 4
        b = dim if block_size is None else min(block_size, dim)
        groups = [(dim // b, b)] + ([(1, dim % b)] if dim % b else [])
        kept = 0 if dtype in (torch.float32, torch.float64) else n * dim * 4
        kept += sum(_kept_bytes(count, n, size, itemsize) for count, size in groups)
        peak = kept + max(_build_working_bytes(count, n, size) for count, size in groups)
        if with_diag:
            peak = max(peak, kept + _diag_peak_bytes(groups, n, dim, itemsize))
        return peak + _SMALL_TEMPORARIES

    @property
    def methods(self) -> list[str]:
        """Representation of each group of equal blocks: ``"woodbury"`` or ``"explicit"``."""
        return [group.method for group in self._groups]

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """``F⁻¹ x`` for ``x`` of shape ``[d]`` or ``[k, d]`` (``k`` vectors as rows)."""
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (self.dim,) or x.dim() > 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape ({self.dim},) or (k, {self.dim}), got {shape}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the inverse is on {self.device}")
        check_finite(x, "x")
        rows = x.reshape(-1, self.dim).to(self.dtype)
        parts, start = [], 0
        for group in self._groups:
            parts.append(group.solve(rows[:, start : start + group.dim]))
            start += group.dim
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out.reshape(x.shape)

    def diag(self) -> torch.Tensor:
        """The diagonal of ``F⁻¹`` (of its block-diagonal part when blockwise); the first call
        computes it (a second pass over the gradients for Woodbury blocks), later calls reuse it."""
        if self._diagonal is None:
            groups = [group.blocks.shape[::2] for group in self._groups]  # (count, size)
            ensure_fits(
                _diag_peak_bytes(groups, self.num_grads, self.dim, self._itemsize),
                self.device,
                what=f"the diagonal of the M-FAC inverse of {self.num_grads} gradients",
                advice="lower num_grads or block_size",
            )
            diagonals = [group.diagonal() for group in self._groups]
            self._diagonal = diagonals[0] if len(diagonals) == 1 else torch.cat(diagonals)
            del diagonals
        return self._diagonal.to(self.dtype, copy=True)  # the caller's to change


def _add_lower_gram(K: torch.Tensor, X: torch.Tensor) -> None:
    """``K += X Xᵀ`` on and below the diagonal only, for ``[b, n, c]`` batches: blocks of
    rows against the rows above them, about 5/8 of the flops of ``X @ X.mT`` at n = 1024."""
    n = X.shape[-2]
    for top in range(0, n, _GRAM_ROWS):
        stop = min(top + _GRAM_ROWS, n)
        K[:, top:stop, :stop].baddbmm_(X[:, top:stop], X[:, :stop].mT)


def _squared_column_norms(X: torch.Tensor) -> torch.Tensor:
    """``(X²).sum(-2)``, a block of rows at a time so that each squared block is summed
    while still in cache (3.8x faster than one ``X.square()`` at 1024 × 16384)."""
    total = torch.zeros(X.shape[:-2] + X.shape[-1:], dtype=X.dtype, device=X.device)
    for top in range(0, X.shape[-2], _NORM_ROWS):
        block = X[..., top : top + _NORM_ROWS, :]
        total += (block * block).sum(-2)
    return total


def _pieces(count: int, n: int, size: int) -> list[tuple[slice, list[slice]]]:
    """Cover ``[count, n, size]`` blocks by pieces of at most ``_piece_width(n)`` columns:
    several whole blocks per step when one block fits, else one block per step cut into
    column slices. Returns ``(blocks, [columns, ...])`` per step."""
    width = _piece_width(n)
    if size <= width:
        step = width // size
        return [(slice(b, b + step), [slice(0, size)]) for b in range(0, count, step)]
    columns = [slice(c, c + width) for c in range(0, size, width)]
    return [(slice(b, b + 1), columns) for b in range(count)]


def _float64_piece(buffer: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
    """``piece`` converted to float64 into (the front of) the reused ``buffer``."""
    out = buffer.view(-1)[: piece.numel()].view(piece.shape)
    out.copy_(piece)
    return out


def _explicit_inverse(G: torch.Tensor, damp: float):
    """For ``[b, n, size]`` blocks: ``(damp·I + G_bᵀ G_b / n)⁻¹`` in float64, its diagonal
    floored at ``1 / F_kk``, and whether a block failed to factor or was not finite. A
    function of its own so that its temporaries are gone when it returns."""
    n = G.shape[1]
    G = G.to(_SMALL)
    F = G.mT @ G / n
    del G
    F.diagonal(dim1=-2, dim2=-1).add_(damp)
    factor, info = torch.linalg.cholesky_ex(F)
    failed = (info != 0).any() | ~torch.isfinite(F.diagonal(dim1=-2, dim2=-1)).all()
    if bool(failed):  # the caller raises; there is nothing to invert
        return torch.zeros_like(F), torch.zeros_like(F[..., 0]), failed
    inverse = torch.cholesky_inverse(factor)
    del factor
    floor = 1.0 / F.diagonal(dim1=-2, dim2=-1)  # [F⁻¹]_kk ≥ 1 / F_kk
    return inverse, torch.maximum(inverse.diagonal(dim1=-2, dim2=-1), floor), failed


def _woodbury_factor(G: torch.Tensor, columns: list[slice], damp: float, buffer: torch.Tensor):
    """For ``[b, n, size]`` blocks: the Cholesky factor of ``n·damp·I + G_b G_bᵀ`` from the
    lower Gram matrix accumulated a float64 piece (``columns``) at a time in ``buffer``, and
    whether a block failed to factor or was not finite."""
    n = G.shape[1]
    K = torch.zeros(G.shape[0], n, n, dtype=_SMALL, device=G.device)
    for c in columns:
        _add_lower_gram(K, _float64_piece(buffer, G[..., c]))
    K += K.tril(-1).mT  # the upper triangle was left at zero
    K.diagonal(dim1=-2, dim2=-1).add_(n * damp)
    L, info = torch.linalg.cholesky_ex(K)
    return L, (info != 0).any() | ~torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all()


class _BlockGroup:
    """Equal blocks of ``size`` consecutive coordinates, sharing one representation."""

    def __init__(self, grads: torch.Tensor, size: int, damp: float) -> None:
        n, d = grads.shape
        self.dim, self.size, self.damp = d, size, damp
        self.method = "explicit" if size < n else "woodbury"
        self.blocks = grads.reshape(n, d // size, size).transpose(0, 1)  # [blocks, n, size]
        if self.method == "explicit":
            self.inverse, self._diagonal, self.factored = self._explicit(self.blocks, damp)
        else:
            self.factor, self.factored = self._factor(self.blocks, damp)
            # K_b⁻¹ of each block, formed by the second solve when there are several blocks
            self._system_inverse: torch.Tensor | None = None
            self._diagonal_done = self._solved = False

    @staticmethod
    def _explicit(blocks: torch.Tensor, damp: float):
        """``(damp·I + G_bᵀ G_b / n)⁻¹`` of every block and its diagonal, in float64, and
        whether every block could be factored (and was finite)."""
        count, n, size = blocks.shape
        inverse = torch.empty(count, size, size, dtype=blocks.dtype, device=blocks.device)
        diagonal = torch.empty(count, size, dtype=_SMALL, device=blocks.device)
        failed = torch.zeros((), dtype=torch.bool, device=blocks.device)
        step = _blocks_per_step(count, n, size)
        for b in range(0, count, step):
            inverse[b : b + step], diagonal[b : b + step], bad = _explicit_inverse(
                blocks[b : b + step], damp
            )
            failed |= bad
        return inverse, diagonal.reshape(-1), not bool(failed)

    @staticmethod
    def _factor(blocks: torch.Tensor, damp: float) -> tuple[torch.Tensor, bool]:
        """``L`` with ``L Lᵀ = n·damp·I + G_b G_bᵀ`` for every block, in float64: the lower
        Gram matrix accumulated a float64 piece at a time, then a batched Cholesky; and
        whether every block could be factored (and was finite)."""
        count, n, _ = blocks.shape
        factor = torch.empty(count, n, n, dtype=_SMALL, device=blocks.device)
        buffer = torch.empty(_piece_elements(*blocks.shape), dtype=_SMALL, device=blocks.device)
        failed = torch.zeros((), dtype=torch.bool, device=blocks.device)
        for b, columns in _pieces(*blocks.shape):
            factor[b], bad = _woodbury_factor(blocks[b], columns, damp, buffer)
            failed |= bad
        return factor, not bool(failed)

    def diagonal(self) -> torch.Tensor:
        """``[F⁻¹]_kk`` of this group's coordinates, float64: ``(1 − ‖W[:, k]‖²) / damp`` with
        ``W = L⁻¹ G`` formed a piece at a time, floored at ``1 / F_kk``."""
        if self.method == "explicit":
            return self._diagonal
        count, n, size = self.blocks.shape
        damp = self.damp
        diagonal = torch.empty(count, size, dtype=_SMALL, device=self.blocks.device)
        buffer = torch.empty(
            _piece_elements(count, n, size), dtype=_SMALL, device=self.blocks.device
        )
        for b, columns in _pieces(count, n, size):
            L = self.factor[b]
            for c in columns:
                G_c = _float64_piece(buffer, self.blocks[b][..., c])
                # W_cᵀ = G_cᵀ L⁻ᵀ: G_cᵀ is already column-major for LAPACK (no copy) and
                # W_c comes back row-major; 1.3x faster than L⁻¹ G_c at n = 1024
                W_c = torch.linalg.solve_triangular(L.mT, G_c.mT, upper=True, left=False).mT
                floor = 1.0 / (damp + _squared_column_norms(G_c) / n)  # [F⁻¹]_kk ≥ 1 / F_kk
                value = (1.0 - _squared_column_norms(W_c)) / damp
                diagonal[b, c] = torch.maximum(value, floor)
        self._diagonal_done = True
        self._drop_unneeded_factor()
        return diagonal.reshape(-1)

    def _system_inverses(self) -> torch.Tensor:
        """``K_b⁻¹`` of every block, formed on first use (about two solves' worth of
        triangular solves): then one batched product per solve instead of two triangular
        solves per block (1024 blocks of 64: 4-6 ms against 30)."""
        if self._system_inverse is None:
            self._system_inverse = torch.cholesky_inverse(self.factor)
            self._drop_unneeded_factor()
        return self._system_inverse

    def _drop_unneeded_factor(self) -> None:
        """``L`` serves the diagonal and the blockwise solves' ``K_b⁻¹``: once both exist
        it is freed."""
        if self._diagonal_done and self._system_inverse is not None:
            self.factor = None

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """``F⁻¹ x`` on this group's coordinates for ``x`` of shape ``[k, dim]``."""
        k = x.shape[0]
        if self.method == "explicit":
            blocks = x.reshape(k, -1, self.size).transpose(0, 1)  # [blocks, k, size]
            out = blocks @ self.inverse  # each block inverse is symmetric
            return out.transpose(0, 1).reshape(k, self.dim)
        if self.blocks.shape[0] == 1 and k == 1 and self.blocks.is_contiguous():
            G = self.blocks[0]  # one pass for G x, one for the combination, fused kernels
            t = kernels.row_dots(G, x[0], G.shape[0])
            c = torch.cholesky_solve(t.to(_SMALL)[:, None], self.factor[0])[:, 0]
            out = kernels.combine(
                G, (-c / self.damp).to(x.dtype), G.shape[0], x[0], 1.0 / self.damp
            )
            return out.unsqueeze(0)
        blocks = x.reshape(k, -1, self.size).transpose(0, 1)  # [blocks, k, size]
        t = (blocks @ self.blocks.mT).to(_SMALL)  # (G_b x_b)ᵀ: [blocks, k, n]
        if self.blocks.shape[0] == 1 or (self._system_inverse is None and not self._solved):
            # one block, or the first solve (the pruner's only one): triangular solves
            c = torch.cholesky_solve(t.mT, self.factor).mT  # (K⁻¹ G x)ᵀ
        else:  # from the second solve on, K_b⁻¹ once and a batched product each time
            c = t @ self._system_inverses()  # (K_b⁻¹ G_b x_b)ᵀ, K_b⁻¹ being symmetric
        self._solved = True
        out = (blocks - c.to(x.dtype) @ self.blocks) / self.damp
        return out.transpose(0, 1).reshape(k, self.dim)
