"""Smoke test of the per-step products benchmark: a tiny run completes, every variant is exact."""

from __future__ import annotations

from pathlib import Path

from scripts import load_script


def test_tiny_products_benchmark(tmp_path: Path) -> None:
    bench = load_script("bench_products.py")
    out = tmp_path / "products.md"
    text = bench.main(["--width", "2", "--batch-size", "4", "--repeats", "2", "--out", str(out)])
    assert out.read_text().strip() == text.strip()
    rows = [r.strip("|").split("|") for r in text.splitlines() if r.startswith("| ") and "products of" not in r]
    assert len(rows) == 5
    for row in rows:
        assert float(row[-1]) < 1e-5, row  # every variant computes the same products as float64
        assert float(row[1]) > 0 and float(row[2]) > 0
