"""Smoke test of the clipper-cost benchmark: a tiny run completes and its counts say what they should."""

from __future__ import annotations

from pathlib import Path

from scripts import load_script

from lightning_specclip.spectral import operator, power


def test_tiny_events_benchmark(tmp_path: Path) -> None:
    apply, grouped = operator.ImplicitLinear.apply, power.Grams.__call__
    bench = load_script("bench_events.py")
    out = tmp_path / "events.md"
    args = ["--width", "2", "--batch-size", "4", "--drift", "2", "--repeats", "1", "--methods", "fastclip"]
    text = bench.main([*args, "--out", str(out)])
    assert out.read_text().strip() == text.strip()
    rows = [r.strip("|").split("|") for r in text.splitlines() if r.startswith("| fastclip")]
    event, per_step, grouped_step, warmup = ([c.strip() for c in r] for r in rows)
    assert float(event[3]) > 1 and float(event[6]) <= 1.02  # it measured and clipped every layer
    assert per_step[1] == "per-step" and int(per_step[3]) == 21  # one product per map per step
    assert int(per_step[5]) == 0  # the per-step update never waits for the device
    assert grouped_step[1] == "per-step, grouped convolutions" and int(grouped_step[3]) == 21
    assert int(grouped_step[5]) == 0
    assert warmup[1] == "warm-up" and int(warmup[3]) > int(per_step[3])
    assert operator.ImplicitLinear.apply is apply  # the product counters are taken off again
    assert power.Grams.__call__ is grouped
