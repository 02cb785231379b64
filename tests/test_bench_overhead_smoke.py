"""Smoke test of the training-overhead benchmark: a tiny run completes and reports every method."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from scripts import load_script


def _load_bench() -> ModuleType:
    return load_script("bench_overhead.py")


def test_tiny_overhead_benchmark_reports_every_method(tmp_path: Path) -> None:
    bench = _load_bench()
    out = tmp_path / "overhead.md"
    args = ["--width", "4", "--batch-size", "8", "--steps", "4", "--every-n-steps", "2", "--measure"]
    table = bench.main([*args, "--out", str(out)])
    assert out.read_text().strip() == table.strip()
    rows = {r.split(" | ")[0][2:]: r.strip("| ").split(" | ") for r in table.splitlines() if r.startswith("| ")}
    assert set(rows) >= {"no callback", "fastclip", "gouk", "miyato", "none (track only)"}
    for name in ("fastclip", "gouk", "miyato", "none (track only)"):
        fit, ratio, in_callback, within, max_sigma = (float(v) for v in rows[name][1:])
        assert 0 < in_callback <= fit  # the hooks' time is part of the fit time (both rounded to 0.1 s)
        assert within > 1 and ratio > 0
    assert float(rows["fastclip"][-1]) <= 1.0 * 1.02  # clipped at steps 2 and 4: every layer within 2% of 1
    assert float(rows["none (track only)"][-1]) > 1.02  # the same weights unclipped are above it


def test_repeated_rounds_report_medians_of_paired_ratios(tmp_path: Path) -> None:
    bench = _load_bench()
    args = ["--width", "4", "--batch-size", "8", "--steps", "3", "--methods", "none", "--repeats", "2"]
    table = bench.main([*args, "--out", str(tmp_path / "overhead.md")])
    row = next(r for r in table.splitlines() if r.startswith("| none"))
    _, fits, ratios, *_ = (cell.strip() for cell in row.strip("|").split("|"))
    runs = [float(v) for v in fits.split("runs: ")[1].rstrip(")").split(", ")]
    paired = [float(v) for v in ratios.split("runs: ")[1].rstrip(")").split(", ")]
    assert len(runs) == len(paired) == 2
    assert float(ratios.split()[0]) == pytest.approx(sum(paired) / 2, abs=1e-3)  # the median of two
    baseline = next(r for r in table.splitlines() if r.startswith("| no callback"))
    assert baseline.count(",") == 2  # three baseline fits: before, and after each round
