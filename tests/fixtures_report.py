"""Fake ``metrics.json`` files in the format ``experiments/train.py`` writes, for the report's tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
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
#: the 21 maps of the CIFAR ResNet-18 (stem, 16 block convs, 3 shortcuts, the classifier), as in experiments/study.py
RESNET_LAYERS = (
    ["net.conv1"]
    + [f"net.layer{s}.{b}.conv{c}" for s in range(1, 5) for b in (0, 1) for c in (1, 2)]
    + [f"net.layer{s}.0.shortcut.0" for s in range(2, 5)]
    + ["net.linear"]
)
#: the six methods of the study, in the report's order, and each one's fake clean accuracy at target 1
STUDY_ACC = {"fastclip": 0.93, "gouk": 0.9, "miyato": 0.91, "senderovich": 0.89, "gram": 0.92, "none": 0.95}


def fake_metrics(
    method: str, target: float | None, seed: int, acc: float, layers: Sequence[str] = LAYERS, bn_mode: str = "bn"
) -> dict[str, Any]:
    """One run's metrics: plausible per-layer σ, attacks, a conv∘BN history where BN grows.

    Args:
        method: clipping method.
        target: clip target (``None`` for ``none``).
        seed: seed, also seeds the fake numbers.
        acc: clean accuracy.
        layers: the names of the layers in ``spectral_norm`` (the first is the conv tracked in ``history``).
        bn_mode: the BatchNorm mode.

    Returns:
        dict[str, Any]: the content of a ``metrics.json``.

    Example:
        >>> fake_metrics("gouk", 1.0, 0, 0.9)["method"]
        'gouk'
    """
    rng = np.random.default_rng([sum(map(ord, method)), seed, int(100 * (target or 0))])
    c = 1.0 if target is None else target
    if method == "fastclip":
        sigma = c * (1 + rng.normal(0, 0.004, len(layers)))
    elif method == "gouk":
        sigma = c * rng.uniform(0.55, 1.15, len(layers))
    else:
        sigma = rng.uniform(2.0, 9.0, len(layers))
    steps = list(range(0, 301, 20))
    t = np.linspace(0, 1, len(steps))
    conv = 3.0 + 2 * t if method == "none" else np.where(t > 0, c, 3.0)
    bn = 1.0 + (1.5 / c) * t + rng.normal(0, 0.02, len(steps))
    comp = conv * bn * 0.9
    sigma[0] = conv[-1]  # the final ground truth of the tracked conv matches its history
    bn_name = layers[0].rsplit(".", 1)[0] + ".bn" + ("1" if layers[0].endswith("conv1") else "")
    return {
        "method": method,
        "target": target,
        "bn_mode": bn_mode,
        "model": "simple_conv",
        "data": "digits",
        "seed": seed,
        "test_acc": acc,
        "robust_acc": {"pgd": round(acc * (0.45 if method != "none" else 0.12), 4), "fgsm": round(acc * 0.6, 4)},
        "spectral_norm": dict(zip(layers, map(float, sigma), strict=True)),
        "spectral_norm_composition": {f"{layers[0]}+{bn_name}": float(comp[-1])},
        "spectral_norm_batchnorm": {bn_name: float(bn[-1])},
        "history": {
            "step": steps,
            "sigma": {
                layers[0]: [float(x) for x in conv],
                bn_name: [float(x) for x in bn],
                f"{layers[0]}+{bn_name}": [float(x) for x in comp],
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


def write_fake_study(
    root: Path,
    seeds: Sequence[int] = (0, 1, 2),
    layers: Sequence[str] = RESNET_LAYERS,
    full: bool = True,
    certified: bool = False,
) -> list[Path]:
    """Write runs shaped like ``experiments/study.py``'s below ``root`` (``<sweep>/<job>/metrics.json``).

    ``methods``: the six methods of :data:`STUDY_ACC` at target 1 with BatchNorm; with ``full``, also ``targets``
    (FastClip at 0.5 and 2) and ``batchnorm`` (FastClip at 1 without BatchNorm, composed and clipped). Each for
    every seed; the clean accuracy is the method's in :data:`STUDY_ACC`, lower at smaller targets, ± a point by
    seed.

    Args:
        root: the folder of the sweeps.
        seeds: the seeds of every configuration.
        layers: the layers of the model.
        full: add the ``targets`` and ``batchnorm`` sweeps.
        certified: add the fields of train.py's ``certify`` group (:func:`fake_certification`).

    Returns:
        list[Path]: the files written.

    Example:
        >>> import tempfile
        >>> len(write_fake_study(Path(tempfile.mkdtemp()), full=False))
        18
    """
    configs = [("methods", m, None if m == "none" else 1.0, "bn") for m in STUDY_ACC]
    if full:
        configs += [("targets", "fastclip", t, "bn") for t in (0.5, 2.0)]
        configs += [("batchnorm", "fastclip", 1.0, mode) for mode in ("no_bn", "bn_composed", "bn_clipped")]
    files = []
    jobs: dict[str, int] = {}
    for sweep, method, target, bn_mode in configs:
        for seed in seeds:
            job = jobs[sweep] = jobs.get(sweep, -1) + 1
            acc = STUDY_ACC[method] - 0.06 * (1 - (target or 1.0)) ** 2 + 0.01 * (seed - 1) * (1 + len(method) % 3)
            metrics = fake_metrics(method, target, seed, round(acc, 4), layers, bn_mode)
            metrics["model"], metrics["data"] = "ResNet18", "DigitsDataModule"
            if certified:
                metrics |= fake_certification(method, target, round(acc, 4))
            if bn_mode == "no_bn":
                metrics["spectral_norm_composition"], metrics["spectral_norm_batchnorm"] = {}, {}
                metrics["history"]["sigma"] = {layers[0]: metrics["history"]["sigma"][layers[0]]}
            directory = root / sweep / str(job)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / "metrics.json"
            path.write_text(json.dumps(metrics, indent=2))
            files.append(path)
    return files
