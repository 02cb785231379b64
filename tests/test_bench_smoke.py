"""Smoke test of the spectrum benchmark: the quick run completes in-process and writes its report."""

from __future__ import annotations

from pathlib import Path

import torch
from scripts import load_script


def _load_bench():
    return load_script("bench_spectrum.py")


def test_quick_benchmark_runs_and_writes_markdown(tmp_path: Path, capsys) -> None:
    bench = _load_bench()
    threads = torch.get_num_threads()
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the thread setting is restored
    report = (tmp_path / "bench_spectrum.md").read_text(encoding="utf-8")
    assert report.strip() in capsys.readouterr().out  # the same report went to stdout
    for text in ("| conv3x3 zeros | default |", "| conv3x3 circular | fft |", "Time to reach 0.0001", "power_qr"):
        assert text in report
    # every kind has a time-to-target row and the default reached the target on every one of them
    kinds = [k.name for k in bench.kinds(quick=True)]
    table = report.split("Time to reach")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    assert [r.split(" | ")[0][2:] for r in rows] == kinds
    assert all(" (tol=" in r.split(" | ")[2] for r in rows)
    # the accuracy of the default against the ground truth in the side-by-side table
    side = [line for line in report.split("Time to reach")[0].splitlines() if " | default | " in line]
    assert len(side) == len(kinds)
    assert all(float(line.split(" | ")[3]) <= 1e-4 for line in side)


def test_render_and_out_file_name(tmp_path: Path) -> None:
    bench = _load_bench()
    rows = [bench.Row("k", "default", 1.0, 1e-6, 0.01, 10, "x")]
    target = bench.TargetRow("k", True, "1.0 (dense)")
    target.results = {
        "default": {"seconds": 0.01, "error": 1e-6, "products": 10, "setting": "tol=1e-5"},
        "power_qr": {"seconds": 0.1, "error": 1e-5, "products": 100, "setting": "100 iterations"},
        "arpack": {"seconds": 0.02, "error": 1e-7, "products": 20, "setting": "tol=1e-4"},
    }
    text = bench.render(rows, [target], "header")
    assert "| k | default | 1.000000 | 1.0e-06 | 10.0 ms | 10 | x |" in text
    assert "| 0.100 | 0.500 | 0.100 | yes |" in text
    assert "Conv kinds missing it: none." in text
