"""The ``specclip inspect`` command: every SOURCE form, JSON and table output, and one-line errors."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_specclip.cli import load_model, main, progress_bar
from lightning_specclip.tracking import spectral_norms

ROOT = Path(__file__).resolve().parent.parent
FACTORIES = "specclip_test_factories"
# experiments/train.py in seconds (as tests/test_train.py runs it)
FAST = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1"]
FAST += ["+trainer.limit_test_batches=2", "+trainer.enable_progress_bar=false", "logger=[]"]
FAST += ["clip.every_n_steps=2", "clip.warmup_iters=20", "history_every_n_steps=1", "module.attack_batches=1"]
FACTORY_CODE = """
import torch
from torch import nn


def conv_bn():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    )
    bn = model[1]
    bn.running_var.uniform_(0.2, 3.0)
    bn.running_mean.normal_()
    bn.weight.data.uniform_(-2.0, 2.0)
    return model


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, 2)

    def forward(self, x):
        h = self.conv(x)
        return self.fc((h * torch.sigmoid(h)).flatten(1))  # a product of two input-dependent values


def gated():
    return Gated()


def not_a_module():
    return 42


NUMBER = 3
"""


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module of model factories importable as ``specclip_test_factories``."""
    folder = tmp_path / "factories"
    folder.mkdir()
    (folder / f"{FACTORIES}.py").write_text(textwrap.dedent(FACTORY_CODE))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, FACTORIES, raising=False)
    return folder


def _inspect_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _assert_close(got: dict[str, float], want: dict[str, float], rel: float = 1e-3) -> None:
    assert set(got) == set(want)
    for name, sigma in want.items():
        assert got[name] == pytest.approx(sigma, rel=rel), name


def _assert_matches_ground_truth(report: dict, model: nn.Module, input_shape: tuple[int, ...]) -> None:
    truth = spectral_norms(model, torch.zeros(1, *input_shape))
    _assert_close(report["layers"], truth["layers"])
    _assert_close(report["compositions"], truth["compositions"])
    _assert_close(report["batchnorms"], truth["batchnorms"], rel=1e-6)
    bound = report["lipschitz"]
    assert 0 < bound["lower"] <= bound["upper"] < math.inf


def test_factory_json_matches_ground_truth(factories, capsys):
    report = _inspect_json(capsys, f"{FACTORIES}:conv_bn", "--input-shape", "2,6,6")
    assert set(report) == {"layers", "compositions", "batchnorms", "lipschitz"}
    assert set(report["lipschitz"]) == {"upper", "lower"}
    from specclip_test_factories import conv_bn

    model = conv_bn().eval()
    _assert_matches_ground_truth(report, model, (2, 6, 6))
    # the composition is not the product of its parts here, so this compares two different numbers
    assert report["compositions"]["0+1"] < report["layers"]["0"] * report["batchnorms"]["1"] * (1 - 1e-3)


def test_compose_batchnorm_tightens_the_bound_and_lists_compositions_either_way(factories, capsys):
    composed = _inspect_json(capsys, f"{FACTORIES}:conv_bn", "--input-shape", "2,6,6", "--compose-batchnorm")
    separate = _inspect_json(capsys, f"{FACTORIES}:conv_bn", "--input-shape", "2,6,6", "--no-compose-batchnorm")
    _assert_close(separate["compositions"], composed["compositions"])
    _assert_close(separate["layers"], composed["layers"])
    layers, gain = composed["layers"], composed["batchnorms"]["1"]
    # conv, BN by its gain, ReLU, Linear: the product of the three; composed: σ(conv∘BN)·σ(Linear)
    assert separate["lipschitz"]["upper"] == pytest.approx(layers["0"] * gain * layers["4"], rel=1e-9)
    assert composed["lipschitz"]["upper"] == pytest.approx(composed["compositions"]["0+1"] * layers["4"], rel=1e-9)
    assert composed["lipschitz"]["upper"] < separate["lipschitz"]["upper"]


def test_table_lists_every_name_and_number(factories, capsys):
    report = _inspect_json(capsys, f"{FACTORIES}:conv_bn", "--input-shape", "2,6,6")
    assert main(["inspect", f"{FACTORIES}:conv_bn", "--input-shape", "2,6,6"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
    for section in ("layers", "compositions", "batchnorms"):
        for name, value in report[section].items():
            assert float(rows[name][-1]) == pytest.approx(value, rel=1e-5), name
    assert rows["0"][1] == "2x6x6" and rows["4"][1] == "144"  # each layer's input shape
    (line,) = [line for line in table.splitlines() if line.startswith("Lipschitz bound")]
    upper, lower = map(float, re.search(r"upper (\S+), lower (\S+)", line).groups())
    assert upper == pytest.approx(report["lipschitz"]["upper"], rel=1e-5)
    assert lower == pytest.approx(report["lipschitz"]["lower"], rel=1e-5)


def test_unsupported_op_reports_the_error_and_still_the_layers(factories, capsys):
    report = _inspect_json(capsys, f"{FACTORIES}:gated", "--input-shape", "1,5,5")
    assert report["lipschitz"] is None
    assert "mul" in report["lipschitz_error"] and "cannot bound" in report["lipschitz_error"]
    from specclip_test_factories import gated

    torch.manual_seed(0)  # what the CLI does (--seed 0) before calling the factory
    truth = spectral_norms(gated().eval(), torch.zeros(1, 1, 5, 5))
    _assert_close(report["layers"], truth["layers"])
    assert main(["inspect", f"{FACTORIES}:gated", "--input-shape", "1,5,5"]) == 0
    table = capsys.readouterr().out
    (line,) = [line for line in table.splitlines() if line.startswith("Lipschitz bound")]
    assert "not computed" in line and "mul" in line
    assert re.search(r"^conv\s+1x5x5\s+\d", table, re.MULTILINE) and re.search(r"^fc\s+18\s+\d", table, re.MULTILINE)


def test_installed_entry_point_runs(factories):
    script = Path(sys.executable).parent / "specclip"
    assert script.exists(), "the specclip script is missing: pip install -e . (pyproject.toml [project.scripts])"
    done = subprocess.run(
        [str(script), "inspect", f"{FACTORIES}:conv_bn", "--input-shape", "2,6,6", "--json", "--samples", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(factories)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["layers"]) == {"0", "4"} and set(report["compositions"]) == {"0+1"}


def test_torchvision_model_is_built_with_the_seed():
    torchvision = pytest.importorskip("torchvision")
    model, declared = load_model("torchvision:resnet18", seed=3)
    torch.manual_seed(3)
    reference = torchvision.models.get_model("resnet18", weights=None)
    assert declared is None and not model.training
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_torchvision_resnet18_at_32(capsys):
    pytest.importorskip("torchvision")
    report = _inspect_json(capsys, "torchvision:resnet18", "--input-shape", "3,32,32")
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.get_model("resnet18", weights=None).eval()
    _assert_matches_ground_truth(report, model, (3, 32, 32))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of experiments/train.py (conv, BatchNorm, Linear), with the config Hydra would have saved."""
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    sys.path.insert(0, str(ROOT / "experiments"))
    import train

    run = tmp_path_factory.mktemp("run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, "bn=with"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
        cfg.paths.work_dir = str(ROOT)
    train.run(cfg)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # what @hydra.main writes
    return run


def _net_from_checkpoint(run: Path, checkpoint: Path) -> nn.Module:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    net = instantiate(OmegaConf.load(run / ".hydra" / "config.yaml").model)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    return net.eval()


def test_run_directory_and_checkpoint(run_dir, capsys):
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    net = _net_from_checkpoint(run_dir, checkpoint)
    from_dir = _inspect_json(capsys, str(run_dir))  # the input shape comes from data.image_shape: 1x8x8
    _assert_matches_ground_truth(from_dir, net, (1, 8, 8))
    assert set(from_dir["layers"]) == {"conv", "fc"} and set(from_dir["compositions"]) == {"conv+bn"}
    # trained weights, not a fresh initialization
    fresh = spectral_norms(_fresh_net(run_dir), torch.zeros(1, 1, 8, 8))["layers"]
    assert from_dir["layers"]["fc"] != pytest.approx(fresh["fc"], rel=1e-3)
    from_file = _inspect_json(capsys, str(checkpoint), "--input-shape", "1,8,8")
    _assert_close(from_file["layers"], from_dir["layers"], rel=1e-9)
    assert from_file["lipschitz"] == pytest.approx(from_dir["lipschitz"], rel=1e-9)


def _fresh_net(run: Path) -> nn.Module:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.manual_seed(123)
    return instantiate(OmegaConf.load(run / ".hydra" / "config.yaml").model).eval()


def test_run_directory_errors(run_dir, tmp_path, capsys):
    # a checkpoint outside any run directory
    (tmp_path / "loose.ckpt").write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    assert main(["inspect", str(tmp_path / "loose.ckpt")]) == 2
    assert "no .hydra/config.yaml" in capsys.readouterr().err
    # a run directory without a checkpoint
    empty = tmp_path / "empty_run"
    (empty / ".hydra").mkdir(parents=True)
    (empty / ".hydra" / "config.yaml").write_text((run_dir / ".hydra" / "config.yaml").read_text())
    assert main(["inspect", str(empty)]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    # a checkpoint that does not fit the config
    (empty / "checkpoints").mkdir()
    torch.save({"state_dict": {"net.conv.weight": torch.zeros(1)}}, empty / "checkpoints" / "last.ckpt")
    assert main(["inspect", str(empty)]) == 2
    assert "does not fit the model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no/such/run"], "no existing file or directory"),
        (["resnet18", "--input-shape", "3,32,32"], "torchvision:NAME, or package.module:function"),
        (["torchvision:resnet19", "--input-shape", "3,32,32"], "unknown torchvision model 'resnet19'; close matches"),
        (["torchvision:resnet18"], "--input-shape C,H,W is required"),
        (["torchvision:resnet18", "--input-shape", "3,x,32"], "--input-shape '3,x,32' is malformed"),
        (["torchvision:resnet18", "--input-shape", "3,0,32"], "is malformed"),
        ([f"{FACTORIES}:not_a_module", "--input-shape", "3"], "returned an object of type int, not an nn.Module"),
        ([f"{FACTORIES}:NUMBER", "--input-shape", "3"], "not a function"),
        ([f"{FACTORIES}:missing", "--input-shape", "3"], "has no attribute 'missing'"),
        (["no_such_module_for_specclip:build", "--input-shape", "3"], "cannot import 'no_such_module_for_specclip'"),
        ([f"{FACTORIES}:conv_bn", "--input-shape", "3,6,6"], "does not run on inputs of shape 3x6x6"),
        ([f"{FACTORIES}:conv_bn", "--input-shape", "2,6,6", "--samples", "0"], "--samples must be"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(factories, capsys, args, message):
    assert main(["inspect", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specclip inspect: error:"), captured.err
    assert message in lines[0]


def test_file_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"")
    assert main(["inspect", str(tmp_path / "model.pt")]) == 2
    assert "not a .ckpt checkpoint" in capsys.readouterr().err


def test_usage_errors_and_help_return_exit_codes(capsys):
    assert main(["inspect"]) == 2  # no SOURCE: argparse's usage error
    assert "SOURCE" in capsys.readouterr().err
    assert main(["inspect", "--help"]) == 0
    assert "--compose-batchnorm" in capsys.readouterr().out


def test_progress_bar_on_a_terminal_shows_each_map(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_bar() as progress:
        time.sleep(1.1)  # the bar shows only once measuring has taken over a second
        for done in range(1, 4):
            progress(done, 3, f"layer{done}")
            time.sleep(0.15)  # tqdm redraws at most every 0.1 s
    shown = terminal.getvalue()
    assert "3/3" in shown and "layer3" in shown
