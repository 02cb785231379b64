"""Clip (or set) the spectral norm of an affine layer in place: FastClip for any implicitly linear layer.

One module per path a clip takes, one entry point:

* :mod:`~.lockstep`: :func:`clip_spectral_norm_` and :func:`clip_spectral_norms_`, which pick the path of each
  module and run the clips with their deciding measurements in lock-step;
* :mod:`~.dense`: ``Linear`` (and ``Linear`` before ``BatchNorm1d``) exactly, by an SVD of the (composed) weight
  matrix; ``BatchNorm`` alone by clamping ``|γᵢ|/√(varᵢ+ε)`` (Gouk et al., 2021);
* :mod:`~.iterative`: FastClip's least-squares rounds on a block of singular vectors, then an exact rescale, for
  any map linear in one weight (convolutions of every kind, conv∘BN, other modules with ``param=``);
* :mod:`~.parametrized`: weights computed by ``weight_norm`` (new and legacy) clipped through it; what cannot be
  written through refused (:func:`check_clippable`);
* :mod:`~.base`: what they share: :class:`ClipSettings`, :class:`ClipResult`, the layer shapes and checks.

The module is only written once, at the end, after the result was verified: every value finite, and the spectral
norm measured on exactly the weights that will be written (for the dense SVD path in float64, after checking that
the decomposition is orthogonal and reconstructs the matrix, with a float64 retry when it is not). If anything fails
the weights are exactly as they were. ``ClipResult.after`` is always that measurement, and ``ClipResult.changed``
says whether anything was written.
"""

from lightning_specclip.spectral.clip.base import (
    MODES,
    Clippable,
    ClipResult,
    ClipSettings,
    batchnorm_scale,
)

# options.py and the Gouk and Miyato methods check their numbers with it, under this name
from lightning_specclip.spectral.clip.base import positive_finite as _positive_finite  # noqa: F401
from lightning_specclip.spectral.clip.lockstep import clip_spectral_norm_, clip_spectral_norms_
from lightning_specclip.spectral.clip.parametrized import check_clippable
from lightning_specclip.spectral.operator import NotLinearInWeightError

__all__ = [
    "MODES",
    "ClipResult",
    "ClipSettings",
    "Clippable",
    "NotLinearInWeightError",
    "batchnorm_scale",
    "check_clippable",
    "clip_spectral_norm_",
    "clip_spectral_norms_",
]
