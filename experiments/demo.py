"""`make demo`: train simple_conv on the bundled digits, clipped with FastClip, Gouk and Miyato to the targets
0.5, 1 and 2, and not clipped; then with BatchNorm, clipping the conv alone vs. the conv∘BN composition. Every
model is attacked with FGSM and PGD, and certified: its Lipschitz bound and the accuracy it certifies at ℓ2 radii
0–1 beside the accuracy under PGD-ℓ2 at the same radii (conf/certify/default.yaml). The report with its figures,
certified_vs_eps.png among them, goes to reports/demo/.

Twelve short trainings (three Hydra multiruns) on the CPU, about a minute on 2 cores; no download. The runs use one
intra-op thread (``OMP_NUM_THREADS=1`` unless it is set): this model's operators are tiny, and on a busy machine
two threads waiting on each other made the trainings and the PGD-ℓ2 loops several times slower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import report  # noqa: E402  (experiments/ is not a package)

SWEEPS = {
    # the methods against each other at three targets (no BatchNorm)
    "clipped": ["clip=fastclip,gouk,miyato", "clip.target=0.5,1,2"],
    "none": ["clip=none"],
    # BatchNorm: the conv clipped alone (BN can undo it) vs. the composition clipped as one map
    "batchnorm": ["clip=fastclip", "clip.target=1", "bn=with,composed"],
}


def main() -> None:
    """Run the sweeps (Hydra multiruns), then the report; print FastClip's worst σ/target (≤ 1 is a hit)."""
    out = ROOT / "reports" / "demo"
    runs = out / "runs"
    for name, overrides in SWEEPS.items():
        command = [
            sys.executable,
            str(ROOT / "experiments" / "train.py"),
            "-m",
            "experiment=demo",
            *overrides,
            f"hydra.sweep.dir={runs / name}",
        ]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1", **os.environ})
    report.main([str(runs), "--out", str(out)])
    for path in sorted(runs.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        if metrics["method"] == "fastclip":
            norms = dict(metrics["spectral_norm"])
            if metrics["bn_mode"] != "bn":  # in mode "bn" only the conv alone is clipped; BN rescales it afterwards
                norms |= metrics["spectral_norm_composition"]
            ratio = max(s / metrics["target"] for s in norms.values())
            print(
                f"FastClip target {metrics['target']:g} ({metrics['bn_mode']}): "
                f"largest sigma/target over {len(norms)} maps = {ratio:.4f}"
            )
    for run in report.load_runs(sorted(runs.rglob("metrics.json"))):
        for violation in run.violations():  # certified above PGD-ℓ2, or lower bound above upper: a bug somewhere
            print(f"IMPOSSIBLE CERTIFICATION in {run.path.parent}: {violation}")
    print(f"Report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
