"""The callback keeps its promise in the situations real training creates: the checkpoint at the end of fit, layers
run at several sizes, validation at another size, NaNs, resumes with another selection, several instances, a
second model, parametrized, frozen and weight-standardized layers, fits that die early.

Every bound is checked with an independent float64 ground truth on the weights (never the callback's numbers).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from test_callback import Classifier, loader, scaled, small_cnn, trainer
from torch import nn

from lightning_specclip import SpectralClipCallback
from lightning_specclip.spectral.exact import dense_singular_values


def true_sigma(module: nn.Module, shape: tuple[int, ...]) -> float:
    """σ₁ of x ↦ module(x) − module(0) in float64, by a dense SVD of a float64 copy."""
    copy = pickle.loads(pickle.dumps(module)).double()
    return float(dense_singular_values(copy, shape)[0])


def layer_sigmas(net: nn.Module, shape: tuple[int, ...] = (1, 8, 8)) -> dict[str, float]:
    """Ground-truth σ of every Conv2d/Linear of ``net`` at the input shapes one eval forward gives them."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module, args) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))

        return hook

    handles = [
        m.register_forward_pre_hook(record(n)) for n, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    training = net.training
    net.eval()
    with torch.no_grad():
        net(torch.zeros(1, *shape))
    net.train(training)
    for h in handles:
        h.remove()
    modules = dict(net.named_modules())
    return {n: true_sigma(modules[n], s) for n, s in shapes.items()}


def checkpoint_net(path: Path) -> nn.Sequential:
    net = small_cnn()
    state = torch.load(path, weights_only=False)["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    return net


# ---------------------------------------------------------------- 2. the checkpoint written at the end of fit
@pytest.mark.parametrize("stop", ["max_steps", "max_epochs"])
def test_last_checkpoint_holds_clipped_weights(tmp_path, stop):
    torch.manual_seed(0)
    net = scaled(small_cnn(), 3.0)
    callback = SpectralClipCallback(1.0, warmup_iters=30)  # every_n_steps=100: only the final clip runs
    limit = dict(max_steps=12) if stop == "max_steps" else dict(max_epochs=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[callback, checkpoint], enable_checkpointing=True, **limit).fit(
        Classifier(net), loader(n=32, batch_size=8)
    )
    saved = checkpoint_net(tmp_path / "last.ckpt")
    sigmas = layer_sigmas(saved)
    assert max(sigmas.values()) <= 1.02, sigmas
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][callback.state_key]
    assert state["maps"]["net.0"]["clips"] == 1


class ConstantLoss(Classifier):
    """Logs a loss that never improves, so EarlyStopping stops after its second check."""

    def training_step(self, batch, batch_idx):
        self.log("flat", 1.0, on_epoch=True, on_step=False)
        return super().training_step(batch, batch_idx)


def test_early_stopping_checkpoint_holds_clipped_weights(tmp_path):
    torch.manual_seed(0)
    net = scaled(small_cnn(), 3.0)
    callback = SpectralClipCallback(1.0, warmup_iters=30)
    # EarlyStopping after the clip callback: it asks to stop after the clip callback's hooks of that batch ran
    stopper = EarlyStopping("flat", patience=0, check_on_train_epoch_end=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(max_epochs=10, callbacks=[callback, stopper, checkpoint], enable_checkpointing=True)
    t.fit(ConstantLoss(net), loader(n=32, batch_size=8))
    assert t.global_step == 8  # stopped after two epochs
    sigmas = layer_sigmas(checkpoint_net(tmp_path / "last.ckpt"))
    assert max(sigmas.values()) <= 1.02, sigmas


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
    assert true_sigma(net.conv, (1, 8, 8)) <= 1.02
    assert true_sigma(net.conv, (1, 16, 16)) <= 1.02
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
    assert true_sigma(net[0], (1, 8, 8)) <= 1.02
    assert true_sigma(net[0], (1, 12, 12)) <= 1.02


@pytest.mark.parametrize(
    ("shapes", "match"),
    [({"net.0": (0, 8, 8)}, "input_shapes"), ({"net.0": "big"}, "input_shapes"), ({"nope*": (1, 8, 8)}, "nope")],
)
def test_bad_input_shapes_are_refused(shapes, match):
    with pytest.raises(MisconfigurationException, match=match):
        callback = SpectralClipCallback(1.0, input_shapes=shapes)
        trainer(max_steps=1, callbacks=[callback]).fit(Classifier(small_cnn()), loader(n=8))


# ---------------------------------------------------------------- 5. a transient NaN
def test_transient_nan_is_dropped_and_never_checkpointed(tmp_path):
    torch.manual_seed(0)
    net = scaled(small_cnn(), 3.0)
    saved: dict[str, torch.Tensor] = {}

    class NaNForAStep(pl.Callback):
        """NaN in a conv after step 2 (seen by the per-step update), repaired before the next forward."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                saved["w"] = net[3].weight.detach().clone()
                with torch.no_grad():
                    net[3].weight[0, 0, 0, 0] = float("nan")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "w" in saved:
                with torch.no_grad():
                    net[3].weight.copy_(saved.pop("w"))

    callback = SpectralClipCallback(1.0, every_n_steps=4, warmup_iters=30)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer(max_steps=4, callbacks=[NaNForAStep(), callback, checkpoint], enable_checkpointing=True).fit(
        Classifier(net), loader(n=32)
    )
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert true_sigma(net[3], (4, 8, 8)) <= 1.02
    for path in tmp_path.glob("*.ckpt"):  # the one at step 3 was written while the tracked vector was NaN
        state = torch.load(path, weights_only=False)["callbacks"][callback.state_key]
        for name, s in state["maps"].items():
            for key in ("right", "values"):
                assert s[key] is None or torch.isfinite(s[key]).all(), (path.name, name, key)


# ---------------------------------------------------------------- 6. one input feature
def test_linear_with_one_input_feature():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 10))
    with torch.no_grad():
        net[0].weight.mul_(10.0)
    callback = SpectralClipCallback(1.0, every_n_steps=1, warmup_iters=10)
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(net), loader((1,), n=16))
    assert float(net[0].weight.double().norm()) <= 1.02  # σ of a one-column matrix: the column's norm


# ---------------------------------------------------------------- 7, 8. resumes with another selection, two instances
def _fit(root: Path, callbacks: list, steps: int, ckpt: str | None = None, factor: float = 3.0):
    pl.seed_everything(0)
    model = Classifier(scaled(small_cnn(), factor))
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
    t = trainer(max_steps=steps, callbacks=[*callbacks, checkpoint], enable_checkpointing=True)
    t.fit(model, loader(n=32), ckpt_path=ckpt)
    return model, t


def test_resume_with_another_selection_merges_by_target(tmp_path):
    convs = SpectralClipCallback(1.0, modules=[nn.Conv2d], every_n_steps=2, warmup_iters=20)
    _fit(tmp_path / "a", [convs], steps=4)
    widened = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=20)  # the default selection adds net.7
    _fit(tmp_path / "b", [widened], steps=6, ckpt=str(tmp_path / "a" / "last.ckpt"))
    assert widened.clipper.clips["net.0"] >= convs.clipper.clips["net.0"] > 0  # carried over
    assert widened.clipper.clips["net.7"] == 1  # new: started fresh

    everything = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=20)
    _fit(tmp_path / "c", [everything], steps=2, factor=30.0)
    narrowed = SpectralClipCallback(1.0, modules=[nn.Conv2d], every_n_steps=100, warmup_iters=20)
    _, t = _fit(tmp_path / "d", [narrowed], steps=3, ckpt=str(tmp_path / "c" / "last.ckpt"), factor=30.0)
    assert set(narrowed.sigmas) == {"net.0", "net.3"}
    assert set(narrowed.clipper.clips) == {"net.0", "net.3"}  # the dropped layer's state is gone
    assert float(t.progress_bar_metrics["spectral/max_sigma"]) == pytest.approx(max(narrowed.sigmas.values()))


def test_two_instances_side_by_side_each_restore_their_own_state(tmp_path):
    first = SpectralClipCallback(0.5, modules=["net.0"], every_n_steps=1, warmup_iters=20)
    second = SpectralClipCallback(2.0, modules=["net.3"], every_n_steps=2, warmup_iters=20)
    assert first.state_key != second.state_key
    _fit(tmp_path / "a", [first, second], steps=4)
    state = torch.load(tmp_path / "a" / "last.ckpt", weights_only=False)["callbacks"]
    assert set(state[first.state_key]["maps"]) == {"net.0"}
    assert set(state[second.state_key]["maps"]) == {"net.3"}
    again = [
        SpectralClipCallback(0.5, modules=["net.0"], every_n_steps=1, warmup_iters=20),
        SpectralClipCallback(2.0, modules=["net.3"], every_n_steps=2, warmup_iters=20),
    ]
    model, _ = _fit(tmp_path / "b", again, steps=6, ckpt=str(tmp_path / "a" / "last.ckpt"))
    assert again[0].clipper.clips["net.0"] >= first.clipper.clips["net.0"] > 0  # restored, then counted on
    assert true_sigma(model.net[0], (1, 8, 8)) <= 0.5 * 1.02
    assert true_sigma(model.net[3], (4, 8, 8)) <= 2.0 * 1.02


# ---------------------------------------------------------------- 9. one instance, two models
def test_reused_on_a_second_model_tracks_the_second():
    callback = SpectralClipCallback(1.0, method="none", every_n_steps=1, warmup_iters=50)
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(small_cnn(), lr=0.0), loader(n=16))
    second = scaled(small_cnn(), 7.0)
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(second, lr=0.0), loader(n=16))
    truth = {"net.0": true_sigma(second[0], (1, 8, 8)), "net.3": true_sigma(second[3], (4, 8, 8))}
    for name, sigma in truth.items():
        assert callback.sigmas[name] == pytest.approx(sigma, rel=5e-3), name


# ---------------------------------------------------------------- 10, 13, 14, 17. layers of every kind
def test_weight_norm_layers_are_clipped_through_the_parametrization():
    torch.manual_seed(0)
    net = scaled(small_cnn(), 3.0)
    net[0] = nn.utils.parametrizations.weight_norm(net[0])
    net[7] = nn.utils.parametrizations.weight_norm(net[7])
    net[3] = nn.utils.weight_norm(net[3])  # the legacy, hook-based one
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=30)
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(net), loader(n=16))
    with torch.no_grad():
        net(torch.zeros(1, 1, 8, 8))  # the legacy weight norm recomputes .weight in its forward pre-hook
    for i, shape in ((0, (1, 8, 8)), (3, (4, 8, 8))):
        conv = nn.Conv2d(net[i].in_channels, net[i].out_channels, 3, padding=1, stride=net[i].stride)
        conv.weight.data.copy_(net[i].weight.detach())
        assert true_sigma(conv, shape) <= 1.02, i
    assert float(torch.linalg.matrix_norm(net[7].weight.detach().double(), 2)) <= 1.02


def test_spectral_norm_parametrization_is_refused_in_setup():
    net = small_cnn()
    net[3] = nn.utils.parametrizations.spectral_norm(net[3])
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    callback = SpectralClipCallback(1.0, every_n_steps=1, warmup_iters=10)
    with pytest.raises(MisconfigurationException, match=r"net\.3.*exclude"):
        trainer(max_steps=1, callbacks=[callback]).fit(Classifier(net), loader(n=8))
    for name, b in net.named_buffers():
        assert torch.equal(b, buffers[name]), name  # the refusal changed nothing (spectral_norm's u, v)
    tracked = SpectralClipCallback(1.0, method="none", every_n_steps=1, warmup_iters=10)
    trainer(max_steps=1, callbacks=[tracked]).fit(Classifier(net), loader(n=8))  # tracking it is fine
    assert "net.3" in tracked.sigmas


def test_frozen_tiny_layer_with_a_bias_is_tracked_not_clipped():
    torch.manual_seed(0)
    net = scaled(small_cnn(), 3.0)
    with torch.no_grad():
        net[0].weight.mul_(1e-7)
        net[0].bias.fill_(0.06)
    for p in net[0].parameters():
        p.requires_grad_(False)
    big = scaled(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 20.0)
    for p in big.parameters():
        p.requires_grad_(False)
    frozen_weight = big[1].weight.detach().clone()
    model = nn.Sequential(net, nn.Identity())
    callback = SpectralClipCallback(1.0, every_n_steps=1, warmup_iters=20)
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(model), loader(n=16))
    assert callback.not_clipped["net.0.0"].startswith("frozen")
    assert "frozen" in callback.summary()
    assert true_sigma(net[3], (4, 8, 8)) <= 1.02  # the trainable layers are clipped

    frozen_head = nn.Sequential(big, nn.Identity())
    callback = SpectralClipCallback(1.0, every_n_steps=1, warmup_iters=20)

    class Trainable(Classifier):
        def __init__(self, net):
            super().__init__(net)
            self.extra = nn.Parameter(torch.zeros(10))

        def forward(self, x):
            return self.net(x) + self.extra

    trainer(max_steps=1, callbacks=[callback]).fit(Trainable(frozen_head), loader(n=16))
    assert torch.equal(big[1].weight, frozen_weight)  # frozen: not edited
    callback = SpectralClipCallback(1.0, every_n_steps=1, warmup_iters=20, clip_frozen=True)
    trainer(max_steps=1, callbacks=[callback]).fit(Trainable(frozen_head), loader(n=16))
    assert float(torch.linalg.matrix_norm(big[1].weight.double(), 2)) <= 1.02


class StandardizedConv(nn.Conv2d):
    """A weight-standardized convolution (as timm's StdConv2d): linear in its input, not in its weight."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_layer_not_linear_in_its_weight_is_tracked_and_reported():
    torch.manual_seed(0)
    net = small_cnn()
    net[3] = StandardizedConv(4, 4, 3, padding=1, stride=2)
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=20)
    with pytest.warns(UserWarning, match=r"not linear in its weight.*: net\.3$"):
        trainer(max_steps=4, callbacks=[callback]).fit(Classifier(scaled(net, 3.0)), loader(n=32))
    assert set(callback.not_clipped) == {"net.3"}
    # tracked only: measured to convergence at the end of fit, so the summary reports the true norm
    assert callback.sigmas["net.3"] == pytest.approx(true_sigma(net[3], (4, 8, 8)), rel=1e-3)
    assert true_sigma(net[0], (1, 8, 8)) <= 1.02


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


# ---------------------------------------------------------------- 12. globs pick layers
def test_name_globs_select_layers_not_activations():
    torch.manual_seed(0)
    callback = SpectralClipCallback(1.0, modules=["net.*"], every_n_steps=1, warmup_iters=10)
    trainer(max_steps=1, callbacks=[callback]).fit(Classifier(small_cnn()), loader(n=8))
    assert [t.name for t in callback.maps] == ["net.0", "net.3", "net.7"]
    callback = SpectralClipCallback(1.0, modules=[nn.ReLU], every_n_steps=1, warmup_iters=10)
    with pytest.raises(MisconfigurationException, match=r"net\.2 \(ReLU\).*not a linear map"):
        trainer(max_steps=1, callbacks=[callback]).fit(Classifier(small_cnn()), loader(n=8))


# ---------------------------------------------------------------- 15. clips that changed weights
def test_clips_count_only_clips_that_changed_the_weights():
    torch.manual_seed(0)
    net = scaled(small_cnn(), 3.0)
    with torch.no_grad():
        net[7].weight.mul_(0.01)  # far below the target: never edited
    head = net[7].weight.detach().clone()
    callback = SpectralClipCallback(1.0, every_n_steps=1, warmup_iters=20)
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(net, lr=0.0), loader(n=16))
    assert callback.clipper.clips["net.7"] == 0
    assert torch.equal(net[7].weight, head)
    assert callback.clipper.clips["net.0"] == 1  # clipped at step 1; at step 2 already at the target
    row = next(line for line in callback.summary().splitlines() if line.startswith("net.7"))
    assert row.split()[-1] == "0"  # the summary's clips column
