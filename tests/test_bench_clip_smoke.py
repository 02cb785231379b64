"""Smoke test of the clipping benchmark: the quick run completes in-process and writes its report."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from scripts import load_script


def _load_bench():
    return load_script("bench_clip.py")


def test_quick_clip_benchmark_runs_and_writes_markdown(tmp_path: Path, capsys) -> None:
    bench = _load_bench()
    out = tmp_path / "bench_clip.md"
    threads = torch.get_num_threads()
    start = time.perf_counter()
    assert bench.main(["--quick", "--out", str(out)]) == 0  # 0: FastClip within 1% on every kind
    elapsed = time.perf_counter() - start
    assert elapsed < 40, f"the quick benchmark took {elapsed:.1f}s"
    assert torch.get_num_threads() == threads  # the thread setting is restored
    report = out.read_text(encoding="utf-8")
    assert report.strip() in capsys.readouterr().out
    assert "FastClip within 1% on every kind and scenario: yes" in report
    assert "- **FastClip**: within 1% on every kind." in report
    for factor in ("3", "1.1"):
        assert f"### σ₁ = {factor} × c before clipping" in report
    names = [k.name for k in bench.kinds(quick=True)]
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    assert [r.split(" | ")[0][2:] for r in rows] == names * 2
    for row in rows:
        cells = row.split(" | ")
        assert len(cells) == 2 + len(bench.COMPARED)
        fastclip_error = float(cells[1].split("%")[0])
        assert abs(fastclip_error) <= 1.0, row
    linear = next(r for r in rows if r.startswith("| Linear |"))
    assert linear.split(" | ")[4] == "n/a"  # no FFT clip for a Linear layer
    assert "**Gouk** misses on" in report and "Conv2d reflect" in report.split("**Gouk** misses on")[1]
