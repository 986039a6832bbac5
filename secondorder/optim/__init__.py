"""``torch.optim`` optimisers built on second-order information."""

from .mfac import MFAC

__all__ = ["MFAC"]
