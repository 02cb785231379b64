"""A compiled model (``torch.compile`` inserts ``_orig_mod`` into every name) is selected, clipped and logged under
the names of the eager model."""

from __future__ import annotations

import pytest
import torch
from test_callback import Classifier, loader, scaled, small_cnn, trainer
from test_trust_callback import true_sigma

from lightning_specclip import SpectralClipCallback
from lightning_specclip.targets import find_conv_bn_pairs, select_modules


def test_compiled_model_has_the_eager_names():
    net = small_cnn()
    compiled = torch.compile(net)
    assert [n for n, _ in select_modules(compiled)] == [n for n, _ in select_modules(net)] == ["0", "3", "7"]
    assert [n for n, _ in select_modules(compiled, ["3*"])] == ["3"]
    with pytest.warns(UserWarning, match="could not trace"):  # fx cannot trace a compiled module: module order
        assert find_conv_bn_pairs(torch.nn.Sequential(compiled)) == [("0.0", "0.1"), ("0.3", "0.4")]


def test_callback_clips_a_compiled_model_by_its_eager_names():
    torch.manual_seed(0)
    net = scaled(small_cnn(), 3.0)
    callback = SpectralClipCallback({"net.3": 0.5, "net.0": 1.0}, modules=["net.0", "net.3"], every_n_steps=2)
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(torch.compile(net, backend="eager")), loader(n=16))
    assert [t.name for t in callback.maps] == ["net.0", "net.3"]
    assert true_sigma(net[0], (1, 8, 8)) <= 1.0 * 1.02
    assert true_sigma(net[3], (4, 8, 8)) <= 0.5 * 1.02
