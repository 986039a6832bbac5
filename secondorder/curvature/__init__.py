"""What second-order information is: operators on curvature matrices and estimators built on them."""

from .mfac import DenseMFAC, SlidingWindowMFAC

__all__ = ["DenseMFAC", "SlidingWindowMFAC"]
