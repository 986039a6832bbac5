r"""Extreme eigenvalues and the spectral density of a symmetric matrix, from products alone.

Both rest on the Lanczos process: from a unit vector ``q_1``, ``m`` products
with ``A`` build an orthonormal basis ``Q_m`` of the Krylov space and a
tridiagonal ``T_m = Q_mᵀ A Q_m``, with ``A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ``.

- The eigenvalues of ``T_m`` (Ritz values) converge to the extreme
  eigenvalues of ``A`` first; a Ritz pair ``(θ, Q_m s)`` has the residual
  ``‖A Q_m s − θ Q_m s‖ = |β_m s_m|`` at no extra cost.
- Stochastic Lanczos quadrature (Golub & Meurant; Ubaru, Chen & Saad, 2017;
  Ghorbani, Krishnan & Xiao, 2019): for a random unit ``q_1``, the Ritz values
  ``θ_j`` with weights ``τ_j = s_{1j}²`` (first components of ``T``'s
  eigenvectors) are a Gauss quadrature of the spectral measure
  ``(1/D) Σ_i δ(λ − λ_i)`` seen from ``q_1``; averaging runs and smoothing
  each node with a Gaussian gives a density that integrates to 1.

The basis is fully reorthogonalised (twice, classical Gram-Schmidt) at every
step, so no spurious copies of converged eigenvalues appear. If the Krylov
space closes (``β ≈ 0``: an invariant subspace) the process goes on from a new
random vector orthogonal to the basis, so repeated eigenvalues and low-rank
matrices are handled. The small tridiagonal eigenproblems are solved in
float64 with ``torch.linalg.eigh``.

``op`` is anything with ``shape``, ``dtype``, ``device`` and ``op @ V`` for a
``[D, K]`` matrix: a curvature operator or a dense tensor. Several runs of
the density are made together, as one ``[D, num_runs]`` product per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .._checks import check_positive_int, ensure_fits
from .._common import LinearOperator, square_dim
from .._progress import progress as progress_bar
from .probes import probes

__all__ = ["Eigenpairs", "SpectralDensity", "spectral_density", "top_eigenvalues"]

Which = Literal["largest", "smallest", "magnitude"]


@dataclass(frozen=True)
class Eigenpairs:
    """Eigenvalues found by :func:`top_eigenvalues`, in the order asked for.

    ``residual_norms[i] = ‖A x_i − λ_i x_i‖`` is computed with ``k`` true
    products at the end (not the Lanczos estimate), so it can be trusted; an
    eigenvalue's error is at most its residual norm. ``converged`` says
    whether every residual is within ``tol`` times the largest ``|λ_i|``.
    """

    eigenvalues: torch.Tensor  # [k]
    eigenvectors: torch.Tensor  # [D, k], unit columns
    residual_norms: torch.Tensor  # [k]
    converged: bool
    num_matvecs: int


@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed spectral density from stochastic Lanczos quadrature.

    ``density`` on ``grid`` is ``(1/R) Σ_r Σ_j τ_rj N(t; θ_rj, sigma²)`` for the
    ``R`` runs' ``nodes`` ``θ`` and ``weights`` ``τ`` (each run's weights sum to 1),
    so it integrates to 1 over the real line, and over ``grid`` when the grid
    covers every node by a few ``sigma`` (the default grid does).
    """

    grid: torch.Tensor  # [G]
    density: torch.Tensor  # [G]
    nodes: torch.Tensor  # [R, m]
    weights: torch.Tensor  # [R, m]
    sigma: float
    dim: int
    num_matvecs: int

    def spectral_sum(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """The quadrature estimate of ``tr f(A) = Σ_i f(λ_i)``, e.g. ``fn=lambda x: x`` for the trace."""
        return float(self.dim * (self.weights * fn(self.nodes)).sum(dim=1).mean())


def top_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    *,
    method: Literal["lanczos"] = "lanczos",
    which: Which = "largest",
    tol: float = 1e-3,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> Eigenpairs:
    """The ``k`` largest (``which="largest"``), smallest, or largest-in-magnitude eigenpairs.

    Lanczos with full reorthogonalisation from a random start, one product per
    step, stopped when every wanted Ritz pair's residual estimate
    ``|β_m s_m|`` is at most ``tol · max|θ|`` or after ``max_iter`` steps
    (memory: ``max_iter + 1`` vectors of ``D``). Then ``k`` more products, in
    one call, give the true residuals and the ``converged`` flag
    (:class:`Eigenpairs`). For the sharpness of a loss, the top Hessian
    eigenvalue, ``k=1`` and ``which="largest"``.
    """
    if method != "lanczos":
        raise ValueError(f"method must be 'lanczos', got {method!r}")
    if which not in ("largest", "smallest", "magnitude"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'magnitude', got {which!r}")
    dim = square_dim(op)
    check_positive_int(k, "k")
    check_positive_int(max_iter, "max_iter")
    if k > dim:
        raise ValueError(f"k={k} eigenvalues asked of a {dim} x {dim} matrix")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    max_iter = max(max_iter, k)

    def key(theta: torch.Tensor) -> torch.Tensor:  # ascending key = more wanted
        return {"largest": -theta, "smallest": theta, "magnitude": -theta.abs()}[which]

    def wanted(theta: torch.Tensor) -> torch.Tensor:
        return torch.argsort(key(theta), stable=True)[:k]

    def done(alpha: torch.Tensor, beta: torch.Tensor, closed: bool) -> bool:
        if alpha.shape[0] < k:
            return False
        theta, s = torch.linalg.eigh(_tridiagonal(alpha, beta))
        index = wanted(theta)
        if closed:
            # Every Ritz pair is exact now. The block since the last restart holds every
            # distinct eigenvalue of A on the complement of the earlier blocks: if one of
            # them is wanted, the complement may hold another copy, so go on.
            restarts = (beta[:-1] == 0).nonzero()
            first = int(restarts[-1]) + 1 if len(restarts) else 0
            block = torch.linalg.eigvalsh(_tridiagonal(alpha[first:], beta[first:]))
            return bool(key(block).min() > key(theta[index]).max())
        estimate = beta[-1].abs() * s[-1, index].abs()
        return bool((estimate <= tol * theta[index].abs().max()).all())

    start = probes(dim, 1, "gaussian", dtype=op.dtype, device=op.device, generator=generator)
    krylov = lanczos(
        op, start, max_iter, generator=generator, stop=lambda a, b, closed: done(a[:, 0], b[:, 0], bool(closed[0])),
        progress=progress, desc="Lanczos",
    )  # fmt: skip
    theta, s = torch.linalg.eigh(_tridiagonal(krylov.alpha[:, 0], krylov.beta[:, 0]))
    index = wanted(theta)
    values = theta[index]
    vectors = krylov.basis[:, :, 0].T @ s[:, index].to(op.dtype)
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=0)
    products = op @ vectors
    residuals = torch.linalg.vector_norm(products - vectors * values.to(op.dtype), dim=0)
    converged = bool((residuals <= tol * values.abs().max()).all())
    return Eigenpairs(values.to(op.dtype), vectors, residuals, converged, krylov.num_matvecs + k)


def spectral_density(
    op: LinearOperator,
    num_runs: int = 10,
    num_iters: int = 30,
    *,
    grid: int | torch.Tensor = 1000,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> SpectralDensity:
    """The eigenvalue density of ``op`` by stochastic Lanczos quadrature.

    ``num_runs`` Lanczos runs of ``num_iters`` steps from Rademacher starts,
    made together: ``num_iters`` products of ``[D, num_runs]`` matrices
    (memory: ``num_iters + 1`` times ``D × num_runs``). ``sigma`` is the width
    of the Gaussian put on each node (default: 1% of the span of the nodes);
    ``grid`` is the number of evenly spaced points over the nodes ± 6 ``sigma``,
    or the points themselves. See :class:`SpectralDensity`.
    """
    dim = square_dim(op)
    check_positive_int(num_runs, "num_runs")
    check_positive_int(num_iters, "num_iters")
    start = probes(
        dim, num_runs, "rademacher", dtype=op.dtype, device=op.device, generator=generator
    )
    krylov = lanczos(
        op, start, num_iters, generator=generator, progress=progress, desc="Lanczos quadrature"
    )
    run_nodes, run_weights = [], []
    for run in range(num_runs):
        theta, s = torch.linalg.eigh(_tridiagonal(krylov.alpha[:, run], krylov.beta[:, run]))
        run_nodes.append(theta)
        run_weights.append(s[0].square())
    nodes, weights = torch.stack(run_nodes).cpu(), torch.stack(run_weights).cpu()

    low, high = float(nodes.min()), float(nodes.max())
    if sigma is None:
        span = high - low
        sigma = 0.01 * span if span > 0 else 0.01 * max(abs(high), 1.0)
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if isinstance(grid, int):
        check_positive_int(grid, "grid")
        grid = torch.linspace(low - 6 * sigma, high + 6 * sigma, grid, dtype=torch.float64)
    else:
        grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
        if grid.ndim != 1:
            raise ValueError(f"grid must be 1-D, got shape {tuple(grid.shape)}")
    gaussians = torch.exp(-0.5 * ((grid[:, None, None] - nodes) / sigma) ** 2)
    density = (gaussians * weights).sum(dim=2).mean(dim=1) / (sigma * math.sqrt(2 * math.pi))
    return SpectralDensity(grid, density, nodes, weights, float(sigma), dim, krylov.num_matvecs)


# -- the Lanczos process ------------------------------------------------------------------------


@dataclass(frozen=True)
class Krylov:
    """``m`` steps of Lanczos for ``R`` starts at once: ``T``'s diagonal ``alpha`` and
    off-diagonal ``beta`` (``[m, R]``, float64; ``beta[-1]`` is ``β_m``) and the basis
    ``[m, D, R]``."""

    alpha: torch.Tensor
    beta: torch.Tensor
    basis: torch.Tensor
    num_matvecs: int


def lanczos(
    op: LinearOperator,
    start: torch.Tensor,
    num_iters: int,
    *,
    generator: torch.Generator | None = None,
    stop: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool] | None = None,
    progress: bool = True,
    desc: str = "Lanczos",
) -> Krylov:
    """Lanczos with full reorthogonalisation from the ``R`` columns of ``start`` (``[D, R]``).

    One product of a ``[D, R]`` matrix per step. At most ``min(num_iters, D)``
    steps; ``stop(alpha, beta, closed)`` is asked after each and ends the process when
    true (``closed[r]``: run ``r`` has just found an invariant subspace, after which it
    goes on from a fresh random vector orthogonal to its basis).
    """
    dim, runs = start.shape
    num_iters = min(num_iters, dim)
    ensure_fits(
        (num_iters + 1) * dim * runs * start.element_size(),
        start.device,
        what=f"a Lanczos basis of {num_iters + 1} x {dim} x {runs}",
        advice="use fewer iterations or runs",
    )
    basis = torch.zeros(num_iters + 1, dim, runs, dtype=start.dtype, device=start.device)
    alpha = torch.zeros(num_iters, runs, dtype=torch.float64, device=start.device)
    beta = torch.zeros_like(alpha)
    basis[0] = start / torch.linalg.vector_norm(start, dim=0)
    breakdown = torch.finfo(start.dtype).eps ** 0.75
    norm_estimate = torch.zeros(runs, dtype=torch.float64, device=start.device)
    steps = 0
    for j in progress_bar(range(num_iters), desc=desc, enabled=progress):
        q = basis[j]
        w = op @ q
        a = (q * w).sum(dim=0)
        w = w - a * q
        if j > 0:
            w = w - beta[j - 1].to(w.dtype) * basis[j - 1]
        w = _orthogonalise(w, basis[: j + 1])
        b = torch.linalg.vector_norm(w, dim=0)
        alpha[j], beta[j] = a, b
        steps = j + 1
        norm_estimate = torch.maximum(norm_estimate, alpha[j].abs() + beta[j])
        closed = beta[j] <= breakdown * norm_estimate
        if (stop is not None and stop(alpha[:steps], beta[:steps], closed)) or steps == num_iters:
            break
        for run in closed.nonzero().flatten().tolist():
            # An invariant subspace: carry on from a fresh direction orthogonal to the basis.
            fresh = probes(dim, 1, "gaussian", dtype=w.dtype, device=w.device, generator=generator)
            w[:, run] = _orthogonalise(fresh, basis[: j + 1, :, run : run + 1])[:, 0]
            beta[j, run] = 0.0
            b[run] = torch.linalg.vector_norm(w[:, run])
        basis[j + 1] = w / b
    return Krylov(alpha[:steps], beta[:steps], basis[:steps], steps * runs)


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``w`` ([D, R]) minus its projection on each run's basis ([m, D, R]), twice for stability."""
    for _ in range(2):
        coefficients = torch.einsum("mdr,dr->mr", basis, w)
        w = w - torch.einsum("mdr,mr->dr", basis, coefficients)
    return w


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    off = beta[:-1]
    return torch.diag(alpha) + torch.diag(off, 1) + torch.diag(off, -1)
