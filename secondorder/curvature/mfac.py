r"""M-FAC: matrix-free products with the inverse of the damped empirical Fisher.

For gradients ``g_1 … g_n`` (the rows of ``G``, ``n × d``) and damping ``λ > 0``

    F = λ I + (1/n) Gᵀ G.

By Woodbury, with the small ``n × n`` matrix ``K = n λ I + G Gᵀ``,

    F⁻¹ x = (1/λ) (x − Gᵀ K⁻¹ G x),

so a product costs two passes over ``G`` plus an ``n × n`` solve, and ``d × d``
is never formed. ``n`` is the number of gradients actually held, so the
estimate is right while a window is still filling.

- :class:`DenseMFAC` (here: the static algorithm, for pruning) factors ``K = L Lᵀ`` once
  for a fixed ``G``, after which ``F⁻¹ x = (x − Gᵀ K⁻¹ G x) / λ``; on request,
  ``[F⁻¹]_kk = (1 − ‖W[:, k]‖²) / λ`` with ``W = L⁻¹ G``, formed a piece at a time;
  optionally block-diagonally, one block of ``block_size`` coordinates at a time.
- The dynamic algorithm, for optimisers, is in :mod:`.sliding_window`
  (:class:`~.sliding_window.SlidingWindowMFAC`, dense rows) and :mod:`.sparse_window`
  (:class:`~.sparse_window.SparseSlidingWindowMFAC`, compressed rows with error feedback):
  a ring of the last ``num_grads`` gradients whose ``K = L D Lᵀ`` is kept current in
  O(n²) per new gradient.
"""

from __future__ import annotations

import torch

from .. import kernels
from .._checks import (
    check_damping,
    check_finite,
    check_positive_int,
    ensure_fits,
)
from ..errors import NotPositiveDefiniteError
from .fisher_operators import FisherOperator, InverseFisherOperator

__all__ = ["DenseMFAC"]

# The n × n system is small; it is always solved in float64.
_SMALL = torch.float64


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


class DenseMFAC(InverseFisherOperator):
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

    It is the linear operator ``F⁻¹`` (``inverse @ v``, ``shape``: the estimators run on
    it), and :meth:`fisher` gives the operator ``F`` (:mod:`.fisher_operators`).

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

    def _solve_columns(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.solve(matrix.T).T  # solve takes vectors as rows

    def fisher(self) -> FisherOperator:
        """The operator ``F = damp·I + (1/n) Gᵀ G`` (its block-diagonal part when blockwise):
        ``F x`` is two passes over the gradients, block by block."""
        return FisherOperator(self.dim, self.dtype, self.device, self._apply_fisher)

    def _apply_fisher(self, x: torch.Tensor) -> torch.Tensor:
        check_finite(x, "x")
        x = x.to(self.dtype)
        parts, start = [], 0
        for group in self._groups:
            blocks = group.blocks  # [count, n, size]
            pieces = x[start : start + group.dim].reshape(blocks.shape[0], blocks.shape[2], 1)
            back = blocks.mT @ (blocks @ pieces)  # G_bᵀ (G_b x_b) for every block b
            parts.append((self.damp * pieces + back / self.num_grads).reshape(-1))
            start += group.dim
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def diag(self) -> torch.Tensor:
        """The diagonal of ``F⁻¹`` (of its block-diagonal part when blockwise); the first call
        computes it (a second pass over the gradients for Woodbury blocks), later calls reuse it."""
        if self._diagonal is None:
            groups = [(group.blocks.shape[0], group.blocks.shape[2]) for group in self._groups]
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
            self.factor: torch.Tensor | None  # freed by _drop_unneeded_factor
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

    @property
    def _live_factor(self) -> torch.Tensor:
        """``L``, for the callers that run before it is freed (the diagonal and ``K_b⁻¹``
        not both formed yet, or a single block, whose ``K_b⁻¹`` is never formed)."""
        assert self.factor is not None, "the Woodbury factor was already freed"
        return self.factor

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
            L = self._live_factor[b]
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
            self._system_inverse = torch.cholesky_inverse(self._live_factor)
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
            c = torch.cholesky_solve(t.to(_SMALL)[:, None], self._live_factor[0])[:, 0]
            out = kernels.combine(
                G, (-c / self.damp).to(x.dtype), G.shape[0], x[0], 1.0 / self.damp
            )
            return out.unsqueeze(0)
        blocks = x.reshape(k, -1, self.size).transpose(0, 1)  # [blocks, k, size]
        t = (blocks @ self.blocks.mT).to(_SMALL)  # (G_b x_b)ᵀ: [blocks, k, n]
        if self.blocks.shape[0] == 1 or (self._system_inverse is None and not self._solved):
            # one block, or the first solve (the pruner's only one): triangular solves
            c = torch.cholesky_solve(t.mT, self._live_factor).mT  # (K⁻¹ G x)ᵀ
        else:  # from the second solve on, K_b⁻¹ once and a batched product each time
            c = t @ self._system_inverses()  # (K_b⁻¹ G_b x_b)ᵀ, K_b⁻¹ being symmetric
        self._solved = True
        out = (blocks - c.to(x.dtype) @ self.blocks) / self.damp
        return out.transpose(0, 1).reshape(k, self.dim)
