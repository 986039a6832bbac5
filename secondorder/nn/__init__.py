"""Model surgery: layers the library's optimisers train in another form than ``nn.Linear``."""

from .spectral import SpectralLinear, refactor, spectral_factors, to_spectral

__all__ = ["SpectralLinear", "refactor", "spectral_factors", "to_spectral"]
