"""How the selected layers run in training (``recorder.py``): input shapes recorded from training forwards (not the
sanity check), a layer run at several sizes bounded at each, named and bad input shapes, transposed convolutions
called with ``output_size=``, and the hooks taken away when a fit dies.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import Classifier, loader, scaled, small_cnn, trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_specclip import (
    SpectralClipCallback,
)
from lightning_specclip.targets import InputShapeRecorder
from lightning_specclip.tracking import ground_truth_sigma


# ---------------------------------------------------------------- 3, 4. input shapes
class MultiScale(nn.Module):
    """One conv run on the image and on its 2× upsampling (multi-scale features); a conv used only in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.eval_only = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        up = F.interpolate(x, scale_factor=2.0)
        a, b = self.conv(x).mean((2, 3)), self.conv(up).mean((2, 3))
        if not self.training:
            a = a + self.eval_only(x).mean((2, 3))
        return self.head(torch.cat([a, b], 1))


def test_layer_run_at_two_sizes_is_bounded_at_both():
    torch.manual_seed(0)
    net = scaled(MultiScale(), 4.0)
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=30)
    with pytest.warns(UserWarning, match="eval_only"):
        trainer(max_steps=4, callbacks=[callback]).fit(Classifier(net), loader(n=32))
    names = {t.name: t.input_shape for t in callback.maps}
    assert names == {"net.conv": (1, 8, 8), "net.conv@1x16x16": (1, 16, 16), "net.head": (8,)}
    assert ground_truth_sigma(net.conv, (1, 8, 8)) <= 1.02
    assert ground_truth_sigma(net.conv, (1, 16, 16)) <= 1.02
    assert float(torch.linalg.matrix_norm(net.head.weight.double(), 2)) <= 1.02


def test_shapes_come_from_training_not_sanity_check_validation():
    """Training at 8×8, validation at 16×16 (the sanity check runs first): the conv is bounded at 8×8, and the
    layer used only in validation is left alone."""
    torch.manual_seed(0)
    net = scaled(small_cnn(), 3.0)

    class ValAtDoubleSize(Classifier):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(F.interpolate(x, scale_factor=2.0)), y)

    wide = nn.Sequential(*list(net[:6]), nn.AdaptiveAvgPool2d(4), *list(net[6:]))
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=30)
    t = trainer(max_steps=2, callbacks=[callback], num_sanity_val_steps=1, limit_val_batches=1)
    t.fit(ValAtDoubleSize(wide), loader(n=16), val_dataloaders=loader(n=8))
    shapes = {t.name: t.input_shape for t in callback.maps}
    assert shapes["net.0"] == (1, 8, 8)

    class Validated(Classifier):
        def validation_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

    eval_only = scaled(MultiScale(), 4.0)
    callback = SpectralClipCallback(1.0, every_n_steps=1, warmup_iters=10)
    before = eval_only.eval_only.weight.detach().clone()
    with pytest.warns(UserWarning, match="neither tracked nor clipped, never ran in training before the first step"):
        trainer(max_steps=2, callbacks=[callback], num_sanity_val_steps=1, limit_val_batches=1).fit(
            Validated(eval_only), loader(n=16), val_dataloaders=loader(n=8)
        )
    assert "net.eval_only" not in {t.name for t in callback.maps}
    assert torch.equal(eval_only.eval_only.weight, before)  # never clipped


def test_named_input_shapes_are_bounded_too():
    torch.manual_seed(0)
    net = scaled(small_cnn(), 3.0)
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=30, input_shapes={"net.0": [(1, 12, 12)]})
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(net), loader(n=16))
    assert "net.0@1x12x12" in {t.name for t in callback.maps}
    assert ground_truth_sigma(net[0], (1, 8, 8)) <= 1.02
    assert ground_truth_sigma(net[0], (1, 12, 12)) <= 1.02


@pytest.mark.parametrize(
    ("shapes", "match"),
    [({"net.0": (0, 8, 8)}, "input_shapes"), ({"net.0": "big"}, "input_shapes"), ({"nope*": (1, 8, 8)}, "nope")],
)
def test_bad_input_shapes_are_refused(shapes, match):
    with pytest.raises(MisconfigurationException, match=match):
        callback = SpectralClipCallback(1.0, input_shapes=shapes)
        trainer(max_steps=1, callbacks=[callback]).fit(Classifier(small_cnn()), loader(n=8))


# ---------------------------------------------------------------- 11. hooks never leak
def test_shape_hooks_removed_when_fit_dies_in_the_first_batch():
    net = small_cnn()

    class Dies(Classifier):
        def training_step(self, batch, batch_idx):
            self(batch[0])
            raise RuntimeError("out of memory, say")

    with pytest.raises(RuntimeError, match="out of memory"):
        trainer(max_steps=2, callbacks=[SpectralClipCallback(1.0)]).fit(Dies(net), loader(n=8))
    assert all(not m._forward_pre_hooks for m in net.modules())
    pickle.dumps(net)
    trainer(max_steps=2, limit_train_batches=0, callbacks=[SpectralClipCallback(1.0)]).fit(Classifier(net), loader(n=8))
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_recorder_reads_output_size_given_positionally_and_with_batch_and_channels():
    up = nn.ConvTranspose2d(3, 2, 3, stride=2)
    with InputShapeRecorder([("up", up)]) as recorder:
        up(torch.zeros(1, 3, 4, 4), (10, 10))
        up(torch.zeros(1, 3, 4, 4), output_size=torch.Size([1, 2, 9, 10]))
        up(torch.zeros(1, 3, 4, 4), output_size=(9, 9))  # the size without output_size: the plain map
    assert recorder.all_calls["up"] == [
        ((3, 4, 4), (("output_padding", (1, 1)),)),
        ((3, 4, 4), (("output_padding", (0, 1)),)),
        ((3, 4, 4), ()),
    ]
