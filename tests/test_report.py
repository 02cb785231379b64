"""The report aggregates fake multirun metrics into report.md and readable figures."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib.image
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures_report import (  # noqa: E402
    RADII,
    RUNS,
    fake_certification,
    fake_metrics,
    write_fake_runs,
    write_fake_study,
)
from scripts import EXPERIMENTS, load_script  # noqa: E402

sys.path.insert(0, str(EXPERIMENTS))  # experiments/reporting/, the report's modules (experiments/ is not a package)
from reporting.style import EXTRA_STYLE, METHOD_STYLE  # noqa: E402

FIGURES = ("violin_sigma.png", "bn_sigma_over_training.png", "accuracy_vs_target.png")
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "report_without_certify.md"
RED = '<span style="color:red">'
PAIRED_HEADING = "## FastClip − baseline, paired over seeds"


def _load_report() -> ModuleType:
    return load_script("report.py", "specclip_report")


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
    table = text.split(f"\n{PAIRED_HEADING}")[0]
    rows = [line for line in table.splitlines() if re.match(r"\| (fastclip|gouk|none) \|", line)]
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
    # report_without_certify.md: what report.py wrote for these runs before train.py could certify, plus the
    # paired differences section (FastClip − gouk, − none on the shared seed 0; n = 1, so no intervals)
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


def _paired_runs(report: ModuleType, spec: list[tuple[str, float | None, int | None, float]]) -> list[Any]:
    """Runs from (method, target, seed, clean accuracy); σ of the layers 1.0 and 0.99 for FastClip, else 1.2, 0.8."""
    runs = []
    for i, (method, target, seed, acc) in enumerate(spec):
        sigma = {"a": 1.0, "b": 0.99} if method == "fastclip" else {"a": 1.2, "b": 0.8}
        metrics = {"method": method, "target": target, "seed": seed, "test_acc": acc, "spectral_norm": sigma}
        runs.append(report.Run(Path(f"{i}/metrics.json"), metrics))
    return runs


T_975_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom
T_975_1 = 12.706204736174698  # ... 1 degree of freedom


def test_paired_difference_known_answer(report: ModuleType) -> None:
    # FastClip 90, 92, 94 % against 89, 90, 91 % on seeds 0, 1, 2: differences 1, 2, 3 points, sd 1
    spec = [("fastclip", 1.0, s, acc) for s, acc in enumerate((0.90, 0.92, 0.94))]
    spec += [("gouk", 1.0, s, acc) for s, acc in enumerate((0.89, 0.90, 0.91))]
    table = report.paired_differences(report.group_runs(_paired_runs(report, spec)))
    assert table.columns == [("clean acc (pp)", True), ("σ layer max", False)]
    [row] = table.rows
    assert (row.baseline, row.target, row.bn_mode, row.seeds) == ("gouk", 1.0, "bn", (0, 1, 2))
    clean = row.cells["clean acc (pp)"]
    half = T_975_2 * 0.01 / 3**0.5
    assert clean.n == 3
    assert clean.mean == pytest.approx(0.02)
    assert (clean.low, clean.high) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    sigma = row.cells["σ layer max"]  # 1.0 − 1.2 on every seed: no spread, a zero-width interval
    assert (sigma.mean, sigma.low, sigma.high) == (pytest.approx(-0.2), pytest.approx(-0.2), pytest.approx(-0.2))
    text = "\n".join(report.render_paired(table))
    assert "| gouk | 1 | bn | 3 | +2.0 [−0.5, +4.5] | −0.200 [−0.200, −0.200] |" in text


def test_paired_difference_pairs_only_shared_seeds(report: ModuleType) -> None:
    spec = [("fastclip", 1.0, s, acc) for s, acc in enumerate((0.90, 0.92, 0.94))]
    spec += [("gouk", 1.0, s, acc) for s, acc in ((1, 0.90), (2, 0.91), (3, 0.50))]
    spec += [("gouk", 1.0, None, 0.10)]  # no seed: never paired
    [row] = report.paired_differences(report.group_runs(_paired_runs(report, spec))).rows
    assert row.seeds == (1, 2)
    clean = row.cells["clean acc (pp)"]  # differences 2 and 3 points
    half = T_975_1 * statistics.stdev([0.02, 0.03]) / 2**0.5
    assert (clean.n, clean.mean) == (2, pytest.approx(0.025))
    assert (clean.low, clean.high) == (pytest.approx(0.025 - half), pytest.approx(0.025 + half))


def test_paired_difference_of_one_pair_has_no_interval(report: ModuleType) -> None:
    spec = [("fastclip", 1.0, 0, 0.90), ("fastclip", 1.0, 1, 0.95), ("gouk", 1.0, 0, 0.89), ("gouk", 1.0, 2, 0.5)]
    table = report.paired_differences(report.group_runs(_paired_runs(report, spec)))
    [row] = table.rows
    clean = row.cells["clean acc (pp)"]
    assert (clean.n, clean.mean, clean.low, clean.high) == (1, pytest.approx(0.01), None, None)
    assert "| gouk | 1 | bn | 1 | +1.0 [n/a] | −0.200 [n/a] |" in report.render_paired(table)
    assert report.paired_difference({0: 1.0}, {1: 1.0}) is None


def test_paired_baselines_match_target_and_bn_mode(report: ModuleType) -> None:
    runs = _paired_runs(
        report,
        [("fastclip", t, s, 0.9) for t in (0.5, 1.0) for s in (0, 1)]
        + [("none", None, s, 0.95) for s in (0, 1)]  # against every FastClip target
        + [("gouk", 2.0, s, 0.8) for s in (0, 1)],  # no FastClip at 2: no pair
    )
    other = report.Run(Path("x/metrics.json"), {"method": "miyato", "target": 1, "seed": 0, "bn_mode": "no_bn"})
    rows = report.paired_differences(report.group_runs([*runs, other])).rows
    assert [(r.baseline, r.target, r.seeds) for r in rows] == [("none", 0.5, (0, 1)), ("none", 1.0, (0, 1))]
    assert rows[0].cells["clean acc (pp)"].mean == pytest.approx(-0.05)
    # without FastClip there is nothing to pair: no section
    gouk = [r for r in runs if r.method == "gouk"]
    assert report.paired_differences(report.group_runs(gouk)).rows == []
    assert PAIRED_HEADING not in report.render_markdown(report.group_runs(gouk), {}, [Path(".")], 2)


def test_paired_section_in_report(tmp_path: Path, report: ModuleType) -> None:
    accs = {"fastclip": (0.90, 0.92, 0.94), "gouk": (0.89, 0.90, 0.91)}
    for method, values in accs.items():
        for seed, acc in enumerate(values):
            metrics = fake_metrics(method, 1.0, seed, acc)
            if (method, seed) == ("fastclip", 2):
                del metrics["robust_acc"]["pgd"]  # a quantity missing from one run: that cell has its own n
            (tmp_path / f"{method}{seed}").mkdir()
            (tmp_path / f"{method}{seed}" / "metrics.json").write_text(json.dumps(metrics))
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert PAIRED_HEADING in text and text.index(PAIRED_HEADING) < text.index("## Figures")
    assert "an interval that excludes 0 is a difference at the 95% level" in text
    section = text[text.index(PAIRED_HEADING) :]
    header = next(line for line in section.splitlines() if line.startswith("| baseline"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["baseline", "target", "BN mode", "n", "clean acc (pp)", "fgsm acc (pp)", "pgd acc (pp)"] + [
        "σ layer max"
    ]
    row = _row(section, "gouk", "1")
    assert row[2:5] == ["bn", "3", "+2.0 [−0.5, +4.5]"]
    assert row[columns.index("fgsm acc (pp)")] == "+1.2 [−0.3, +2.7]"  # fgsm is 60 % of clean: 0.6, 1.2, 1.8 points
    # pgd is 45 % of clean, missing from FastClip's seed 2: 0.45 and 0.9 points, t with 1 degree of freedom
    assert row[columns.index("pgd acc (pp)")] == "+0.7 [−2.2, +3.5] (n=2)"


def test_study_figures_are_readable_at_readme_width(tmp_path: Path, report: ModuleType) -> None:
    # the study's six methods × three seeds, ResNet-18's 21 layers, FastClip also at 0.5 and 2 and in every BN mode
    write_fake_study(tmp_path / "runs", certified=True)
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path)]) == 0
    for name in (*FIGURES, "certified_vs_eps.png"):
        image = matplotlib.image.imread(tmp_path / name)
        # shown 800 px wide (the README), a figure wider than 1600 px would shrink its text below half size
        assert 600 < image.shape[1] <= 1600, (name, image.shape)
        assert image.shape[0] <= 1.6 * image.shape[1], (name, image.shape)
    text = (tmp_path / "report.md").read_text()
    rows = [line for line in text[text.index(PAIRED_HEADING) :].splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1:3] for r in rows] == [
        [f" {m} ", f" {t} "]
        for m, t in [("gouk", "1"), ("miyato", "1"), ("senderovich", "1"), ("gram", "1")]
        + [("none", "0.5"), ("none", "1"), ("none", "2")]
    ]
    assert all(" 3 " == r.split("|")[4] for r in rows)


def test_methods_differ_by_marker_not_only_colour() -> None:
    markers = [marker for _, marker in METHOD_STYLE.values()]
    assert len(set(markers)) == len(markers)
    assert not set(markers) & {marker for _, marker in EXTRA_STYLE}
