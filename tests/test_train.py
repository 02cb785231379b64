"""Hydra experiments end to end: every config composes and instantiates; train.py runs and resumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
sys.path.insert(0, str(ROOT / "experiments"))

import train  # noqa: E402

CLIP_METHODS = ["fastclip", "gouk", "miyato", "senderovich", "gram", "none"]
FAST = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1"]
FAST += ["+trainer.limit_test_batches=2", "+trainer.enable_progress_bar=false", "logger=[]"]
FAST += ["clip.every_n_steps=2", "clip.warmup_iters=20", "history_every_n_steps=1", "module.attack_batches=1"]


def _compose(overrides: list[str], output_dir: Path, keep_hydra: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.work_dir = str(ROOT)
        if not keep_hydra:  # what @hydra.main hands the task: no hydra node
            del cfg["hydra"]
    return cfg


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("clip", _group_options("clip"))
@pytest.mark.parametrize("bn", _group_options("bn"))
def test_clip_and_bn_configs_instantiate(clip, bn, tmp_path):
    cfg = _compose([f"clip={clip}", f"bn={bn}"], tmp_path)
    if bn == "composed" and clip not in ("fastclip", "none"):
        with pytest.raises(Exception, match="cannot clip conv∘BatchNorm compositions"):
            instantiate(cfg.clip)
        return
    callback = instantiate(cfg.clip)
    assert callback.options["method"].name == clip
    assert callback.options["compose_batchnorm"] == (bn == "composed")
    assert callback.options["clip_batchnorm"] == (bn == "clipped")
    assert instantiate(cfg.model).training


@pytest.mark.parametrize("experiment", _group_options("experiment"))
def test_experiment_presets_compose_and_instantiate(experiment, tmp_path):
    cfg = _compose([f"experiment={experiment}"], tmp_path)
    model = instantiate(cfg.model)
    callback = instantiate(cfg.clip)
    assert callback.options["every_n_steps"] == cfg.clip.every_n_steps
    assert model(torch.rand(2, *cfg.data.image_shape)).shape == (2, cfg.data.num_classes)
    for name, attack_cfg in cfg.attack.items():
        assert instantiate(attack_cfg, model=model) is not None, name


@pytest.mark.parametrize("option", _group_options("certify"))
def test_certify_options_compose_and_instantiate(option, tmp_path):
    from lightning_specclip.lipschitz import lipschitz_bound

    cfg = _compose([f"certify={option}"], tmp_path)
    if option == "none":
        assert not cfg.certify  # an empty mapping: train.py skips the certification
        return
    assert instantiate(cfg.certify.bound).func is lipschitz_bound
    assert cfg.certify.eps[0] == 0 and list(cfg.certify.eps) == sorted(cfg.certify.eps)
    model = instantiate(cfg.model)
    attack = instantiate(cfg.certify.pgd_l2, model=model, eps=0.3, alpha=cfg.certify.relative_alpha * 0.3)
    assert type(attack).__name__ == "PGDL2" and attack.eps == 0.3 and attack.alpha == pytest.approx(0.075)


def test_hparams_search_composes(tmp_path):
    cfg = _compose(["hparams_search=clip_sweep"], tmp_path, keep_hydra=True)
    assert "fastclip" in cfg.hydra.sweeper.params.clip


def test_unknown_config_name_lists_options(tmp_path):
    with pytest.raises(Exception, match="fastclip"):
        _compose(["clip=magic"], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("clip", CLIP_METHODS)
def test_one_epoch_per_method_writes_complete_metrics(clip, tmp_path):
    cfg = _compose([*FAST, f"clip={clip}", "clip.target=1.0"], tmp_path)
    train.run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    keys = {"method", "target", "bn_mode", "test_acc", "robust_acc", "spectral_norm", "history", "epoch_time_s"}
    assert keys <= set(metrics) and "config" in metrics
    assert metrics["method"] == clip
    assert 0.0 <= metrics["test_acc"] <= 1.0
    assert set(metrics["robust_acc"]) == {"fgsm", "pgd"}
    assert all(0.0 <= v <= 1.0 for v in metrics["robust_acc"].values())
    assert set(metrics["spectral_norm"]) == {"net.conv", "net.fc"}
    assert metrics["epoch_time_s"] > 0
    if clip == "fastclip":
        assert all(s <= 1.0 * 1.02 for s in metrics["spectral_norm"].values())


def test_fastclip_with_batchnorm_composition_and_resume(tmp_path):
    overrides = [*FAST, "clip=fastclip", "bn=composed", "clip.target=0.8"]
    train.run(_compose(overrides, tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bn_mode"] == "bn_composed"
    assert metrics["spectral_norm_composition"]["net.conv+net.bn"] <= 0.8 * 1.02
    assert "net.conv+net.bn" in metrics["history"]["sigma"]
    # Relaunched in the same directory with more epochs: it resumes from last.ckpt (epoch 1 is not redone).
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    resumed = train.run(_compose([*overrides, "trainer.max_epochs=2"], tmp_path))
    assert resumed["history"]["step"][0] == 3  # the first recorded step is where the checkpoint left off


@pytest.mark.slow
def test_ddp_sim_two_processes(tmp_path):
    cfg = _compose([*FAST, "trainer=ddp_sim"], tmp_path)
    metrics = train.run(cfg)
    assert 0.0 <= metrics["test_acc"] <= 1.0
    assert all(s <= 1.02 for s in metrics["spectral_norm"].values())
    # the history was recorded in the worker processes and still reaches metrics.json
    assert metrics["history"]["step"] and set(metrics["history"]["sigma"]) >= set(metrics["spectral_norm"])


def test_callbacks_group_builds_the_trainers_callbacks(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_specclip import SpectralClipCallback
    from lightning_specclip.tracking import EpochTimer, SpectralHistory

    cfg = _compose(["clip=gouk", "clip.target=0.5"], tmp_path)
    callbacks = {name: instantiate(c) for name, c in cfg.callbacks.items()}
    kinds = {name: type(c) for name, c in callbacks.items()}
    assert kinds == {
        "spectral_history": SpectralHistory,
        "epoch_timer": EpochTimer,
        "model_checkpoint": ModelCheckpoint,
        "clip": SpectralClipCallback,
    }
    options = callbacks["clip"].options  # the clip/ group's choice
    assert options["method"].name == "gouk" and options["target"] == 0.5
    assert callbacks["model_checkpoint"].dirpath == str(tmp_path / "checkpoints")
    dropped = _compose(["~callbacks.epoch_timer"], tmp_path / "b")
    assert "epoch_timer" not in dropped.callbacks
    metrics = train.run(_compose([*FAST, "~callbacks.epoch_timer", "certify=none"], tmp_path / "c"))
    assert metrics["epoch_time_s"] is None and metrics["history"]["step"]
    assert not {"lipschitz", "certified_acc", "pgd_l2_acc"} & set(metrics)  # certify=none: as before the group


def test_certify_writes_bound_certified_and_pgd_l2_accuracy(tmp_path):
    # the same two test batches as test_acc, so the certified accuracy at ε = 0 is the clean accuracy
    radii = ["0", "0.05", "0.1", "0.2", "0.5"]
    overrides = [*FAST, "bn=composed", f"certify.eps=[{','.join(radii)}]", "certify.batches=2"]
    cfg = _compose(overrides, tmp_path)
    assert cfg.certify.pgd_l2._target_ == "torchattacks.PGDL2"  # conf/attack/pgd_l2.yaml, reused
    train.run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    bound, certified, attacked = metrics["lipschitz"], metrics["certified_acc"], metrics["pgd_l2_acc"]
    assert 0 < bound["lower"] <= bound["upper"] < 1e3
    assert list(certified) == list(attacked) == radii
    assert certified["0"] == attacked["0"] == pytest.approx(metrics["test_acc"], abs=1e-6)
    values = list(certified.values())
    assert all(0.0 <= b <= a <= 1.0 for a, b in zip(values, values[1:], strict=False))  # non-increasing in ε
    assert all(certified[r] <= attacked[r] + 1e-6 for r in radii)  # certified ≤ empirical, at every radius
    assert attacked["0.5"] < attacked["0"]  # the attack does something


def test_certify_reports_a_model_the_bound_cannot_take_and_keeps_going(tmp_path):
    class Gated(torch.nn.Module):  # x·sigmoid(conv(x)): a product of two input-dependent values
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc((x * torch.sigmoid(self.conv(x))).flatten(1))

    cfg = _compose(FAST, tmp_path).certify
    loader = [(torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))]
    result = train._certify(cfg, Gated(), loader, torch.device("cpu"))
    assert result["lipschitz"] is None and "certified_acc" not in result
    assert "node 'mul'" in result["lipschitz_error"]


@pytest.mark.slow
def test_resnet18_digits_preset_composes_as_typed_and_trains_one_short_epoch(tmp_path):
    typed = ["experiment=resnet18_digits", "clip=gouk", "clip.target=0.5", "seed=3"]
    cfg = _compose(typed, tmp_path / "typed")
    assert (cfg.clip.method, cfg.clip.target, cfg.seed) == ("gouk", 0.5, 3)  # the method, target and seed stay free
    assert (cfg.model.width, cfg.data.image_size, list(cfg.data.image_shape)) == (8, 32, [1, 32, 32])
    fast = ["+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]
    fast += ["trainer.max_epochs=1", "+trainer.enable_progress_bar=false", "logger=[]", "clip.every_n_steps=2"]
    fast += ["certify=none", "~callbacks.spectral_history", "module.attack_batches=1"]
    metrics = train.run(_compose(["experiment=resnet18_digits", *fast], tmp_path / "run"))
    assert metrics["model"] == "ResNet18" and metrics["bn_mode"] == "bn"
    assert len(metrics["spectral_norm"]) == 21  # 20 convs and the classifier, by float64 ground truth
    assert max(metrics["spectral_norm"].values()) <= 1.0 * 1.02  # FastClip at 1, after the last step's clip
