"""SpectralClipCallback in real Trainers: clipping, compositions, DDP, resume, loggers, precision, bad input."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_specclip import SpectralClipCallback, SpectralClipper
from lightning_specclip.distributed import SpawnDDPStrategy
from lightning_specclip.spectral.exact import dense_singular_values, lanczos_singular_values


class Classifier(pl.LightningModule):
    """A LightningModule around any network, trained with plain SGD on cross-entropy."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def small_cnn(channels: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, stride=2),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 4 * 4, 10),
    )


def loader(shape=(1, 8, 8), n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=gen) * 4
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def scaled(net: nn.Module, factor: float) -> nn.Module:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.mul_(factor)
    return net


def weights_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, t in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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


def test_pattern_matching_nothing_lists_names():
    callback = SpectralClipCallback(1.0, modules=["encoder.*"])
    with pytest.raises(MisconfigurationException, match="matches no module.*available names: net, net.0, net.1"):
        trainer(max_steps=1, callbacks=[callback]).fit(Classifier(small_cnn()), loader())
    per_layer = SpectralClipCallback({"decoder*": 1.0})
    with pytest.raises(MisconfigurationException, match="matches no selected layer"):
        trainer(max_steps=1, callbacks=[per_layer]).fit(Classifier(small_cnn()), loader())


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
