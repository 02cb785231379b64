"""Attention: every Linear, each ``MultiheadAttention``'s ``out_proj`` and its q, k, v projections (rows of the
packed ``in_proj_weight``, or the separate weights) are tracked and clipped; checked in float64 on the weights."""

from __future__ import annotations

import pytest
import torch
from helpers import Classifier, loader, trainer, weight_sigma
from torch import nn

from lightning_specclip import SpectralClipCallback
from lightning_specclip.targets import attention_projection


def projections(attention: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
    if attention._qkv_same_embed_dim:
        return dict(zip(("q", "k", "v"), attention.in_proj_weight.detach().chunk(3), strict=True))
    return {w: getattr(attention, f"{w}_proj_weight").detach() for w in "qkv"}


def test_vision_transformer_every_map_clipped():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )
    with torch.no_grad():
        for p in vit.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)  # every map well above the target, so that each one has to be clipped
    vit.conv_proj = nn.Conv2d(1, 16, 4, stride=4)  # one input channel: the digits-like loader
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=30)
    trainer(max_steps=4, callbacks=[callback]).fit(Classifier(vit, lr=0.01), loader((1, 8, 8), n=32))
    attentions = [m for m in vit.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attentions) == 2
    names = {t.name for t in callback.maps}
    assert "net.encoder.layers.encoder_layer_0.self_attention.q_proj" in names
    assert "net.encoder.layers.encoder_layer_1.self_attention.out_proj" in names
    for attention in attentions:
        for which, weight in projections(attention).items():
            assert weight_sigma(weight) <= 1.02, which
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):  # the MLPs, the head and every out_proj
            assert weight_sigma(m.weight) <= 1.02, name


def test_separate_key_and_value_weights():
    torch.manual_seed(0)

    class CrossAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True)
            self.keys = nn.Linear(64, 12 * 4)
            self.values = nn.Linear(64, 12 * 6)
            self.queries = nn.Linear(64, 3 * 8)
            self.head = nn.Linear(24, 10)

        def forward(self, x):
            x = x.flatten(1)
            q, k, v = self.queries(x).view(-1, 3, 8), self.keys(x).view(-1, 12, 4), self.values(x).view(-1, 12, 6)
            return self.head(self.attn(q, k, v)[0].flatten(1))

    net = CrossAttention()
    with torch.no_grad():
        for w in (net.attn.q_proj_weight, net.attn.k_proj_weight, net.attn.v_proj_weight):
            w.mul_(5.0)
    callback = SpectralClipCallback(1.0, modules=["net.attn"], every_n_steps=2, warmup_iters=30)
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(net, lr=0.01), loader(n=16))
    assert [t.name for t in callback.maps] == [
        "net.attn.q_proj",
        "net.attn.k_proj",
        "net.attn.v_proj",
        "net.attn.out_proj",
    ]
    for which, weight in projections(net.attn).items():
        assert weight_sigma(weight) <= 1.02, which


def test_projection_view_writes_the_attention_weights():
    attention = nn.MultiheadAttention(4, 1)
    before = attention.in_proj_weight.detach().clone()
    v = attention_projection(attention, "v_proj")
    with torch.no_grad():
        v.weight.zero_()
    assert torch.equal(attention.in_proj_weight[8:], torch.zeros(4, 4))
    assert torch.equal(attention.in_proj_weight[:8], before[:8])
    with pytest.raises(ValueError, match="q_proj, k_proj, v_proj"):
        attention_projection(attention, "o_proj")
