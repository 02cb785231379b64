"""The README's "Use it without Lightning" snippets run as written, and do what they say (float64 ground truth)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_specclip.spectral.exact import dense_singular_values

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets(section: str) -> list[str]:
    """The ```python blocks of one ``## `` section of the README, in order."""
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def layer_norms(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """Every Linear's and Conv2d's σ₁ by a dense float64 SVD (the convs at ``input_shape``, the README's data)."""
    norms = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            norms[name] = float(dense_singular_values(m, (m.in_features,))[0])
        elif isinstance(m, nn.Conv2d):
            norms[name] = float(dense_singular_values(m, input_shape)[0])
    return norms


def test_use_it_without_lightning(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plain, fabric, gan = snippets("Use it without Lightning")
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(plain, "README: plain loop", "exec"), namespace)
    norms = layer_norms(namespace["model"], (1, 8, 8))
    assert set(norms) == {"0", "3"} and max(norms.values()) <= 1.02, norms
    assert (tmp_path / "checkpoint.pt").exists()
    with torch.no_grad():  # let the Fabric loop start from weights above the target again
        for p in namespace["model"].parameters():
            p.mul_(3.0)
    exec(compile(fabric, "README: Fabric", "exec"), namespace)
    norms = layer_norms(namespace["model"], (1, 8, 8))
    assert set(norms) == {"_forward_module.0", "_forward_module.3"} and max(norms.values()) <= 1.02, norms
    exec(compile(gan, "README: GAN", "exec"), namespace)
    clip, module = namespace["clip"], namespace["trainer"].lightning_module
    assert {m.name for m in clip.maps} == {"discriminator.0", "discriminator.2"}
    assert clip.clipper.num_steps == 4  # 64 samples / 16: the discriminator's steps only
    assert max(layer_norms(module.discriminator, ()).values()) <= 1.02
