r"""M-FAC's Fisher inverses as linear operators, so the estimators run on them.

``DenseMFAC`` and the sliding windows are operators for ``F⁻¹`` (``shape``, ``dtype``,
``device`` and ``@``, the protocol of :class:`~secondorder._common.LinearOperator`), and
their ``fisher()`` gives the operator for ``F = λ I + (1/n) Gᵀ G`` itself::

    top_eigenvalues(DenseMFAC(G, damp), k=3, which="smallest")   # of F⁻¹
    hutchinson_trace(window.fisher(), 30)                         # tr F

A sharded window (``process_group=``) is the operator of its own shard of the
coordinates: ``shape`` is its local ``dim``, and each rank multiplies its shard.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["FisherOperator", "InverseFisherOperator"]


def _columns(
    apply: Callable[[torch.Tensor], torch.Tensor], matrix: torch.Tensor, dim: int
) -> torch.Tensor:
    """``apply`` on a vector of length ``dim``, or on each column of a ``[dim, K]`` matrix."""
    if matrix.dim() == 1 and matrix.shape[0] == dim:
        return apply(matrix)
    if matrix.dim() == 2 and matrix.shape[0] == dim:
        return torch.stack([apply(column) for column in matrix.unbind(1)], dim=1)
    raise ValueError(
        f"an operator of shape ({dim}, {dim}) multiplies a vector of length {dim} or a "
        f"[{dim}, K] matrix, got shape {tuple(matrix.shape)}"
    )


class InverseFisherOperator:
    """The operator face of an M-FAC inverse: ``self @ v = F⁻¹ v``.

    A class that has ``dim``, ``dtype``, ``device`` and ``solve(x)`` (``F⁻¹ x`` for a vector
    ``x``) gains ``shape`` and ``@`` by inheriting it; a ``[D, K]`` matrix is solved column
    by column unless the class overrides :meth:`_solve_columns`."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def __matmul__(self, matrix: torch.Tensor) -> torch.Tensor:
        if matrix.dim() == 2 and matrix.shape[0] == self.dim:
            return self._solve_columns(matrix)
        return _columns(self.solve, matrix, self.dim)

    def _solve_columns(self, matrix: torch.Tensor) -> torch.Tensor:
        return _columns(self.solve, matrix, self.dim)


class FisherOperator:
    """``F = λ I + (1/n) Gᵀ G`` itself, from the product ``apply(x) = F x`` of its owner
    (a window or a ``DenseMFAC``); ``@`` takes a vector or ``[D, K]`` columns."""

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        apply: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.dim, self.dtype, self.device, self._apply = dim, dtype, device, apply

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def __matmul__(self, matrix: torch.Tensor) -> torch.Tensor:
        return _columns(self._apply, matrix, self.dim)
