r"""Per-dimension bases for Adam in a rotated space: SOAP's eigenbases of running Grams.

A tensor ``G`` of working shape ``(n_0, …, n_{K-1})`` is rotated along each dimension ``k``
that has a basis ``Q_k`` (``n_k × r_k``, orthonormal columns) and left as it is along the
others:

.. math::

    \operatorname{project}(G) = G \times_0 Q_0^\top \times_1 Q_1^\top \cdots, \qquad
    \operatorname{back}(N) = N \times_0 Q_0 \times_1 Q_1 \cdots

For a matrix with both bases that is ``Q_Lᵀ G Q_R`` and ``Q_L N Q_Rᵀ``; with one basis of
``r < n`` columns it is GaLore's one-sided projection.

SOAP (Vyas et al. 2024) takes ``Q_k`` from the mode-``k`` Gram ``C_k = E[G_{(k)} G_{(k)}ᵀ]``,
a running average ``C_k ← β C_k + (1 − β) G_{(k)} G_{(k)}ᵀ``: the eigenvectors at the first
step (:func:`eigenbasis`), then, every ``precondition_frequency`` steps, one power
iteration and a QR decomposition, ``Q_k ← qr(C_k Q_k)``, after sorting the columns by the
estimated eigenvalues ``diag(Q_kᵀ C_k Q_k)`` (:func:`power_iteration`). The functions
follow the operations of the authors' ``soap.py`` (the first basis is sensitive to
rounding: a single gradient's Gram is rank-deficient, and the eigenvectors of its null
space are chosen by rounding).

:func:`dct_columns` chooses instead ``r`` columns of the fixed orthonormal DCT-II basis by
the Gram's energy along each (no eigendecomposition).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .projectors import dct_basis

__all__ = [
    "dct_columns",
    "eigenbasis",
    "merged_shape",
    "mode_gram",
    "power_iteration",
    "project",
    "project_back",
]


def merged_shape(shape: Sequence[int], max_dim: int) -> list[int]:
    """``shape`` with neighbouring dimensions multiplied together while the product stays at
    most ``max_dim`` (SOAP's ``merge_dims``): ``(8, 3, 3, 3)`` at 64 is ``[24, 27]``."""
    merged: list[int] = []
    run = 1
    for size in shape:
        if run * size <= max_dim:
            run *= size
        elif run > 1:
            merged.append(run)
            run = size
        else:
            merged.append(size)
            run = 1
    if run > 1 or not merged:
        merged.append(run)
    return merged


def mode_gram(G: torch.Tensor, k: int) -> torch.Tensor:
    """``G_{(k)} G_{(k)}ᵀ``: ``G`` contracted with itself over every dimension but ``k``."""
    others = [d for d in range(G.dim()) if d != k]
    return torch.tensordot(G, G, dims=(others, others))


def project(x: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``x ×_k Q_kᵀ`` along every dimension with a basis (``None``: left as it is)."""
    for Q in bases:  # each contraction moves the dimension it treats to the end
        x = x.permute(*range(1, x.dim()), 0) if Q is None else torch.tensordot(x, Q, ([0], [0]))
    return x


def project_back(x: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``x ×_k Q_k`` along every dimension with a basis: :func:`project` undone."""
    for Q in bases:
        x = x.permute(*range(1, x.dim()), 0) if Q is None else torch.tensordot(x, Q, ([0], [1]))
    return x


def eigenbasis(gram: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """The eigenvectors of ``gram``, by decreasing eigenvalue (the top ``rank`` of them), in
    ``gram``'s dtype: ``eigh`` in float32 (float64 for float64 Grams, and if float32 fails)
    of ``gram + 10⁻³⁰ I``."""
    shift = 1e-30 * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    try:
        vectors = torch.linalg.eigh(gram.float() + shift)[1]
    except torch.linalg.LinAlgError:
        vectors = torch.linalg.eigh(gram.double() + shift)[1]
    if rank is not None:  # cut before the copy that flip makes: the basis owns only its columns
        vectors = vectors[:, -rank:]
    return vectors.flip(1).to(gram.dtype)


def power_iteration(gram: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of subspace iteration from ``basis``: its columns sorted by their estimated
    eigenvalues ``diag(Qᵀ C Q)`` (decreasing), then ``qr(C Q)``, in float32. Returns the new
    basis (in ``basis``'s dtype) and the order, by which the second moment is permuted."""
    C, Q = gram.float(), basis.float()
    estimates = (Q.mT @ C @ Q).diagonal()
    order = torch.argsort(estimates, descending=True)
    Q = torch.linalg.qr(C @ Q[:, order]).Q
    return Q.to(basis.dtype), order


def dct_columns(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` columns of the orthonormal DCT-II basis with the most energy of the Gram,
    ``diag(Qᵀ C Q)``, in decreasing order (no eigendecomposition)."""
    Q = dct_basis(gram.shape[0], gram.dtype, gram.device)
    energy = (Q.mT @ gram @ Q).diagonal()
    return Q[:, torch.topk(energy, rank).indices]
