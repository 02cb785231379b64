"""Checkpoints written by an earlier version resume exactly: the fixtures in ``tests/fixtures/resume_v0`` were made
by ``tests/resume_fixture.py`` with main at 91ee9e1 (before the clipper and the clip module were split into rooms);
resumed here, the run ends with the same weights and the same clipper state, bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from resume_fixture import fit, network, plain_clipper, plain_optimizer, plain_steps

FIXTURES = Path(__file__).parent / "fixtures" / "resume_v0"


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts, lists and tensors equal bit for bit (same keys, dtypes and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_a_lightning_checkpoint_of_the_earlier_version_resumes_bit_identically(tmp_path):
    ckpt = tmp_path / "lightning_step4.ckpt"
    shutil.copy(FIXTURES / "lightning_step4.ckpt", ckpt)
    model, callback = fit(tmp_path / "resume", ckpt=str(ckpt))
    expected = torch.load(FIXTURES / "lightning_step8.pt", weights_only=False)
    assert_same(model.state_dict(), expected["model"], "model")
    assert_same(callback.state_dict(), expected["callback"], "callback")


def test_a_clipper_state_dict_of_the_earlier_version_resumes_bit_identically():
    saved = torch.load(FIXTURES / "clipper_step3.pt", weights_only=False)
    net = network()
    net.load_state_dict(saved["model"])
    opt, clipper = plain_optimizer(net), plain_clipper(net)
    opt.load_state_dict(saved["optimizer"])
    clipper.load_state_dict(saved["clipper"])
    plain_steps(net, opt, clipper, 3, 3)
    expected = torch.load(FIXTURES / "clipper_step6.pt", weights_only=False)
    assert_same(net.state_dict(), expected["model"], "model")
    assert_same(clipper.state_dict(), expected["clipper"], "clipper")
