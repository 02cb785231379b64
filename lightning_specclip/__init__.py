"""lightning_specclip: measure and clip the singular values of implicitly linear layers.

The core (:func:`spectrum`, :func:`clip_spectral_norm_`, :mod:`lightning_specclip.spectral.exact`) and the
training-time controller (:class:`SpectralClipper`, for any training loop) and the network bound
(:func:`lipschitz_bound`, :class:`CertifiedAccuracy`) are pure PyTorch;
:class:`SpectralClipCallback` drives a clipper from a Lightning ``Trainer``.
"""

from lightning_specclip.callback import SpectralClipCallback
from lightning_specclip.clip_event import ClipEvent, ClipReport
from lightning_specclip.clipper import SpectralClipper
from lightning_specclip.lipschitz import CertifiedAccuracy, LipschitzBound, UnsupportedNodeError, lipschitz_bound
from lightning_specclip.methods import METHODS, ClipMethod
from lightning_specclip.options import ClipperOptions, check_options
from lightning_specclip.spectral import ImplicitLinear, PowerStep, Spectrum, gap_free_spectra, spectrum
from lightning_specclip.spectral.clip import (
    ClipResult,
    NotLinearInWeightError,
    check_clippable,
    clip_spectral_norm_,
    clip_spectral_norms_,
)

__all__ = [
    "METHODS",
    "CertifiedAccuracy",
    "ClipEvent",
    "ClipMethod",
    "ClipReport",
    "ClipResult",
    "ClipperOptions",
    "ImplicitLinear",
    "LipschitzBound",
    "NotLinearInWeightError",
    "PowerStep",
    "SpectralClipCallback",
    "SpectralClipper",
    "Spectrum",
    "UnsupportedNodeError",
    "check_clippable",
    "check_options",
    "clip_spectral_norm_",
    "clip_spectral_norms_",
    "gap_free_spectra",
    "lipschitz_bound",
    "spectrum",
]
__version__ = "0.1.0"
