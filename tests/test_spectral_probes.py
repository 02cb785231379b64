"""The probes an operator runs before it is trusted (``spectral/probes.py``): tiny weights with an ordinary bias are
affine, rounding of the bias is allowed and a nonlinearity is not, and a layer not linear in its weight is refused
before anything is written (a subclass that is linear in it is clipped).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import snapshot, unchanged
from torch import Tensor, nn

from lightning_specclip.spectral.clip import NotLinearInWeightError, check_clippable, clip_spectral_norm_
from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.spectral.spectrum import spectrum
from lightning_specclip.tracking import ground_truth_sigma

TOL = 1e-2  # the relative tolerance these tests allow the library


def _tiny_conv(cls: type[nn.Conv2d] = nn.Conv2d) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = cls(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(1e-7 / ground_truth_sigma(conv, (3, 8, 8)))
        conv.bias.fill_(0.06)
    return conv


def test_tiny_weights_with_an_ordinary_bias_are_affine() -> None:
    shape = (3, 8, 8)
    conv = _tiny_conv()
    truth = ground_truth_sigma(conv, shape)
    assert truth == pytest.approx(1e-7, rel=1e-9)
    s = spectrum(conv, shape)
    assert s.sigma == pytest.approx(truth, rel=1e-4)
    snap = snapshot(conv)
    result = clip_spectral_norm_(conv, 1.0, shape)  # a frozen layer: nothing to clip
    assert unchanged(conv, snap) and not result.changed


class _OwnConv(nn.Conv2d):
    """A subclass: no closed form, so the probe runs on its raw outputs (where the bias dominates)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


def test_the_probe_allows_for_rounding_of_the_bias_but_not_for_a_nonlinearity() -> None:
    shape = (3, 8, 8)
    conv = _tiny_conv(_OwnConv)
    A = ImplicitLinear(conv, shape)  # the probe passes
    assert not A.closed_form
    s = spectrum(conv, shape)
    assert math.isfinite(s.sigma) and s.sigma < 1e-6  # float32 resolves 1e-7 under a 0.06 bias only roughly
    snap = snapshot(conv)
    result = clip_spectral_norm_(conv, 1.0, shape)
    assert unchanged(conv, snap) and not result.changed
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="not affine"):
        ImplicitLinear(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (4,))
    relu_tiny = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="not affine"):
        spectrum(relu_tiny, (4,))


class StdConv2d(nn.Conv2d):
    """Weight standardization per output channel, as timm's StdConv2d: linear in x, not in the weight."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (w - mean) / torch.sqrt(var + 1e-6), self.bias)


class StdLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        return nn.functional.linear(x, (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True), self.bias)


def test_layer_not_linear_in_its_weight_is_refused_before_writing() -> None:
    torch.manual_seed(0)
    shape = (3, 8, 8)
    conv = StdConv2d(3, 4, 3, padding=1)
    truth = ground_truth_sigma(conv, shape)
    assert spectrum(conv, shape).sigma == pytest.approx(truth, rel=1e-4)  # linear in x: spectrum is fine
    snap = snapshot(conv)
    with pytest.raises(NotLinearInWeightError, match=r"StdConv2d.*not linear in its weight.*track"):
        clip_spectral_norm_(conv, 0.1 * truth, shape)
    assert unchanged(conv, snap)
    check_clippable(conv)  # without an input shape the probe cannot run
    with pytest.raises(NotLinearInWeightError, match="StdConv2d"):
        check_clippable(conv, shape)
    assert unchanged(conv, snap)
    lin = StdLinear(5, 4)
    with pytest.raises(NotLinearInWeightError, match="StdLinear"):
        clip_spectral_norm_(lin, 0.01)
    assert issubclass(NotLinearInWeightError, ValueError)


def test_a_subclass_that_is_linear_in_its_weight_is_clipped() -> None:
    torch.manual_seed(0)
    shape = (3, 8, 8)
    conv = _OwnConv(3, 4, 3, padding=1)
    check_clippable(conv, shape)
    result = clip_spectral_norm_(conv, 0.3, shape)
    truth = ground_truth_sigma(conv, shape)
    assert truth <= 0.3 * (1 + TOL) and result.after == pytest.approx(truth, rel=1e-3) and result.changed
