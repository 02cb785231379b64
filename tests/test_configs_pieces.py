"""Compose every option of the reusable config groups in ``conf/`` and instantiate it.

The primary config is ``tests/conf_test/pieces.yaml`` (one default per group); ``conf/`` is added to the
search path with a ``hydra.searchpath`` override, so these tests do not depend on ``conf/train.yaml``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchattacks
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import instantiate
from lightning.pytorch import LightningModule, Trainer
from omegaconf import DictConfig, OmegaConf

from lightning_specclip.attacks import ATTACK_DEFAULTS, RobustAccuracy
from lightning_specclip.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    MNISTDataModule,
    SyntheticDataModule,
)
from lightning_specclip.distributed import SpawnDDPStrategy
from lightning_specclip.models import DLA, Normalize, ResNet18, SimpleConv

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    """The option names of a config group, from the files in ``conf/<group>``."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def hydra_context() -> Iterator[None]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "tests" / "conf_test"), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def make_cfg(tmp_path: Path, *overrides: str, hydra_cfg: bool = False) -> DictConfig:
    return compose(
        "pieces",
        overrides=[
            f"hydra.searchpath=[file://{CONF}]",
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'out'}",
            f"paths.work_dir={tmp_path}",
            *overrides,
        ],
        return_hydra_config=hydra_cfg,
    )


def test_groups_have_the_expected_options() -> None:
    assert options("model") == ["dla", "resnet18", "simple_conv"]
    assert options("data") == ["cifar10", "digits", "mnist", "synthetic"]
    assert options("attack") == ["autoattack", "cw", "fgsm", "none", "pgd", "pgd_l2"]
    assert options("trainer") == ["cpu", "ddp", "ddp_sim", "default", "gpu"]
    assert options("logger") == ["csv", "mlflow", "tensorboard", "wandb"]
    assert options("paths") == ["default"]


MODEL_CASES = {
    "simple_conv": (SimpleConv, []),
    "resnet18": (ResNet18, ["model.width=4"]),
    "dla": (DLA, ["model.width=2"]),
}


@pytest.mark.parametrize("data", ["digits", "synthetic"])
@pytest.mark.parametrize("model", list(MODEL_CASES))
def test_model_configs_take_shapes_from_data(tmp_path: Path, model: str, data: str) -> None:
    cls, extra = MODEL_CASES[model]
    overrides = [f"model={model}", f"data={data}", *extra]
    if data == "synthetic":
        overrides += ["data.num_samples=40", "data.image_shape=[2,12,12]", "data.num_classes=3"]
    cfg = make_cfg(tmp_path, *overrides)
    net = instantiate(cfg.model)
    dm = instantiate(cfg.data)
    assert isinstance(net, cls)
    assert isinstance(net.normalize, Normalize) == (dm.mean is not None)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert net(x).shape == (x.shape[0], dm.num_classes)


def test_model_options_are_settable(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "model=resnet18", "model.width=4", "model.batchnorm=false")
    net = instantiate(cfg.model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    cfg = make_cfg(tmp_path, "model.padding_mode=circular", "model.batchnorm=true", "data.mean=null", "data.std=null")
    net = instantiate(cfg.model)
    assert net.conv.padding_mode == "circular" and isinstance(net.bn, torch.nn.BatchNorm2d)
    assert isinstance(net.normalize, torch.nn.Identity)


def test_data_digits_and_synthetic(tmp_path: Path) -> None:
    dm = instantiate(make_cfg(tmp_path, "data=digits").data)
    assert isinstance(dm, DigitsDataModule) and dm.image_shape == (1, 8, 8) and dm.mean == (0.3053,)
    dm = instantiate(make_cfg(tmp_path, "data=synthetic").data)
    assert isinstance(dm, SyntheticDataModule) and dm.image_shape == (3, 32, 32) and dm.mean is None


@pytest.mark.parametrize(
    ("name", "cls", "folder"),
    [("mnist", MNISTDataModule, "MNIST/raw"), ("cifar10", CIFAR10DataModule, "cifar-10-batches-py")],
)
def test_data_local_datasets_point_at_data_dir(tmp_path: Path, name: str, cls: type, folder: str) -> None:
    cfg = make_cfg(tmp_path, f"data={name}")
    assert cfg.data.root == f"{tmp_path}/data" and cfg.data.download is False
    dm = instantiate(cfg.data)
    assert isinstance(dm, cls) and dm.num_classes == cfg.data.num_classes
    assert list(dm.image_shape) == list(cfg.data.image_shape) and list(dm.mean) == list(cfg.data.mean)
    with pytest.raises(FileNotFoundError, match=rf"(?s){tmp_path}/data/{folder}.*data={name} data.download=true"):
        dm.prepare_data()


@pytest.mark.parametrize("name", options("data"))
def test_data_hparams_survive_a_weights_only_checkpoint(tmp_path: Path, name: str) -> None:
    """Lightning stores datamodule hparams in checkpoints and resumes with ``torch.load(weights_only=True)``.

    (Lightning allow-lists its own ``AttributeDict`` container; what must not appear inside is OmegaConf.)
    """
    dm = instantiate(make_cfg(tmp_path, f"data={name}").data)
    torch.save({"datamodule_hyper_parameters": dict(dm.hparams_initial)}, tmp_path / "ck.pt")
    loaded = torch.load(tmp_path / "ck.pt", weights_only=True)["datamodule_hyper_parameters"]
    assert dict(loaded) == dict(dm.hparams_initial) and loaded["batch_size"] == dm.batch_size


def test_declared_metadata_is_checked(tmp_path: Path) -> None:
    with pytest.raises(InstantiationException, match="num_classes=100 was declared but the dataset has"):
        instantiate(make_cfg(tmp_path, "data=cifar10", "data.num_classes=100").data)


@pytest.mark.parametrize("name", options("attack"))
def test_attack_configs_instantiate_with_the_model(tmp_path: Path, name: str) -> None:
    cfg = make_cfg(tmp_path, f"attack={name}")
    model = instantiate(cfg.model)
    attacks = {key: instantiate(node, model=model) for key, node in cfg.attack.items()}
    if name == "none":
        assert attacks == {}
        return
    assert list(attacks) == [name]
    attack = attacks[name]
    class_name, defaults = ATTACK_DEFAULTS[name]
    assert type(attack) is getattr(torchattacks, class_name)
    for key, value in defaults.items():  # the YAML and build_attack agree
        expected = pytest.approx(value) if isinstance(value, float) else value
        assert getattr(attack, key) == expected, key
    x = torch.rand(2, 1, 8, 8)
    if name in ("fgsm", "pgd"):
        assert attack(x, torch.tensor([0, 1])).shape == x.shape


def test_several_attacks_compose_into_one_mapping(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "attack=[fgsm,pgd,autoattack]", "data=synthetic", "data.num_classes=7")
    assert list(cfg.attack) == ["fgsm", "pgd", "autoattack"]
    assert cfg.attack.autoattack.n_classes == 7


def test_unknown_option_lists_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(MissingConfigException, match=r"(?s)Could not find 'attack/pdg'.*pgd_l2"):
        make_cfg(tmp_path, "attack=pdg")


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs(tmp_path: Path, name: str) -> None:
    cfg = make_cfg(tmp_path, f"trainer={name}")
    assert cfg.trainer.default_root_dir == str(tmp_path / "out")
    assert cfg.trainer.inference_mode is False
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("no GPU: composed only")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert isinstance(trainer, Trainer)
    if name == "ddp_sim":
        # ddp_spawn that destroys its gloo group at exit (left to interpreter shutdown, it can abort a worker)
        assert trainer.num_devices == 2 and isinstance(trainer.strategy, SpawnDDPStrategy)
        assert trainer.strategy._start_method == "spawn"


@pytest.mark.parametrize("name", options("logger"))
def test_logger_configs_write_into_the_run_dir(tmp_path: Path, name: str) -> None:
    cfg = make_cfg(tmp_path, f"logger={name}")
    if name in ("mlflow", "wandb"):
        pytest.importorskip(name)
    loggers = [instantiate(node) for node in cfg.logger.values()]
    assert len(loggers) == 1
    logger = loggers[0]
    logger.log_hyperparams({"target": 1.0})
    logger.log_metrics({"sigma/conv": 0.5}, step=0)
    logger.finalize("success")
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written, f"{name} wrote nothing under the run directory"


def test_several_loggers_compose(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "logger=[csv,tensorboard]")
    assert list(cfg.logger) == ["csv", "tensorboard"]


def test_paths_and_hydra_dirs(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    assert paths["data_dir"] == f"{tmp_path}/data" and paths["log_dir"] == f"{tmp_path}/logs"
    cfg = make_cfg(tmp_path, hydra_cfg=True)
    assert cfg.hydra.run.dir.startswith(f"{tmp_path}/logs/pieces_test/runs/")
    assert cfg.hydra.sweep.dir.startswith(f"{tmp_path}/logs/pieces_test/multiruns/")
    assert cfg.hydra.job.chdir is False


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("joblib_local", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_launcher_examples_compose(tmp_path: Path, launcher: str, target: str) -> None:
    cfg = make_cfg(tmp_path, f"hydra/launcher={launcher}", hydra_cfg=True)
    assert cfg.hydra.launcher._target_ == target


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_optional_logger_keys_match_the_lightning_class(tmp_path: Path, name: str) -> None:
    """Checked even where the optional package is missing: every key is an argument of the logger class."""
    import inspect

    from hydra.utils import get_class

    node = make_cfg(tmp_path, f"logger={name}").logger[name]
    params = inspect.signature(get_class(node._target_).__init__).parameters
    named = {p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_KEYWORD}
    assert set(node) - {"_target_"} <= named
    assert node.get("offline", True) is True
    if name == "mlflow":
        assert node.tracking_uri == f"file:{tmp_path / 'out'}/mlruns"
    else:
        assert node.save_dir == str(tmp_path / "out")


class TinyClassifier(LightningModule):
    """Minimal module for the DDP smoke test: cross-entropy training, RobustAccuracy on clean val inputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.val_acc = RobustAccuracy()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.model(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc.update(self.model(x), y)
        self.log("val_acc", self.val_acc, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.slow
def test_ddp_sim_runs_and_syncs_the_metric(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "trainer=ddp_sim", "trainer.max_epochs=1", "+trainer.limit_train_batches=3")
    module = TinyClassifier(instantiate(cfg.model))
    dm = instantiate(cfg.data)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, dm)
    ddp_acc = float(trainer.callback_metrics["val_acc"])
    # the weights came back to this process: one process over the whole val split gives the same accuracy
    dm.setup()
    module.eval()
    with torch.no_grad():
        correct = sum(int((module.model(x).argmax(1) == y).sum()) for x, y in dm.val_dataloader())
    assert ddp_acc == pytest.approx(correct / len(dm.val_set))
