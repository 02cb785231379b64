"""Fake ``metrics.json`` files in the format ``experiments/train.py`` writes, for the report's tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

#: (method, target, seed, clean accuracy) of the fake runs; fastclip at 1.0 has two seeds.
RUNS: list[tuple[str, float | None, int, float]] = [
    ("fastclip", 0.5, 0, 0.881),
    ("fastclip", 1.0, 0, 0.912),
    ("fastclip", 1.0, 1, 0.934),
    ("gouk", 0.5, 0, 0.853),
    ("gouk", 1.0, 0, 0.897),
    ("none", None, 0, 0.962),
]
LAYERS = [f"net.layer{i}.conv" for i in range(12)] + ["net.fc"]


def fake_metrics(method: str, target: float | None, seed: int, acc: float) -> dict[str, Any]:
    """One run's metrics: plausible per-layer σ, attacks, a conv∘BN history where BN grows.

    Args:
        method: clipping method.
        target: clip target (``None`` for ``none``).
        seed: seed, also seeds the fake numbers.
        acc: clean accuracy.

    Returns:
        dict[str, Any]: the content of a ``metrics.json``.

    Example:
        >>> fake_metrics("gouk", 1.0, 0, 0.9)["method"]
        'gouk'
    """
    rng = np.random.default_rng([sum(map(ord, method)), seed, int(100 * (target or 0))])
    c = 1.0 if target is None else target
    if method == "fastclip":
        sigma = c * (1 + rng.normal(0, 0.004, len(LAYERS)))
    elif method == "gouk":
        sigma = c * rng.uniform(0.55, 1.15, len(LAYERS))
    else:
        sigma = rng.uniform(2.0, 9.0, len(LAYERS))
    steps = list(range(0, 301, 20))
    t = np.linspace(0, 1, len(steps))
    conv = 3.0 + 2 * t if method == "none" else np.where(t > 0, c, 3.0)
    bn = 1.0 + (1.5 / c) * t + rng.normal(0, 0.02, len(steps))
    comp = conv * bn * 0.9
    sigma[0] = conv[-1]  # the final ground truth of the tracked conv matches its history
    return {
        "method": method,
        "target": target,
        "bn_mode": "bn",
        "model": "simple_conv",
        "data": "digits",
        "seed": seed,
        "test_acc": acc,
        "robust_acc": {"pgd": round(acc * (0.45 if method != "none" else 0.12), 4), "fgsm": round(acc * 0.6, 4)},
        "spectral_norm": dict(zip(LAYERS, map(float, sigma), strict=True)),
        "spectral_norm_composition": {"net.layer0.conv+net.layer0.bn": float(comp[-1])},
        "spectral_norm_batchnorm": {"net.layer0.bn": float(bn[-1])},
        "history": {
            "step": steps,
            "sigma": {
                "net.layer0.conv": [float(x) for x in conv],
                "net.layer0.bn": [float(x) for x in bn],
                "net.layer0.conv+net.layer0.bn": [float(x) for x in comp],
            },
        },
        "epoch_time_s": 1.5 + 0.1 * seed,
        "config": {"clip": {"target": target}, "seed": seed},
    }


def write_fake_runs(root: Path) -> list[Path]:
    """Write :data:`RUNS` as a Hydra multirun below ``root`` (``<job>/metrics.json``, one sweep nested deeper).

    Args:
        root: the multirun directory.

    Returns:
        list[Path]: the files written.

    Example:
        >>> import tempfile
        >>> len(write_fake_runs(Path(tempfile.mkdtemp())))
        6
    """
    files = []
    for job, (method, target, seed, acc) in enumerate(RUNS):
        directory = root / ("sweep2" if job >= 4 else "") / str(job)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "metrics.json"
        path.write_text(json.dumps(fake_metrics(method, target, seed, acc), indent=2))
        files.append(path)
    return files
