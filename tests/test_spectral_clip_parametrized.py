"""Clipping through weight-norm parametrizations, new and legacy (``spectral/clip/parametrized.py``), refusing
spectral-norm ones, and restoring the originals when a write-through does not read back.
"""

from __future__ import annotations

import pytest
import torch
from helpers import snapshot, unchanged
from torch import nn
from torch.nn.utils import parametrizations

import lightning_specclip.spectral.clip as clip_module
from lightning_specclip.spectral.clip import check_clippable, clip_spectral_norm_, parametrized
from lightning_specclip.tracking import ground_truth_sigma

TOL = 1e-2  # the relative tolerance these tests allow the library


def _weight_norm_new(module: nn.Module) -> nn.Module:
    return parametrizations.weight_norm(module)


def _weight_norm_legacy(module: nn.Module) -> nn.Module:
    return torch.nn.utils.weight_norm(module)


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (6,)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("wrap", [_weight_norm_new, _weight_norm_legacy], ids=["parametrizations", "legacy"])
def test_clip_through_weight_norm(kind: str, wrap) -> None:
    factory, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = wrap(factory())
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(("original0", "weight_g")):
                p.mul_(3.0)  # σ well above the target
    params = {name: p for name, p in layer.named_parameters()}
    assert ground_truth_sigma(layer, shape) > 1.0
    result = clip_spectral_norm_(layer, 0.5, shape)
    truth = ground_truth_sigma(layer, shape)
    assert truth <= 0.5 * (1 + TOL) and truth == pytest.approx(0.5, rel=TOL)
    assert result.after == pytest.approx(truth, rel=1e-4) and result.changed
    assert {name: p for name, p in layer.named_parameters()} == params  # same Parameter objects (optimizers)
    assert all(a is b for a, b in zip(layer.parameters(), params.values(), strict=True))
    out = layer(torch.randn(2, *shape))  # the layer still runs
    assert torch.isfinite(out).all()
    # already clipped: nothing to do, bit for bit
    snap = snapshot(layer)
    result = clip_spectral_norm_(layer, 0.5, shape)
    assert unchanged(layer, snap) and not result.changed


@pytest.mark.parametrize("wrap", [_weight_norm_new, _weight_norm_legacy], ids=["parametrizations", "legacy"])
def test_clip_through_weight_norm_before_batchnorm(wrap) -> None:
    torch.manual_seed(0)
    conv = wrap(nn.Conv2d(3, 4, 3, padding=1))
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.5, 1.0, 2.0, 0.25]))
        bn.weight.copy_(torch.tensor([1.5, 0.5, 1.0, 2.0]))
    pair = nn.Sequential(conv, bn)
    shape = (3, 6, 6)
    bn_snap = snapshot(bn)
    result = clip_spectral_norm_(pair, 0.5, shape)
    truth = ground_truth_sigma(pair, shape)
    assert truth <= 0.5 * (1 + TOL) and result.after == pytest.approx(truth, rel=1e-4) and result.changed
    assert unchanged(bn, bn_snap)
    lin = wrap(nn.Linear(6, 5))
    bn1 = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn1.weight.fill_(3.0)
    result = clip_spectral_norm_((lin, bn1), 0.5)
    truth = ground_truth_sigma(nn.Sequential(lin, bn1), (6,))
    assert truth == pytest.approx(0.5, rel=1e-5) and result.after == pytest.approx(truth, rel=1e-6) and result.changed


SPECTRAL = {
    "parametrizations": (parametrizations.spectral_norm, "_SpectralNorm"),
    "legacy": (torch.nn.utils.spectral_norm, "SpectralNorm"),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("which", list(SPECTRAL))
def test_spectral_norm_parametrization_is_refused_and_nothing_moves(kind: str, which: str) -> None:
    factory, shape = LAYERS[kind]
    wrap, name = SPECTRAL[which]
    torch.manual_seed(0)
    layer = wrap(factory()).train()  # training mode: a forward would run the power iteration on _u/_v
    snap = snapshot(layer)
    with pytest.raises(ValueError, match=rf"{name}.*(remove|Remove).*track"):
        clip_spectral_norm_(layer, 0.1, shape)
    assert unchanged(layer, snap) and layer.training
    with pytest.raises(ValueError, match=name):
        check_clippable(layer)
    assert unchanged(layer, snap) and all(m.training for m in layer.modules())


def test_check_clippable_passes_weight_norm_and_plain_layers() -> None:
    assert "check_clippable" in clip_module.__all__ and "NotLinearInWeightError" in clip_module.__all__
    for layer in (nn.Linear(4, 3), _weight_norm_new(nn.Conv2d(2, 3, 3)), _weight_norm_legacy(nn.Linear(4, 3))):
        snap = snapshot(layer)
        check_clippable(layer)
        assert unchanged(layer, snap)
    check_clippable(_weight_norm_new(nn.Conv2d(2, 3, 3)), (2, 6, 6))
    check_clippable((_weight_norm_new(nn.Conv2d(2, 3, 3)), nn.BatchNorm2d(3)), (2, 6, 6))


@pytest.mark.parametrize("wrap", [_weight_norm_new, _weight_norm_legacy], ids=["parametrizations", "legacy"])
def test_write_back_that_does_not_read_back_restores_the_originals(monkeypatch, wrap) -> None:
    torch.manual_seed(0)
    layer = wrap(nn.Conv2d(3, 4, 3, padding=1))
    shape = (3, 6, 6)
    snap = snapshot(layer)
    before = ground_truth_sigma(layer, shape)
    monkeypatch.setattr(parametrized, "computed_weight", lambda layer: torch.zeros_like(layer.weight))
    with pytest.raises(RuntimeError, match="did not give it back"):
        clip_spectral_norm_(layer, 0.1 * before, shape)
    assert unchanged(layer, snap)
    assert ground_truth_sigma(layer, shape) == before
