"""The modes a spectral computation runs in (``spectral/modes.py``): the core functions run outside the caller's
autocast region.
"""

from __future__ import annotations

import pytest
import torch
from helpers import sigma_as_called
from torch import nn

from lightning_specclip import (
    ImplicitLinear,
    clip_spectral_norm_,
    gap_free_spectra,
    spectrum,
)


def test_core_functions_run_outside_the_callers_autocast():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(5)
    A = ImplicitLinear(conv, (2, 8, 8))
    x = torch.randn(2, 2, 8, 8)
    exact = sigma_as_called(conv, (2, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert A.matvec(x).dtype == A.rmatvec(A.matvec(x)).dtype == A.gram(x)[0].dtype == torch.float32
        assert float(spectrum(conv, (2, 8, 8), tol=1e-6).values[0]) == pytest.approx(exact, rel=1e-5)
        assert float(gap_free_spectra([A], 1e-3)[0].values[0]) == pytest.approx(exact, rel=2e-3)
        result = clip_spectral_norm_(conv, 1.0, (2, 8, 8))
    assert result.after == pytest.approx(sigma_as_called(conv, (2, 8, 8)), rel=1e-4)
    assert sigma_as_called(conv, (2, 8, 8)) <= 1.01
