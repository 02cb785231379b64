"""lightning_specclip: measure and clip the singular values of implicitly linear layers."""

from lightning_specclip.spectral import ImplicitLinear, Spectrum, spectrum

__all__ = ["ImplicitLinear", "Spectrum", "spectrum"]
__version__ = "0.1.0"
