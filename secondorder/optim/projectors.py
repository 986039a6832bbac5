r"""Rank-``r`` bases for projecting gradient matrices, shared by the low-rank optimisers.

A projector compresses the columns of an *oriented* gradient matrix ``X`` (``rows × size``):
``X = G`` for a right projection and ``X = Gᵀ`` for a left one (see
:func:`orient`). It chooses an orthonormal basis ``P`` (``size × r``, ``Pᵀ P = I``) and

.. math::

    \text{low} = X P \quad (\text{rows} \times r), \qquad
    \text{back}(N) = N P^\top \quad (\text{rows} \times \text{size}).

When the basis changes from ``P_old`` to ``P_new``, a low-rank quantity ``a = X P_old`` is
carried into the new basis by ``a R`` with ``R = P_oldᵀ P_new`` (``r × r``): exact whenever
``X`` lies in the span of ``P_old``.

Projectors are stateless strategies. What they choose is a tensor kept in the optimiser's
per-parameter state, so ``state_dict()`` holds tensors and plain values only:

- :class:`SVDProjector` (GaLore): ``P`` itself, the top-``r`` right singular vectors of ``X``.
- :class:`DCTProjector` (SVD-free): ``r`` int64 column indices into one orthonormal DCT-II
  basis ``Q`` per size; ``P = Q[:, indices]``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch

from .._distributed import all_reduce_sum

__all__ = [
    "DCTProjector",
    "Projector",
    "SVDProjector",
    "dct_basis",
    "dct_rows",
    "orient",
    "rotation",
]

Side = Literal["left", "right"]


def orient(matrix: torch.Tensor, side: Side) -> torch.Tensor:
    """The view whose columns are compressed: ``G`` for ``"right"``, ``Gᵀ`` for ``"left"``."""
    return matrix if side == "right" else matrix.mT


def rotation(old_basis: torch.Tensor, new_basis: torch.Tensor) -> torch.Tensor:
    """``R = P_oldᵀ P_new``: carries low-rank quantities from the old basis to the new one."""
    return old_basis.mT @ new_basis


class Projector(ABC):
    """How a low-rank optimiser chooses and applies its basis."""

    #: name used in error messages and reports
    name: str = ""
    #: whether :meth:`refresh_row_shard` can refresh from a rank's rows of ``X`` alone
    refreshes_row_shards: bool = False
    #: whether :meth:`refresh` runs on the device without reading the host (so that
    #: ``nonfinite="skip_on_device"`` can mask it instead of deciding on the host)
    refreshes_on_device: bool = False

    @abstractmethod
    def refresh(self, oriented: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose a basis for ``X = oriented``; return ``(choice, X P)``.

        ``choice`` is the tensor kept in the optimiser state and given back to :meth:`basis`.
        """

    @abstractmethod
    def basis(self, choice: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
        """The orthonormal ``size × r`` matrix ``P`` that ``choice`` stands for, in ``dtype``."""

    def refresh_row_shard(
        self, rows: torch.Tensor, rank: int, process_group: torch.distributed.ProcessGroup
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`refresh` when each rank of ``process_group`` holds some rows of ``X``: the
        same ``choice`` on every rank, and this rank's rows of ``X P``."""
        raise NotImplementedError(f"the {self.name} projector needs the whole matrix")


class SVDProjector(Projector):
    """GaLore's projector: the top-``r`` right singular vectors of ``X``, by an SVD in float32.

    The SVD runs in float32 (float64 for float64 gradients) whatever the gradient's dtype,
    as in GaLore; the basis is stored in that dtype.
    """

    name = "svd"

    def refresh(self, oriented: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.float64 if oriented.dtype == torch.float64 else torch.float32
        X = oriented.to(dtype)
        _, _, Vh = torch.linalg.svd(X, full_matrices=False)
        basis = Vh[:rank].mT.contiguous()
        return basis, X @ basis

    def basis(self, choice: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
        return choice.to(dtype)


def dct_basis(
    size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    r"""The orthonormal DCT-II basis as the columns of a ``size × size`` matrix ``Q``.

    ``Q[j, k] = sqrt(2/n) cos(π k (2j + 1) / 2n)`` with column ``0`` scaled by ``sqrt(1/2)``,
    so ``X Q`` is the orthonormal DCT-II of each row of ``X`` and column ``k`` is the
    cosine of frequency ``k``. Built in float64, then cast.
    """
    j = torch.arange(size, dtype=torch.float64)
    k = torch.arange(size, dtype=torch.float64)
    Q = math.sqrt(2.0 / size) * torch.cos(math.pi * k[None, :] * (2 * j[:, None] + 1) / (2 * size))
    Q[:, 0] *= math.sqrt(0.5)
    return Q.to(device=device, dtype=dtype)


def dct_rows(X: torch.Tensor) -> torch.Tensor:
    r"""``X Q``, the orthonormal DCT-II of every row of ``X``, by one real FFT per row (Makhoul, 1980).

    With ``v = (x_0, x_2, x_4, …, x_5, x_3, x_1)`` (even entries, then odd ones reversed)
    and ``V = FFT(v)``, ``Σ_j x_j cos(π k (2j+1) / 2n) = Re(e^{-iπk/2n} V_k)
    = cos(πk/2n) Re V_k + sin(πk/2n) Im V_k``. ``v`` is real, so ``V_k = conj(V_{n-k})``:
    a real FFT gives ``k ≤ n/2`` and the rest by symmetry. O(n log n) per row instead of O(n²).
    """
    n = X.shape[-1]
    half = n // 2 + 1
    v = torch.cat([X[..., ::2], X[..., 1::2].flip(-1)], dim=-1)
    spectrum = torch.view_as_real(torch.fft.rfft(v, dim=-1))  # (..., half, 2)
    re, im = spectrum[..., 0], spectrum[..., 1]
    angle = torch.arange(n, device=X.device, dtype=torch.float64) * (math.pi / (2 * n))
    scale = torch.full((n,), math.sqrt(2.0 / n), device=X.device, dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    cos = (scale * torch.cos(angle)).to(X.dtype)
    sin = (scale * torch.sin(angle)).to(X.dtype)
    out = torch.empty_like(X)
    out[..., :half] = re * cos[:half] + im * sin[:half]
    # k = half … n-1 mirror n-k = n-half … 1, where Re V_k = Re V_{n-k} and Im V_k = -Im V_{n-k}
    re_mirror, im_mirror = re[..., 1 : n - half + 1].flip(-1), im[..., 1 : n - half + 1].flip(-1)
    out[..., half:] = re_mirror * cos[half:] - im_mirror * sin[half:]
    return out


# Measured on CPU (docs/benchmarks.md, "Low-rank optimisers"): the FFT forms
# X Q faster than a matmul from this size on; below it the matmul wins.
_FFT_FROM_SIZE_ON_CPU = 1024


class DCTProjector(Projector):
    r"""The SVD-free projector: ``r`` columns of the orthonormal DCT-II basis, chosen by norm.

    On a refresh, ``S = X Q`` is formed for the whole basis ``Q`` (:func:`dct_basis`), the
    ``r`` columns of ``S`` with the largest ``norm`` (1 or 2) are kept, and only their int64
    indices are stored; ``X P = S[:, indices]`` comes for free. Between refreshes
    ``X P = X Q[:, indices]``.

    ``Q`` is built once per ``(size, dtype, device)`` and shared by every layer of that
    size. The cache lives on this projector, that is on the optimiser that owns it: no
    global state. ``method`` forms ``S``: ``"matmul"``, ``"fft"`` (:func:`dct_rows`) or
    ``"auto"`` (the FFT on CPU from size 1024, where it measured faster; the matmul below
    and on GPUs, unmeasured there).
    """

    name = "dct"

    def __init__(self, norm: int = 1, method: Literal["auto", "matmul", "fft"] = "auto") -> None:
        if norm not in (1, 2):
            raise ValueError(f"norm must be 1 or 2, got {norm!r}")
        if method not in ("auto", "matmul", "fft"):
            raise ValueError(f"method must be 'auto', 'matmul' or 'fft', got {method!r}")
        self.norm = norm
        self.method = method
        self._bases: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def full_basis(self, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The cached ``size × size`` basis ``Q``."""
        key = (size, dtype, torch.device(device))
        if key not in self._bases:
            self._bases[key] = dct_basis(size, dtype, device)
        return self._bases[key]

    def uses_fft(self, size: int, device: torch.device) -> bool:
        if self.method != "auto":
            return self.method == "fft"
        return device.type == "cpu" and size >= _FFT_FROM_SIZE_ON_CPU

    refreshes_row_shards = True
    refreshes_on_device = True  # a product, a top-k and a gather

    def _transform(self, oriented: torch.Tensor) -> torch.Tensor:
        """``S = X Q``, by FFT or matmul."""
        size = oriented.shape[-1]
        if self.uses_fft(size, oriented.device):
            return dct_rows(oriented)
        return oriented @ self.full_basis(size, oriented.dtype, oriented.device)

    def _scores(self, S: torch.Tensor) -> torch.Tensor:
        # |S| summed down each column (l1) or S² (the l2 norm's square ranks the same);
        # much faster than linalg.vector_norm along dim 0 on CPU
        return (S.abs() if self.norm == 1 else S.square()).sum(0)

    def refresh(self, oriented: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        S = self._transform(oriented)
        indices = torch.topk(self._scores(S), rank, sorted=True).indices
        return indices, S.index_select(-1, indices)

    def refresh_row_shard(
        self, rows: torch.Tensor, rank: int, process_group: torch.distributed.ProcessGroup
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The column scores are sums over rows: each rank scores its rows and one all-reduce
        of ``size`` numbers gives every rank the same choice."""
        S = self._transform(rows)
        scores = all_reduce_sum(self._scores(S), process_group)
        indices = torch.topk(scores, rank, sorted=True).indices
        return indices, S.index_select(-1, indices)

    def basis(self, choice: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
        return self.full_basis(size, dtype, choice.device).index_select(1, choice)
