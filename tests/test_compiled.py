"""A compiled model (``torch.compile`` inserts ``_orig_mod`` into every name) is selected, clipped and logged under
the names of the eager model; a second compiled model of one class is tracked and clipped like the first."""

from __future__ import annotations

import pytest
import torch
from helpers import Classifier, loader, scaled, small_cnn, trainer

from lightning_specclip import SpectralClipCallback, SpectralClipper
from lightning_specclip.targets import find_conv_bn_pairs, select_modules
from lightning_specclip.tracking import ground_truth_sigma


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
    assert ground_truth_sigma(net[0], (1, 8, 8)) <= 1.0 * 1.02
    assert ground_truth_sigma(net[3], (4, 8, 8)) <= 0.5 * 1.02


class Fold(torch.nn.Module):
    """One model class trained once per fold, as in cross-validation or a sweep run in one process."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(64, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def fold_sigmas(net: Fold) -> list[float]:
    return [
        ground_truth_sigma(net.conv1, (1, 8, 8)),
        ground_truth_sigma(net.conv2, (4, 8, 8)),
        ground_truth_sigma(net.fc, (64,)),
    ]


@pytest.mark.parametrize("fullgraph", [False, True])
def test_two_compiled_models_of_one_class_trained_one_after_the_other(fullgraph):
    for fold in range(2):
        torch.manual_seed(fold)
        net = Fold()
        model = torch.compile(net, backend="eager", fullgraph=fullgraph)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        clipper = SpectralClipper(model, 1.0, optimizer=opt, every_n_steps=2, warmup_iters=30)
        for _ in range(4):
            torch.nn.functional.cross_entropy(
                model(torch.rand(4, 1, 8, 8)), torch.zeros(4, dtype=torch.long)
            ).backward()
            opt.step()
            opt.zero_grad()
        assert max(fold_sigmas(net)) <= 1.0 * 1.01, f"fold {fold}"
        assert sorted(clipper.sigmas) == ["conv1", "conv2", "fc"] and not clipper.not_clipped


def test_two_compiled_models_of_one_class_in_trainers_one_after_the_other():
    for fold in range(2):
        torch.manual_seed(fold)
        net = Fold()
        callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=30)
        trainer(max_steps=4, callbacks=[callback]).fit(Classifier(torch.compile(net, backend="eager")), loader(n=16))
        assert max(fold_sigmas(net)) <= 1.0 * 1.01, f"fold {fold}"
        assert [m.name for m in callback.maps] == ["net.conv1", "net.conv2", "net.fc"]


def test_a_layer_that_ran_without_its_shape_recorded_is_said(monkeypatch):
    net = Fold()
    clipper = SpectralClipper(net, 1.0)
    clipper.map_set.recorder.remove()  # as if compiled code had skipped the recording hooks
    net(torch.rand(2, 1, 8, 8)).sum().backward()
    with pytest.warns(UserWarning, match=r"ran in training but its input shape was not recorded.*conv1, conv2"):
        clipper.step()
    assert "not recorded" in clipper.not_clipped["conv1"] and [m.name for m in clipper.maps] == ["fc"]
