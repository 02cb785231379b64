"""`make study`: the paper's ResNet-18 comparisons on the bundled digits (32×32), three seeds each, then the report.

Every run is ``experiment=resnet18_digits`` (ResNet-18 of width 8 with BatchNorm, 6 epochs; see its config) with:

* ``methods``: FastClip, Gouk, Miyato, Senderovich (FFT), Gram (regularizer) and no clipping, at the paper's
  target 1 — the violin of every layer's final σ (the paper's headline figure), accuracy and robustness;
* ``targets``: FastClip at 0.5 and 2 as well — accuracy and robustness against the target;
* ``batchnorm``: FastClip at 1 without BatchNorm, with each conv∘BN composition clipped too, and with the
  BatchNorms' gains clamped — the paper's BatchNorm study (with BatchNorm, the convs alone, is in ``methods``).

Runs go two at a time on one thread each (Hydra's joblib launcher), into ``reports/study/runs``; the report (tables
with mean ± std over seeds and paired differences with 95% intervals, figures) into ``reports/study``. A relaunch
skips the runs that finished (each run resumes from its checkpoint). 22.7 minutes on 2 CPU cores; no download.

    python experiments/study.py                 # everything
    python experiments/study.py --sweeps methods --seeds 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import report  # noqa: E402  (experiments/ is not a package)
from demo import run_multirun  # noqa: E402

SWEEPS = {
    "methods": ["clip=fastclip,gouk,miyato,senderovich,gram,none"],
    "targets": ["clip=fastclip", "clip.target=0.5,2"],
    "batchnorm": ["clip=fastclip", "bn=none,composed,clipped"],
}
#: FastClip's final σ of every layer must be within this of its target, by the run's ground truth
TOLERANCE = 0.02


def fastclip_misses(runs: Path) -> list[str]:
    """Every FastClip run's layers whose final σ (ground truth in ``metrics.json``) is off its target by more than
    ``TOLERANCE``, relative, as one line each.

    Args:
        runs: the folder holding the runs.

    Returns:
        list[str]: the misses (empty when every layer of every FastClip run is within tolerance).
    """
    misses = []
    for path in sorted(runs.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        if metrics["method"] != "fastclip":
            continue
        target = metrics["target"]
        for name, sigma in metrics["spectral_norm"].items():
            if sigma > target * (1 + TOLERANCE):
                misses.append(f"{path.parent}: {name} σ={sigma:.4f} > target {target:g}·{1 + TOLERANCE:g}")
    return misses


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweeps (Hydra multiruns), then the report; print FastClip's worst σ/target.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        int: 0 when every FastClip layer is within ``TOLERANCE`` of its target, 1 otherwise.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "study")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    args = parser.parse_args(argv)
    runs = args.out / "runs"
    started = time.perf_counter()
    for name in args.sweeps:
        launcher = ["hydra/launcher=joblib_local", f"hydra.launcher.n_jobs={args.jobs}"]
        run_multirun("resnet18_digits", [*SWEEPS[name], f"seed={args.seeds}", *launcher], runs / name)
    report.main([str(runs), "--out", str(args.out)])
    misses = fastclip_misses(runs)
    print(f"Study: {time.perf_counter() - started:.0f} s; report: {args.out / 'report.md'}")
    for miss in misses:
        print("FASTCLIP MISSED ITS TARGET:", miss)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
