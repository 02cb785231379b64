"""Pure-PyTorch spectral core: implicit operators, spectrum extraction, clipping and ground truths.

Nothing here imports Lightning, Hydra or torchattacks.
"""

from lightning_specclip.spectral.operator import ImplicitLinear, eval_mode
from lightning_specclip.spectral.power import PowerStep
from lightning_specclip.spectral.spectrum import Spectrum, gap_free_spectra, spectrum

__all__ = ["ImplicitLinear", "PowerStep", "Spectrum", "eval_mode", "gap_free_spectra", "spectrum"]
