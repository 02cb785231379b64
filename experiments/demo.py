"""`make demo`: the paper's headline figure on ResNet-18, and the small CNN's targets, BatchNorm and certificates.

* ``reports/demo/resnet18/``: ResNet-18 (width 8, with BatchNorm) on the bundled digits upsampled to 32×32, clipped
  to 1 with FastClip, Gouk and Miyato, and not clipped, two seeds each: the violin of every layer's final σ (the
  paper's headline figure), accuracy and robustness. The full study (six methods, targets, BatchNorm modes, three
  seeds) is ``make study``.
* ``reports/demo/``: simple_conv clipped with FastClip, Gouk and Miyato to the targets 0.5, 1 and 2, and not
  clipped; then with BatchNorm, clipping the conv alone vs. the conv∘BN composition. Every model is attacked with
  FGSM and PGD, and certified: its Lipschitz bound and the accuracy it certifies at ℓ2 radii 0–1 beside the
  accuracy under PGD-ℓ2 at the same radii (conf/certify/default.yaml).

Twenty short trainings (four Hydra multiruns) on the CPU, about five minutes on 2 cores; no download. The runs use
one intra-op thread each (``OMP_NUM_THREADS=1`` unless it is set), the ResNet-18 runs two at a time: these models'
operators are small, and on a busy machine two threads waiting on each other made the trainings and the attack
loops several times slower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import report  # noqa: E402  (experiments/ is not a package)

#: (experiment preset, sweep name, overrides)
SWEEPS = [
    # ResNet-18: the methods at the paper's target, two seeds, two runs at a time
    ("resnet18_digits", "resnet18", ["clip=fastclip,gouk,miyato,none", "seed=0,1", "hydra/launcher=joblib_local"]),
    # simple_conv: the methods against each other at three targets (no BatchNorm), and no clipping
    ("demo", "clipped", ["clip=fastclip,gouk,miyato", "clip.target=0.5,1,2"]),
    ("demo", "none", ["clip=none"]),
    # simple_conv with BatchNorm: the conv clipped alone (BN can undo it) vs. the composition clipped as one map
    ("demo", "batchnorm", ["clip=fastclip", "clip.target=1", "bn=with,composed"]),
]


def run_multirun(experiment: str, overrides: Sequence[str], sweep_dir: Path) -> None:
    """Run ``experiments/train.py -m experiment=<experiment> <overrides>`` into ``sweep_dir``, one intra-op thread
    per run (unless ``OMP_NUM_THREADS`` is set), without progress bars; raise if it fails.

    Args:
        experiment: the preset in ``conf/experiment/``.
        overrides: Hydra overrides, sweeps included (``clip=fastclip,gouk``).
        sweep_dir: where the runs go (``hydra.sweep.dir``).
    """
    command = [
        sys.executable,
        str(ROOT / "experiments" / "train.py"),
        "-m",
        f"experiment={experiment}",
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
        "+trainer.enable_progress_bar=false",
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1", **os.environ})


def _fastclip_ratios(runs: list[Path]) -> None:
    """Print FastClip's largest σ/target over the maps it clips (ground truth in metrics.json; ≤ 1 is a hit)."""
    for path in sorted(p for r in runs for p in r.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        if metrics["method"] == "fastclip":
            norms = dict(metrics["spectral_norm"])
            if metrics["bn_mode"] == "bn_composed":  # the compositions are clipped too
                norms |= metrics["spectral_norm_composition"]
            ratio = max(s / metrics["target"] for s in norms.values())
            print(
                f"FastClip {metrics['model']} target {metrics['target']:g} ({metrics['bn_mode']}, seed "
                f"{metrics['seed']}): largest sigma/target over {len(norms)} maps = {ratio:.4f}"
            )


def main() -> None:
    """Run the sweeps (Hydra multiruns), then the two reports; print FastClip's worst σ/target (≤ 1 is a hit)."""
    out = ROOT / "reports" / "demo"
    runs = out / "runs"
    started = time.perf_counter()
    for experiment, name, overrides in SWEEPS:
        run_multirun(experiment, overrides, runs / name)
    small = [runs / name for experiment, name, _ in SWEEPS if experiment == "demo"]
    report.main([*map(str, small), "--out", str(out)])
    report.main([str(runs / "resnet18"), "--out", str(out / "resnet18")])
    _fastclip_ratios([runs / name for _, name, _ in SWEEPS])
    for run in report.load_runs(sorted(runs.rglob("metrics.json"))):
        for violation in run.violations():  # certified above PGD-ℓ2, or lower bound above upper: a bug somewhere
            print(f"IMPOSSIBLE CERTIFICATION in {run.path.parent}: {violation}")
    print(f"Demo: {time.perf_counter() - started:.0f} s")
    print(f"Reports: {out / 'resnet18' / 'report.md'} (ResNet-18), {out / 'report.md'} (simple_conv)")


if __name__ == "__main__":
    main()
