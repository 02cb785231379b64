"""Aggregate training runs into a Markdown table and the paper's figures.

Every ``metrics.json`` below the given run or multirun directories (as written by ``experiments/train.py``;
Hydra multiruns put one in each ``<multirun_dir>/<job_num>/``, nested deeper for several sweeps) is read and
the runs are grouped by (method, target, BatchNorm mode) — and by model and data set when those vary too.
Written into ``--out`` (by default the first path):

* ``report.md``: one row per group, means over its runs (seeds): clean accuracy, each attack's robust
  accuracy, the per-layer spectral norm σ (mean and max over the layers), the largest conv∘BN composition σ
  and BatchNorm gain when present, time per epoch; then FastClip minus each baseline paired over seeds (the same
  target, BatchNorm mode, model and data; the unclipped runs against every target): the mean difference of each
  quantity with its 95% Student's t interval; then links to the figures.
* ``violin_sigma.png``: the paper's headline figure, violins of the final per-layer σ per method (and
  target), a dashed line at each target.
* ``bn_sigma_over_training.png``: the paper's BatchNorm figure, σ of a conv, its BatchNorm and their
  composition over the training steps (only for runs that recorded a composition).
* ``accuracy_vs_target.png``: clean (solid, filled markers) and robust (dashed, one line style and marker fill
  per attack) accuracy against the clip target (evenly spaced, the methods side by side at each), one colour and
  marker per method, the unclipped ``none`` runs as labelled horizontal references.
* ``certified_vs_eps.png`` (runs certified by ``train.py``'s ``certify`` group only): accuracy against the ℓ2
  radius ε, certified (solid) and under PGD-ℓ2 (dashed), one colour and marker per group, a panel per clip
  target with the unclipped runs in each. The table then has the Lipschitz bound (upper, lower) and, per
  radius, the certified beside the PGD-ℓ2 accuracy; a run whose certified accuracy exceeds its PGD-ℓ2
  accuracy (impossible for a sound bound) or whose lower bound exceeds its upper bound is named in red.

This script is the command line; the work is done in ``experiments/reporting/``, one module a job (loading runs,
grouping them, paired statistics, the Markdown, the figures), whose public API it re-exports.

Usage::

    python experiments/report.py logs/multiruns/2024-05-01_12-00-00
    python experiments/report.py runs/a runs/b --out reports/ab
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# experiments/ is not a package: the report's modules live beside this script, in experiments/reporting/
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from reporting.accuracy_figures import plot_accuracy_vs_target, plot_certified_vs_eps  # noqa: E402
from reporting.figures import draw_figures  # noqa: E402
from reporting.groups import Group, group_runs  # noqa: E402
from reporting.markdown import REPORT_NAME, render_markdown, render_paired  # noqa: E402
from reporting.paired import (  # noqa: E402
    Difference,
    PairedRow,
    PairedTable,
    paired_difference,
    paired_differences,
)
from reporting.runs import Run, find_metrics, load_runs  # noqa: E402
from reporting.sigma_figures import plot_bn_sigma_over_training, plot_violin_sigma  # noqa: E402

# The public API of the report, re-exported for the scripts (demo.py, study.py) and tests that import this file.
__all__ = [
    "Difference",
    "Group",
    "PairedRow",
    "PairedTable",
    "Run",
    "find_metrics",
    "group_runs",
    "load_runs",
    "main",
    "paired_difference",
    "paired_differences",
    "plot_accuracy_vs_target",
    "plot_bn_sigma_over_training",
    "plot_certified_vs_eps",
    "plot_violin_sigma",
    "render_markdown",
    "render_paired",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Aggregate the metrics.json of training runs into report.md and the paper's figures."
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run or multirun directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the first path)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``report.md`` and the figures for the runs below the given directories.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        int: 0 on success.

    Raises:
        SystemExit: when no ``metrics.json`` is found or none can be read (with a message saying where it
            looked), or on bad arguments.

    Example:
        >>> main(["/nonexistent"])
        Traceback (most recent call last):
        ...
        SystemExit: no metrics.json found under /nonexistent (does not exist)...
    """
    args = _parser().parse_args(argv)
    files = find_metrics(args.paths)
    runs = load_runs(files)
    groups = group_runs(runs)
    first = args.paths[0]
    out: Path = args.out if args.out is not None else (first.parent if first.is_file() else first)
    out.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(groups, out)
    report = out / REPORT_NAME
    report.write_text(render_markdown(groups, figures, args.paths, len(files)))
    written = [name for name, reason in figures.items() if reason is None]
    print(f"report: {len(runs)} runs in {len(groups)} groups → {report} ({', '.join(written) or 'no figures'})")
    for name, reason in figures.items():
        if reason is not None:
            print(f"report: {name} not drawn: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
