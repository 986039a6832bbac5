"""What second-order information is: operators on curvature matrices and estimators built on them."""

from .fisher import empirical_fisher_diagonal, fisher_merge, per_sample_gradients
from .hutchinson import DiagonalEstimate, TraceEstimate, hutchinson_diagonal, hutchinson_trace
from .mfac import DenseMFAC
from .operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    NondeterminismError,
)
from .sliding_window import SlidingWindowMFAC
from .sparse_window import SparseSlidingWindowMFAC
from .spectrum import Eigenpairs, SpectralDensity, spectral_density, top_eigenvalues

__all__ = [
    "CurvatureOperator",
    "DenseMFAC",
    "DiagonalEstimate",
    "Eigenpairs",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "NondeterminismError",
    "SlidingWindowMFAC",
    "SparseSlidingWindowMFAC",
    "SpectralDensity",
    "TraceEstimate",
    "empirical_fisher_diagonal",
    "fisher_merge",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "per_sample_gradients",
    "spectral_density",
    "top_eigenvalues",
]
