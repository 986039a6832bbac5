"""What second-order information is: operators on curvature matrices and estimators built on them."""

from .fisher import empirical_fisher_diagonal, fisher_merge, per_sample_gradients
from .mfac import DenseMFAC, SlidingWindowMFAC
from .operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    NondeterminismError,
)

__all__ = [
    "CurvatureOperator",
    "DenseMFAC",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "NondeterminismError",
    "SlidingWindowMFAC",
    "empirical_fisher_diagonal",
    "fisher_merge",
    "per_sample_gradients",
]
