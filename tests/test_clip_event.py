"""One clip event (``clip_event.py``): an error in a clip names the layer it happened in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_specclip import (
    SpectralClipper,
)


def test_an_error_in_a_clip_names_the_layer(monkeypatch):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2))
    clipper = SpectralClipper(net, 0.01, every_n_steps=1, warmup_iters=20)
    net(torch.randn(2, 1, 8, 8))
    method = clipper.method
    original = method.clip_all_

    def failing(items):
        if any(m.name == "2" for m, *_ in items):
            raise RuntimeError("expected scalar type Float but found BFloat16")
        return original(items)

    monkeypatch.setattr(method, "clip_all_", failing)
    with pytest.raises(
        RuntimeError, match=r"clipping 2 \(Linear, input shape \(72,\)\) failed: RuntimeError: expected"
    ):
        clipper.step()
