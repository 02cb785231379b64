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
#: ℓ2 radii of the fake certification (train.py's ``certify`` group), as metrics.json keys them
RADII = ["0", "0.1", "0.25", "0.5"]


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


def fake_certification(method: str, target: float | None, acc: float) -> dict[str, Any]:
    """The fields train.py's ``certify`` group adds: a sound one (certified ≤ PGD-ℓ2 at every radius, lower ≤ upper).

    The bound grows with the target (36 unclipped); certified accuracy falls linearly in ε·(1 + L), at least as
    fast as ``1 − ε``, and PGD-ℓ2 accuracy as ``exp(−ε) ≥ 1 − ε``, so the pair is ordered as it must be.

    Args:
        method: clipping method.
        target: clip target (``None`` for ``none``).
        acc: clean accuracy (both accuracies at ε = 0).

    Returns:
        dict[str, Any]: ``lipschitz``, ``certified_acc``, ``pgd_l2_acc``.

    Example:
        >>> fields = fake_certification("fastclip", 1.0, 0.9)
        >>> fields["lipschitz"], fields["certified_acc"]["0"] == fields["pgd_l2_acc"]["0"] == 0.9
        ({'upper': 2.7, 'lower': 1.89}, True)
    """
    upper = 36.0 if method == "none" or target is None else 2.7 * target
    return {
        "lipschitz": {"upper": upper, "lower": round(0.7 * upper, 4)},
        "certified_acc": {r: round(acc * max(0.0, 1 - float(r) * (1 + upper) / 1.5), 4) for r in RADII},
        "pgd_l2_acc": {r: round(acc * float(np.exp(-float(r))), 4) for r in RADII},
    }


def write_fake_runs(root: Path, certified: bool = False) -> list[Path]:
    """Write :data:`RUNS` as a Hydra multirun below ``root`` (``<job>/metrics.json``, one sweep nested deeper).

    Args:
        root: the multirun directory.
        certified: add the fields of train.py's ``certify`` group (:func:`fake_certification`); without, the
            files are those train.py wrote before it had the group.

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
        metrics = fake_metrics(method, target, seed, acc)
        if certified:
            metrics |= fake_certification(method, target, acc)
        path.write_text(json.dumps(metrics, indent=2))
        files.append(path)
    return files
