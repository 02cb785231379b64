"""`make demo`: train simple_conv on the bundled digits with FastClip (target 1) and without clipping, attack
both with FGSM and PGD, and write the report with its figures to reports/demo/.

Everything runs on the CPU in a few minutes; no download.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import report  # noqa: E402  (experiments/ is not a package)


def main() -> None:
    """Run the two trainings (a Hydra multirun), then the report; check FastClip hit its target."""
    out = ROOT / "reports" / "demo"
    runs = out / "runs"
    command = [
        sys.executable,
        str(ROOT / "experiments" / "train.py"),
        "-m",
        "experiment=demo",
        "clip=fastclip,none",
        f"hydra.sweep.dir={runs}",
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    report.main([str(runs), "--out", str(out)])
    for path in sorted(runs.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        if metrics["method"] == "fastclip":
            worst = max(abs(s / metrics["target"] - 1) for s in metrics["spectral_norm"].values())
            print(f"FastClip: largest |sigma/target - 1| over the layers = {worst:.2%}")
    print(f"Report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
