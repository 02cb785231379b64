"""SpectralClipCallback in real Trainers: clipping, compositions, DDP, resume, loggers, precision, bad input, and the
situations real training creates — the checkpoint at the end of fit, NaNs, resumes with another selection, several
instances, a second model, parametrized, frozen and weight-standardized layers, a U-Net and a GAN under bf16-mixed.

Every bound is checked with an independent float64 ground truth on the weights (never the callback's numbers).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import Classifier, loader, scaled, sigma_as_called, small_cnn, trainer, unet, weights_hash
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_specclip import (
    SpectralClipCallback,
    SpectralClipper,
)
from lightning_specclip.distributed import SpawnDDPStrategy
from lightning_specclip.spectral.exact import dense_singular_values, lanczos_singular_values
from lightning_specclip.tracking import ground_truth_sigma


@pytest.mark.slow
def test_resnet18_layers_clipped_after_fit():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = scaled(torchvision.models.resnet18(num_classes=10), 2.0)
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=30)
    trainer(max_steps=3, callbacks=[callback]).fit(Classifier(net, lr=0.01), loader((3, 32, 32), n=24, batch_size=8))
    assert len(callback.maps) == 21  # 20 convolutions and the final Linear
    for target in callback.maps:
        sigma = lanczos_singular_values(target.module, target.input_shape, k=1, tol=1e-6, dtype=torch.float32)
        assert sigma.values[0] <= 1.02, target.name


def test_small_cnn_clipped_and_composition_clipped():
    torch.manual_seed(0)
    net = scaled(small_cnn(), 3.0)
    callback = SpectralClipCallback(0.8, every_n_steps=3, warmup_iters=30, compose_batchnorm=True)
    trainer(max_steps=4, callbacks=[callback]).fit(Classifier(net), loader())
    kinds = {t.name: t.kind for t in callback.maps}
    assert kinds == {
        "net.0": "layer",
        "net.3": "layer",
        "net.7": "layer",
        "net.0+net.1": "composition",
        "net.3+net.4": "composition",
    }
    for target in callback.maps:
        sigma = dense_singular_values(target.module, target.input_shape)[0]
        assert sigma <= 0.8 * 1.02, (target.name, float(sigma))
        # what the callback reports (summary, logs) is measured after the last clip, also for the conv that
        # the composition's clip moved afterwards
        assert callback.sigmas[target.name] == pytest.approx(float(sigma), rel=1e-3), target.name
    # The BatchNorm still rescales: the composition is what had to be clipped on its own.
    bn_gain = max(float((m.weight.abs() / (m.running_var + m.eps).sqrt()).max()) for m in (net[1], net[4]))
    assert bn_gain != pytest.approx(1.0)


def test_clip_batchnorm_bounds_each_gain():
    torch.manual_seed(0)
    net = small_cnn()
    with torch.no_grad():
        net[1].weight.fill_(5.0)
    callback = SpectralClipCallback(1.5, clip_batchnorm=True, every_n_steps=2, warmup_iters=10)
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(net), loader())
    for bn in (net[1], net[4]):
        gain = bn.weight.abs() / (bn.running_var + bn.eps).sqrt()
        assert gain.max() <= 1.5 * (1 + 1e-5)


def _record_steps(monkeypatch: pytest.MonkeyPatch, method: str) -> list[int]:
    """The clipper steps at which ``SpectralClipper.<method>`` runs, in every clipper of the test."""
    calls: list[int] = []
    original = getattr(SpectralClipper, method)

    def recorded(self: SpectralClipper, *args, **kwargs):
        calls.append(self.num_steps)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SpectralClipper, method, recorded)
    return calls


def test_acts_only_after_optimizer_steps_with_accumulation(monkeypatch):
    calls = _record_steps(monkeypatch, "track")
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=5)
    trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[callback]).fit(Classifier(small_cnn()), loader(n=64))
    assert calls == [1, 2, 3]  # after each of 3 optimizer steps (not 6 batches); step 3 is also the final clip
    assert set(callback.sigmas) == {m.name for m in callback.maps}


def test_track_every_n_steps_skips_updates(monkeypatch):
    calls = _record_steps(monkeypatch, "track")
    callback = SpectralClipCallback(
        1.0, every_n_steps=100, warmup_iters=5, track_every_n_steps=2, clip_on_train_end=False
    )
    trainer(max_steps=4, callbacks=[callback]).fit(Classifier(small_cnn()), loader())
    assert calls == [2, 4]


def test_no_second_clip_at_train_end_when_the_last_step_just_clipped(monkeypatch):
    steps = _record_steps(monkeypatch, "clip_event")

    def clip_steps(every_n_steps: int) -> list[int]:
        steps.clear()
        callback = SpectralClipCallback(1.0, every_n_steps=every_n_steps, warmup_iters=5)
        trainer(max_steps=4, callbacks=[callback]).fit(Classifier(scaled(small_cnn(), 3.0)), loader())
        return list(steps)

    assert clip_steps(2) == [2, 4]  # the end of training (step 4) adds none
    assert clip_steps(3) == [3, 4]  # step 3, and the last step


def test_models_nobody_here_wrote():
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    conv1d = nn.Sequential(
        nn.Conv1d(1, 4, 5, padding=2, padding_mode="circular"), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)
    )
    for net, shape in ((scaled(seq, 4.0), (64,)), (scaled(conv1d, 4.0), (1, 64))):
        callback = SpectralClipCallback(1.0, every_n_steps=1, warmup_iters=20)
        trainer(max_steps=2, callbacks=[callback]).fit(Classifier(net), loader(shape))
        for target in callback.maps:
            assert dense_singular_values(target.module, target.input_shape)[0] <= 1.0 * 1.01


def test_layer_never_called_is_skipped_with_warning():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(1, 2, 3)
            self.unused = nn.Conv2d(1, 2, 3)
            self.head = nn.Linear(72, 10)
            self.unused_head = nn.Linear(72, 10)

        def forward(self, x):
            return self.head(self.used(x).flatten(1))

    callback = SpectralClipCallback(1.0, every_n_steps=1, warmup_iters=5)
    with pytest.warns(UserWarning, match=r"never ran in training before the first step.*: net.unused$"):
        trainer(max_steps=1, callbacks=[callback]).fit(Classifier(Unused()), loader())
    # a conv's map depends on its input size, which only a forward tells; a Linear's does not
    assert [t.name for t in callback.maps] == ["net.used", "net.head", "net.unused_head"]


class Crash(pl.Callback):
    """Kill the run (an exception, as a preempted job would die) once it reaches a step."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at_step:
            raise RuntimeError("simulated crash")


def _fit_for_resume(root: Path, ckpt: str | None = None, crash_at: int | None = None):
    pl.seed_everything(0, workers=True)
    model = Classifier(scaled(small_cnn(), 3.0))
    callback = SpectralClipCallback(0.9, every_n_steps=3, warmup_iters=20, compose_batchnorm=True)
    callbacks: list[pl.Callback] = [callback, ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_train_steps=4)]
    if crash_at is not None:
        callbacks.append(Crash(crash_at))
    t = trainer(
        max_steps=8, accumulate_grad_batches=2, callbacks=callbacks, enable_checkpointing=True, default_root_dir=root
    )
    t.fit(model, loader(n=32, batch_size=4), ckpt_path=ckpt)
    return model, callback


def test_crash_and_resume_matches_uninterrupted_run(tmp_path):
    """8 steps of 2 accumulated batches, clip every 3 steps; the crash comes mid-epoch 2, after a clip.

    The checkpoint is written after an optimizer step (every_n_train_steps): Lightning 2.x resumes from a
    checkpoint written in on_train_epoch_end with one batch too many when gradients are accumulated.
    """
    reference, _ = _fit_for_resume(tmp_path / "ref")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_for_resume(tmp_path / "crash", crash_at=7)
    (ckpt,) = (tmp_path / "crash").glob("*.ckpt")  # the end of epoch 1 (step 4)
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 4
    assert state["callbacks"][SpectralClipCallback(0.9).state_key]["num_steps"] == 4
    resumed, callback = _fit_for_resume(tmp_path / "resume", ckpt=str(ckpt))
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert callback.clipper.clips["net.0"] == 3  # steps 3 and 6, and the end of training


def test_csv_and_tensorboard_loggers_receive_series(tmp_path):
    tensorboard = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=10, k=2, log_every_n_steps=1)
    trainer(max_steps=4, logger=[csv_logger, tb_logger], callbacks=[callback]).fit(
        Classifier(scaled(small_cnn(), 3.0)), loader()
    )
    csv_logger.finalize("success")
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    series = [float(r["spectral/net.0/sigma"]) for r in rows if r.get("spectral/net.0/sigma")]
    assert len(series) == 4 and all(s > 0 for s in series)
    assert any(r.get("spectral/net.0/sigma_2") for r in rows)
    events = tensorboard.EventAccumulator(tb_logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    assert "spectral/net.3/sigma" in events.Tags()["scalars"]
    assert len(events.Scalars("spectral/net.3/sigma")) == 4
    assert "spectral/sigma_per_layer" in events.Tags()["histograms"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_runs_write_no_nan(precision):
    net = scaled(small_cnn(), 3.0)
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=10, compose_batchnorm=True)
    trainer(max_steps=3, precision=precision, callbacks=[callback]).fit(Classifier(net), loader())
    for p in net.parameters():
        assert torch.isfinite(p).all()
    for target in callback.maps:
        sigma = dense_singular_values(target.module.float(), target.input_shape)[0]
        assert sigma <= 1.0 * 1.02, target.name


def test_non_finite_layer_is_skipped_never_made_worse():
    net = small_cnn()
    callback = SpectralClipCallback(1.0, every_n_steps=1, warmup_iters=5)

    class Poison(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step < 2:  # poison after the last optimizer step, so training itself stays finite
                return
            with torch.no_grad():
                net[7].weight[0, 0] = float("nan")

    with pytest.warns(UserWarning, match="non-finite"):
        trainer(max_steps=2, callbacks=[Poison(), callback]).fit(Classifier(net, lr=0.0), loader())
    assert torch.isfinite(net[0].weight).all()
    assert torch.isnan(net[7].weight).sum() == 1  # exactly the poisoned entry: nothing else written


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target=0.0), "target must be a positive"),
        (dict(target=-1.0), "target must be a positive"),
        (dict(target=float("nan")), "target must be a positive"),
        (dict(target={"conv*": float("inf")}), "target"),
        (dict(method="spectral_magic"), "allowed: fastclip"),
        (dict(every_n_steps=0), "every_n_steps must be an integer >= 1"),
        (dict(warmup_iters=0), "warmup_iters"),
        (dict(method="none", compose_batchnorm=False, k=0), "k must be"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        SpectralClipCallback(**kwargs)


def test_per_layer_targets():
    net = scaled(small_cnn(), 3.0)
    callback = SpectralClipCallback({"net.7": 0.5, "net.0": 2.0}, every_n_steps=1, warmup_iters=10)
    trainer(max_steps=1, callbacks=[callback]).fit(Classifier(net, lr=0.0), loader())
    sigma = {t.name: float(dense_singular_values(t.module, t.input_shape)[0]) for t in callback.maps}
    assert sigma["net.7"] == pytest.approx(0.5, rel=1e-3)
    assert sigma["net.0"] <= 2.0 * 1.01
    assert sigma["net.3"] > 1.0  # no pattern: tracked, not clipped


class HashOnEnd(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        Path(self.out, f"rank{trainer.global_rank}.txt").write_text(weights_hash(pl_module))


@pytest.mark.slow
def test_ddp_spawn_two_processes_identical_weights(tmp_path):
    net = scaled(small_cnn(), 3.0)
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=10, compose_batchnorm=True)
    t = trainer(
        max_steps=4,
        devices=2,
        strategy=SpawnDDPStrategy(),  # "ddp_spawn" that destroys its gloo group before interpreter shutdown
        callbacks=[callback, HashOnEnd(str(tmp_path))],
        deterministic=False,
    )
    os.environ.setdefault("MASTER_PORT", "29533")
    t.fit(Classifier(net), loader(n=64))
    hashes = [Path(tmp_path, f"rank{r}.txt").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]


def test_progress_bar_sigma_follows_the_logging_schedule_and_the_clips() -> None:
    """``spectral/max_sigma`` is logged at the first step, every ``log_every_n_steps`` and after each clip (a ``log``
    call costs about as much as the per-step update), and holds the σ of the last one."""
    logged: list[int] = []

    class Recording(Classifier):
        def log(self, name, value, *args, **kwargs):
            if name == "spectral/max_sigma":
                logged.append(self.trainer.global_step)
            return super().log(name, value, *args, **kwargs)

    torch.manual_seed(0)
    callback = SpectralClipCallback(1.0, every_n_steps=6, log_every_n_steps=4, warmup_iters=20)
    t = trainer(max_steps=11, callbacks=[callback])
    t.fit(Recording(scaled(small_cnn(), 5.0)), loader(n=96))
    assert logged == [1, 4, 6, 8, 11]  # first, schedule (4, 8), clips (6, and the last step's)
    assert float(t.progress_bar_metrics["spectral/max_sigma"]) == pytest.approx(max(callback.sigmas.values()))


def test_unet_in_a_trainer_reports_the_map_as_it_runs():
    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = unet(1)

        def training_step(self, batch, batch_idx):
            return self.net(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Module()
    callback = SpectralClipCallback(1.0, modules=["net.up"], every_n_steps=2, warmup_iters=30)
    trainer(max_steps=4, callbacks=[callback]).fit(module, DataLoader(torch.randn(16, 1, 8, 8), batch_size=4))
    as_run = sigma_as_called(module.net.up, (4, 4, 4), output_size=(8, 8))
    assert as_run <= 1.01
    assert callback.sigmas["net.up"] == pytest.approx(as_run, rel=5e-3)


class ConvDiscriminatorGAN(pl.LightningModule):
    """The README's GAN recipe with a convolutional discriminator."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(8, 64), nn.Unflatten(1, (1, 8, 8)))
        self.discriminator = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(64, 1),
        )
        with torch.no_grad():
            for p in self.discriminator.parameters():
                p.mul_(4)

    def training_step(self, batch, batch_idx):
        opt_d, opt_g = self.optimizers()
        fake = self.generator(torch.randn(len(batch), 8))
        d_loss = nn.functional.softplus(-self.discriminator(batch)).mean()
        d_loss = d_loss + nn.functional.softplus(self.discriminator(fake.detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = nn.functional.softplus(-self.discriminator(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.discriminator.parameters()), torch.optim.Adam(self.generator.parameters())]


def test_gan_recipe_with_a_conv_discriminator_under_bf16_mixed():
    torch.manual_seed(0)
    gan = ConvDiscriminatorGAN()
    callback = SpectralClipCallback(1.0, optimizer=0, modules=["discriminator"], every_n_steps=1, warmup_iters=30)
    trainer(max_steps=6, precision="bf16-mixed", callbacks=[callback]).fit(
        gan, DataLoader(torch.randn(12, 1, 8, 8), batch_size=4)
    )
    d = gan.discriminator
    sigmas = [sigma_as_called(d[0], (1, 8, 8)), sigma_as_called(d[2], (4, 8, 8)), sigma_as_called(d[5], (64,))]
    assert max(sigmas) <= 1.0 * 1.01
    assert [m.name for m in callback.maps] == ["discriminator.0", "discriminator.2", "discriminator.5"]


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
    return {n: ground_truth_sigma(modules[n], s) for n, s in shapes.items()}


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
    assert ground_truth_sigma(net[3], (4, 8, 8)) <= 1.02
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
    assert ground_truth_sigma(model.net[0], (1, 8, 8)) <= 0.5 * 1.02
    assert ground_truth_sigma(model.net[3], (4, 8, 8)) <= 2.0 * 1.02


# ---------------------------------------------------------------- 9. one instance, two models
def test_reused_on_a_second_model_tracks_the_second():
    callback = SpectralClipCallback(1.0, method="none", every_n_steps=1, warmup_iters=50)
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(small_cnn(), lr=0.0), loader(n=16))
    second = scaled(small_cnn(), 7.0)
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(second, lr=0.0), loader(n=16))
    truth = {"net.0": ground_truth_sigma(second[0], (1, 8, 8)), "net.3": ground_truth_sigma(second[3], (4, 8, 8))}
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
        assert ground_truth_sigma(conv, shape) <= 1.02, i
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
    assert ground_truth_sigma(net[3], (4, 8, 8)) <= 1.02  # the trainable layers are clipped

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
    assert callback.sigmas["net.3"] == pytest.approx(ground_truth_sigma(net[3], (4, 8, 8)), rel=1e-3)
    assert ground_truth_sigma(net[0], (1, 8, 8)) <= 1.02


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
