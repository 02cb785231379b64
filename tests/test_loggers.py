"""MLflow and Weights & Biases for real: the Hydra logger configs in a short fit, the series read back from disk.

Nothing here needs a network: MLflow writes a local file store, W&B runs offline (``WANDB_MODE=offline``) with every
directory it writes under ``tmp_path``; its service process is torn down after each test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import Classifier, loader, scaled, small_cnn, trainer
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, open_dict

from lightning_specclip import SpectralClipCallback

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
# mlflow-skinny 2.14 (see the `trackers` extra in pyproject.toml) imports pkg_resources
pytestmark = pytest.mark.filterwarnings("ignore:pkg_resources is deprecated:UserWarning")


class Recorder(Logger):
    """What the callback hands its loggers: ``{key: [(step, value), ...]}``, to compare the stores against."""

    def __init__(self) -> None:
        super().__init__()
        self.series: dict[str, list[tuple[int, float]]] = defaultdict(list)

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.series[key].append((step, value))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def compose_logger(name: str, output_dir: Path) -> DictConfig:
    """``conf/logger/<name>.yaml`` as ``experiments/train.py`` gets it (``train.yaml``, this run directory)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"logger={name}"])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.work_dir = str(ROOT)
    assert list(cfg.logger) == [name]
    return cfg.logger[name]


def fit(logger: Logger, **options: Any) -> tuple[SpectralClipCallback, Recorder]:
    """A few steps of a small CNN, every step logged; clips at steps 2 and 4 (the last)."""
    torch.manual_seed(0)
    recorder = Recorder()
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=10, log_every_n_steps=1, **options)
    trainer(max_steps=STEPS, logger=[logger, recorder], callbacks=[callback]).fit(
        Classifier(scaled(small_cnn(), 3.0)), loader()
    )
    sigma_keys = {f"spectral/{name}/sigma" for name in callback.sigmas}
    assert sigma_keys and sigma_keys <= set(recorder.series)
    for key in sigma_keys:
        assert [step for step, _ in recorder.series[key]] == list(range(1, STEPS + 1)), key
    for name, sigma in callback.sigmas.items():  # the last point logged is the callback's final measurement
        assert recorder.series[f"spectral/{name}/sigma"][-1] == (STEPS, sigma)
    return callback, recorder


def test_mlflow_config_logs_sigma_series_that_read_back(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="the trackers extra: pip install -e '.[trackers]'")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    node = compose_logger("mlflow", tmp_path)
    assert node.tracking_uri == f"file:{tmp_path}/mlruns"
    logger = instantiate(node)
    callback, recorder = fit(logger)

    client = MlflowClient(node.tracking_uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"  # the Trainer finalized the logger
    assert client.get_experiment(run.info.experiment_id).name == "train"  # the task name
    assert (tmp_path / "mlruns" / run.info.experiment_id / run.info.run_id).is_dir()
    spectral = {key for key in recorder.series if key.startswith("spectral/")}
    assert spectral == {key for key in run.data.metrics if key.startswith("spectral/")}
    for key in spectral:
        history = client.get_metric_history(logger.run_id, key)
        assert [(m.step, m.value) for m in history] == recorder.series[key], key
    for name, sigma in callback.sigmas.items():
        assert run.data.metrics[f"spectral/{name}/sigma"] == sigma


def _wandb_processes() -> list[str]:
    """Command lines of the processes this test process started that belong to wandb (its service)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        if parent == os.getpid() and "wandb" in command:
            found.append(command)
    return found


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """wandb offline, writing only under ``tmp_path``, no system monitor, no error reports; torn down after."""
    wandb = pytest.importorskip("wandb")
    wandb.finish()  # a run another test left open would be reused by WandbLogger
    wandb.teardown()
    settings = {"MODE": "offline", "SILENT": "true", "ERROR_REPORTING": "false", "DISABLE_GIT": "true"}
    settings |= {"DISABLE_CODE": "true", "X_DISABLE_STATS": "true"}
    for name in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        settings[name] = str(tmp_path / "wandb_home" / name.lower())
    for name, value in settings.items():
        monkeypatch.setenv(f"WANDB_{name}", value)
    try:
        yield wandb
    finally:
        wandb.finish()
        wandb.teardown()
    assert _wandb_processes() == [], "wandb left a process running"


def _read_offline_run(run_file: Path) -> list[Any]:
    """The records of an offline run's ``.wandb`` file, with wandb's own reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(run_file))
    records = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        records.append(record)
    return records


def _history_rows(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


def test_wandb_config_logs_sigma_series_and_histograms_offline(tmp_path: Path, wandb_offline: Any) -> None:
    wandb = wandb_offline
    node = compose_logger("wandb", tmp_path)
    assert node.offline is True and node.save_dir == str(tmp_path)
    logger = instantiate(node)
    callback, recorder = fit(logger, k=2)
    run_id = logger.experiment.id
    wandb.finish()
    wandb.teardown()
    assert _wandb_processes() == []  # no service left running

    (run_file,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = _read_offline_run(run_file)
    kinds = [record.WhichOneof("record_type") for record in records]
    assert kinds[0] == "header" and "run" in kinds and kinds[-1] == "exit"  # a complete run file
    assert records[kinds.index("exit")].exit.exit_code == 0

    rows = _history_rows(records)
    spectral = {key for key in recorder.series if key.startswith("spectral/")}
    for key in spectral:
        logged = [(row["trainer/global_step"], row[key]) for row in rows if key in row]
        assert logged == recorder.series[key], key

    # histograms in the scalars' rows, at every logged step: σ₁ across layers, and each layer's top-k spectrum
    histogram_rows = [row for row in rows if "spectral/sigma_per_layer/_type" in row]
    assert [row["trainer/global_step"] for row in histogram_rows] == list(range(1, STEPS + 1))
    sigma_keys = sorted(f"spectral/{name}/sigma" for name in callback.sigmas)
    for row in histogram_rows:
        sigmas = [row[key] for key in sigma_keys]
        counts, edges = np.histogram(sigmas, bins=64)
        assert row["spectral/sigma_per_layer/_type"] == "histogram"
        assert row["spectral/sigma_per_layer/values"] == counts.tolist()
        np.testing.assert_allclose(row["spectral/sigma_per_layer/bins"], edges, rtol=1e-6)
        for name in callback.sigmas:
            spectrum = [row[f"spectral/{name}/sigma"], row[f"spectral/{name}/sigma_2"]]
            bins = row[f"spectral/{name}/spectrum/bins"]
            assert sum(row[f"spectral/{name}/spectrum/values"]) == 2, name
            np.testing.assert_allclose([bins[0], bins[-1]], [min(spectrum), max(spectrum)], rtol=1e-6)


def test_wandb_without_histograms_gets_scalars_only(tmp_path: Path, wandb_offline: Any) -> None:
    logger = instantiate(compose_logger("wandb", tmp_path))
    _, recorder = fit(logger, log_histograms=False)
    run_id = logger.experiment.id
    wandb_offline.finish()
    (run_file,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    rows = _history_rows(_read_offline_run(run_file))
    logged = [
        (row["trainer/global_step"], row["spectral/net.0/sigma"]) for row in rows if "spectral/net.0/sigma" in row
    ]
    assert logged == recorder.series["spectral/net.0/sigma"]
    assert not any(key.endswith("/_type") for row in rows for key in row)


@pytest.mark.slow  # a fresh interpreter: about 10 s of imports on a loaded 2-core machine
def test_tracker_packages_not_imported_without_their_logger(tmp_path: Path) -> None:
    """A fresh interpreter fits with TensorBoard's histograms: neither wandb nor mlflow is imported."""
    script = f"""
import sys
from lightning.pytorch.loggers import TensorBoardLogger
from helpers import Classifier, loader, small_cnn, trainer
from lightning_specclip import SpectralClipCallback
callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=5, log_every_n_steps=1)
logger = TensorBoardLogger({str(tmp_path)!r}, name="tb")
trainer(max_steps=2, logger=logger, callbacks=[callback]).fit(Classifier(small_cnn()), loader(n=16))
assert callback.sigmas, "nothing logged"
assert "wandb" not in sys.modules and "mlflow" not in sys.modules, "a tracker package was imported"
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
