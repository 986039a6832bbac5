"""``torch.optim`` optimisers built on second-order information."""

from .dct import DCTAdamW
from .galore import GaLoreAdamW, NaturalGaLore
from .mfac import MFAC
from .soap import SOAP
from .sst import SST

__all__ = ["MFAC", "SOAP", "SST", "DCTAdamW", "GaLoreAdamW", "NaturalGaLore"]
