"""Which modules are tracked and clipped (``selection.py``): name globs select layers (not activations), a pattern
that matches nothing lists the names, and a pattern shadowed by an earlier one is said.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import Classifier, loader, small_cnn, trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_specclip import (
    SpectralClipCallback,
    SpectralClipper,
)


# ---------------------------------------------------------------- 12. globs pick layers
def test_name_globs_select_layers_not_activations():
    torch.manual_seed(0)
    callback = SpectralClipCallback(1.0, modules=["net.*"], every_n_steps=1, warmup_iters=10)
    trainer(max_steps=1, callbacks=[callback]).fit(Classifier(small_cnn()), loader(n=8))
    assert [t.name for t in callback.maps] == ["net.0", "net.3", "net.7"]
    callback = SpectralClipCallback(1.0, modules=[nn.ReLU], every_n_steps=1, warmup_iters=10)
    with pytest.raises(MisconfigurationException, match=r"net\.2 \(ReLU\).*not a linear map"):
        trainer(max_steps=1, callbacks=[callback]).fit(Classifier(small_cnn()), loader(n=8))


def test_pattern_matching_nothing_lists_names():
    callback = SpectralClipCallback(1.0, modules=["encoder.*"])
    with pytest.raises(MisconfigurationException, match="matches no module.*available names: net, net.0, net.1"):
        trainer(max_steps=1, callbacks=[callback]).fit(Classifier(small_cnn()), loader())
    per_layer = SpectralClipCallback({"decoder*": 1.0})
    with pytest.raises(MisconfigurationException, match="matches no selected layer"):
        trainer(max_steps=1, callbacks=[per_layer]).fit(Classifier(small_cnn()), loader())


def test_a_target_pattern_shadowed_by_an_earlier_one_is_said():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.warns(UserWarning, match=r"target pattern '0' sets no layer's target.*earlier pattern \('\*'\)"):
        clipper = SpectralClipper(net, {"*": 1.0, "0": 0.5})
    assert [clipper.target_of(m) for m in clipper.map_set.layers] == [1.0, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SpectralClipper(net, {"0": 0.5, "*": 1.0})  # specific first: no warning
