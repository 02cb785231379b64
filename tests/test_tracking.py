"""Ground truths of a model (``tracking.py``): every layer measured as the map it is as called."""

from __future__ import annotations

import pytest
import torch
from helpers import sigma_as_called, unet

from lightning_specclip.tracking import spectral_norms


def test_ground_truth_of_a_model_measures_the_transposed_conv_as_called():
    net = unet(2)
    layers = spectral_norms(net, torch.zeros(1, 1, 8, 8))["layers"]
    assert layers["up"] == pytest.approx(sigma_as_called(net.up, (4, 4, 4), output_size=(8, 8)), rel=1e-9)
    assert layers["up"] != pytest.approx(sigma_as_called(net.up, (4, 4, 4)), rel=1e-3)
