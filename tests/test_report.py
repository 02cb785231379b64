"""The report aggregates fake multirun metrics into report.md and readable figures."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import matplotlib.image
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures_report import RADII, RUNS, fake_certification, write_fake_runs  # noqa: E402

REPORT = Path(__file__).resolve().parents[1] / "experiments" / "report.py"
FIGURES = ("violin_sigma.png", "bn_sigma_over_training.png", "accuracy_vs_target.png")
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "report_without_certify.md"
RED = '<span style="color:red">'


def _load_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("specclip_report", REPORT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["specclip_report"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report() -> ModuleType:
    return _load_report()


def _row(text: str, method: str, target: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[0] == method and cells[1] == target:
            return cells
    raise AssertionError(f"no row for {method} {target} in:\n{text}")


def test_report_writes_table_and_figures(tmp_path: Path, report: ModuleType) -> None:
    write_fake_runs(tmp_path)
    assert report.main([str(tmp_path)]) == 0

    text = (tmp_path / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:5] == ["method", "target", "BN mode", "n", "clean acc (%)"]
    assert {"fgsm acc (%)", "pgd acc (%)", "σ layer mean", "σ layer max", "σ conv∘BN max"} <= set(columns)
    assert "epoch time (s)" in columns

    # One row per (method, target, BN mode), sorted by method (paper order) then target.
    rows = [line for line in text.splitlines() if re.match(r"\| (fastclip|gouk|none) \|", line)]
    assert [r.split("|")[1:3] for r in rows] == [
        [" fastclip ", " 0.5 "],
        [" fastclip ", " 1 "],
        [" gouk ", " 0.5 "],
        [" gouk ", " 1 "],
        [" none ", " – "],
    ]
    # fastclip at 1.0 has two seeds: mean clean accuracy (0.912 + 0.934) / 2 = 92.3 %, std 1.6.
    fast = _row(text, "fastclip", "1")
    assert fast[3] == "2"
    assert fast[4] == "92.3 ± 1.6"
    pgd = [100 * acc * 0.45 for m, t, _, acc in RUNS if (m, t) == ("fastclip", 1.0)]
    assert fast[columns.index("pgd acc (%)")].startswith(f"{sum(pgd) / 2:.1f}")
    assert fast[columns.index("epoch time (s)")] == "1.55"
    # FastClip lands on the target: σ max ≈ 1.0; the unclipped run is far above.
    assert abs(float(fast[columns.index("σ layer max")]) - 1.0) < 0.03
    none = _row(text, "none", "–")
    assert none[4] == "96.2"
    assert float(none[columns.index("σ layer mean")]) > 2.0

    for name in FIGURES:
        assert f"]({name})" in text, f"{name} not linked in report.md"
        path = tmp_path / name
        assert path.stat().st_size > 5_000, f"{name} is suspiciously small"
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400


def test_out_directory_and_missing_history(tmp_path: Path, report: ModuleType) -> None:
    runs = tmp_path / "runs"
    for path in write_fake_runs(runs):
        metrics = json.loads(path.read_text())
        metrics["history"] = {"step": [], "sigma": {}}
        metrics["spectral_norm_composition"] = {}
        path.write_text(json.dumps(metrics))
    out = tmp_path / "out"
    assert report.main([str(runs / "0"), str(runs / "sweep2"), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "3 runs" in text
    assert "σ conv∘BN max" not in text
    assert "bn_sigma_over_training.png" not in text or "not drawn" in text
    assert "not drawn" in text and "composition" in text
    assert not (out / "bn_sigma_over_training.png").exists()
    assert (out / "violin_sigma.png").exists() and (out / "accuracy_vs_target.png").exists()
    assert not (runs / "report.md").exists()


def test_empty_or_missing_directory_is_a_clear_error(tmp_path: Path, report: ModuleType) -> None:
    with pytest.raises(SystemExit, match=r"no metrics\.json found under .*empty"):
        (tmp_path / "empty").mkdir()
        report.main([str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match=r"no metrics\.json found under .*nowhere \(does not exist\)"):
        report.main([str(tmp_path / "nowhere")])


def test_unreadable_file_is_skipped(tmp_path: Path, report: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    write_fake_runs(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    assert report.main([str(tmp_path)]) == 0
    assert "skipping" in capsys.readouterr().err
    assert "6 runs (7 `metrics.json` files)" in (tmp_path / "report.md").read_text()


def _columns(text: str) -> list[str]:
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    return [c.strip() for c in header.strip("|").split("|")]


def test_runs_without_certification_render_as_before(tmp_path: Path, report: ModuleType) -> None:
    # report_without_certify.md: what report.py wrote for these runs before train.py could certify
    runs = tmp_path / "runs"
    write_fake_runs(runs)
    assert report.main([str(runs)]) == 0
    assert (runs / "report.md").read_text().replace(str(runs), "<RUNS>") == GOLDEN.read_text()
    assert not (runs / "certified_vs_eps.png").exists()


def test_certified_beside_pgd_l2_columns_and_figure(tmp_path: Path, report: ModuleType) -> None:
    write_fake_runs(tmp_path, certified=True)
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    columns = _columns(text)
    radii = [f"ε={r}: certified / PGD-ℓ2 (%)" for r in RADII]
    at = columns.index("L upper")
    assert columns[at : at + 2 + len(radii)] == ["L upper", "L lower", *radii]
    assert columns[at - 1] == "pgd acc (%)" and columns[-1] == "epoch time (s)"

    fast = _row(text, "fastclip", "1")  # two seeds, the same bound and certified accuracy of their clean accuracy
    expected = [fake_certification("fastclip", 1.0, acc) for m, t, _, acc in RUNS if (m, t) == ("fastclip", 1.0)]
    assert fast[at : at + 2] == ["2.70", "1.89"]
    cert, pgd = [100 * sum(e[key]["0.1"] for e in expected) / 2 for key in ("certified_acc", "pgd_l2_acc")]
    assert fast[columns.index("ε=0.1: certified / PGD-ℓ2 (%)")] == f"{cert:.1f} ± 1.2 / {pgd:.1f} ± 1.4"
    none = _row(text, "none", "–")
    assert none[at] == "36.0"
    assert none[columns.index("ε=0: certified / PGD-ℓ2 (%)")] == "96.2 / 96.2"  # ε = 0: clean accuracy
    assert none[columns.index("ε=0.1: certified / PGD-ℓ2 (%)")].startswith("0.0 / ")
    assert RED not in text  # every fixture is sound

    assert "](certified_vs_eps.png)" in text
    figure = tmp_path / "certified_vs_eps.png"
    assert figure.stat().st_size > 5_000
    image = matplotlib.image.imread(figure)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400


def test_certified_above_pgd_l2_is_flagged_in_red(tmp_path: Path, report: ModuleType) -> None:
    files = write_fake_runs(tmp_path / "runs", certified=True)
    bad = json.loads(files[3].read_text())  # gouk at 0.5
    bad["certified_acc"]["0.25"] = bad["pgd_l2_acc"]["0.25"] + 0.05
    bad["certified_acc"]["0.5"] = bad["pgd_l2_acc"]["0.5"] + 1e-9  # float noise: not flagged
    files[3].write_text(json.dumps(bad))
    odd = json.loads(files[0].read_text())  # fastclip at 0.5: lower bound above the upper bound
    odd["lipschitz"]["lower"] = 2 * odd["lipschitz"]["upper"]
    files[0].write_text(json.dumps(odd))
    old = json.loads(files[5].read_text())  # an old run without certification beside them
    for key in ("lipschitz", "certified_acc", "pgd_l2_acc"):
        del old[key]
    files[5].write_text(json.dumps(old))
    assert report.main([str(tmp_path / "runs")]) == 0

    text = (tmp_path / "runs" / "report.md").read_text()
    flagged = [line for line in text.splitlines() if line.startswith(f"- {RED}")]
    assert len(flagged) == 2, text
    assert "run `runs/3`" in flagged[1] and "ε=0.25" in flagged[1] and "PGD-ℓ2" in flagged[1]
    assert "run `runs/0`" in flagged[0] and "lower bound" in flagged[0]
    # the offending cell is red too, the others are not
    columns = _columns(text)
    gouk = _row(text, "gouk", "0.5")
    assert gouk[columns.index("ε=0.25: certified / PGD-ℓ2 (%)")].startswith(RED)
    assert not gouk[columns.index("ε=0.5: certified / PGD-ℓ2 (%)")].startswith(RED)
    none = _row(text, "none", "–")
    assert none[columns.index("L upper")] == "–" and none[columns.index("ε=0.1: certified / PGD-ℓ2 (%)")] == "– / –"
    assert (tmp_path / "runs" / "certified_vs_eps.png").exists()
