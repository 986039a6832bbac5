"""``torch.optim`` optimisers built on second-order information."""

from .dct import DCTAdamW
from .galore import GaLoreAdamW, NaturalGaLore
from .mfac import MFAC

__all__ = ["MFAC", "DCTAdamW", "GaLoreAdamW", "NaturalGaLore"]
