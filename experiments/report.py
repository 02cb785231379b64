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

Usage::

    python experiments/report.py logs/multiruns/2024-05-01_12-00-00
    python experiments/report.py runs/a runs/b --out reports/ab
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402
from scipy.stats import t as student_t  # noqa: E402

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

METRICS_NAME = "metrics.json"
REPORT_NAME = "report.md"
VIOLIN_NAME = "violin_sigma.png"
BN_NAME = "bn_sigma_over_training.png"
ACCURACY_NAME = "accuracy_vs_target.png"
CERTIFIED_NAME = "certified_vs_eps.png"
#: certified accuracy may exceed PGD-ℓ2 accuracy by this much (float32 rounding; one sample in a million is more)
CERTIFIED_TOL = 1e-6
#: the method whose paired differences against every other method (the baselines) the report gives
PAIRED_METHOD = "fastclip"
#: the confidence level of the paired differences' intervals
CONFIDENCE = 0.95

#: Display order of the methods (the paper's first, the unclipped reference last); others follow by name.
_CERTIFY_KEYS = ("certified_acc", "pgd_l2_acc")
METHOD_ORDER = ("fastclip", "gouk", "miyato", "senderovich", "gram", "none")
#: Display order of the BatchNorm modes.
BN_ORDER = ("bn", "no_bn", "bn_clipped", "bn_composed")
#: One colour and marker per method, stable across figures.
METHOD_STYLE = {
    "fastclip": ("#1f77b4", "o"),
    "gouk": ("#ff7f0e", "s"),
    "miyato": ("#2ca02c", "^"),
    "senderovich": ("#d62728", "D"),
    "gram": ("#9467bd", "v"),
    "none": ("#555555", "X"),
}
_EXTRA_STYLE = [("#8c564b", "P"), ("#e377c2", "*"), ("#17becf", "h"), ("#bcbd22", "<"), ("#7f7f7f", ">")]
#: Line styles of the accuracy curves: clean first, then one per attack.
_ATTACK_LINESTYLES = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]
#: Marker fills of the accuracy metrics: clean first, then one per attack (see ``_metric_marker``).
_METRIC_FILLS = ["full", "none", "bottom", "top", "left", "right"]
_MAX_BN_PANELS = 4
#: the widest row of panels in a figure (inches, its legend included), and the width of one violin (inches)
_MAX_ROW_WIDTH = 10.5
_VIOLIN_WIDTH = 1.0
#: more violins than this in a panel: narrower, their labels on one slanted line
_MANY_VIOLINS = 16
_DPI = 120
#: the smallest base font size (points)
_FONT = 10
#: figures are drawn to be read this wide (pixels), as the README shows them, with text at least this tall (pixels)
_READ_WIDTH_PX = 800
_READ_FONT_PX = 12


@dataclass
class Run:
    """One run's ``metrics.json``, with the fields the report uses normalised.

    Args:
        path: the ``metrics.json`` file.
        metrics: its parsed content.

    Example:
        >>> run = Run(Path("r/metrics.json"), {"method": "fastclip", "target": 1, "test_acc": 0.9})
        >>> run.method, run.target, run.bn_mode
        ('fastclip', 1.0, 'bn')
    """

    path: Path
    metrics: dict[str, Any]

    @property
    def method(self) -> str:
        """str: the clipping method's name."""
        return str(self.metrics.get("method") or "none")

    @property
    def target(self) -> float | None:
        """float | None: the clip target (``None`` for the unclipped method)."""
        target = self.metrics.get("target")
        return None if target is None or self.method == "none" else float(target)

    @property
    def bn_mode(self) -> str:
        """str: the BatchNorm mode."""
        return str(self.metrics.get("bn_mode") or "bn")

    @property
    def model(self) -> str:
        """str: the model's name."""
        return str(self.metrics.get("model") or "")

    @property
    def data(self) -> str:
        """str: the data set's name."""
        return str(self.metrics.get("data") or "")

    @property
    def seed(self) -> int | None:
        """int | None: the run's seed (``None`` when absent or not an integer); runs are paired by it."""
        seed = self.metrics.get("seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    def number(self, key: str) -> float | None:
        """A top-level numeric field, ``None`` when absent or not a finite number.

        Args:
            key: the field's name.

        Returns:
            float | None: its value.
        """
        return _finite(self.metrics.get(key))

    def mapping(self, key: str) -> dict[str, float]:
        """A ``name → number`` field with the non-finite entries dropped.

        Args:
            key: the field's name (``robust_acc``, ``spectral_norm``, ...).

        Returns:
            dict[str, float]: its finite entries.
        """
        raw = self.metrics.get(key) or {}
        out = {}
        if isinstance(raw, dict):
            for name, value in raw.items():
                number = _finite(value)
                if number is not None:
                    out[str(name)] = number
        return out

    def radii(self, key: str) -> dict[float, float]:
        """A ``radius → accuracy`` field (``certified_acc``, ``pgd_l2_acc``), its keys read as numbers.

        Args:
            key: the field's name.

        Returns:
            dict[float, float]: its finite entries whose key is a finite number, by radius.

        Example:
            >>> Run(Path("metrics.json"), {"certified_acc": {"0.1": 0.5, "x": 1.0}}).radii("certified_acc")
            {0.1: 0.5}
        """
        out = {}
        for name, value in self.mapping(key).items():
            try:
                radius = float(name)
            except ValueError:
                continue
            if math.isfinite(radius):
                out[radius] = value
        return out

    def excess_radii(self) -> list[float]:
        """The radii at which the certified accuracy exceeds the PGD-ℓ2 accuracy (by more than ``CERTIFIED_TOL``).

        Impossible for a sound bound: the certified samples resist every perturbation of that norm, the attack's
        included, and both accuracies are measured on the same samples.

        Returns:
            list[float]: the radii, ascending.

        Example:
            >>> metrics = {"certified_acc": {"0.5": 0.6, "1": 0.1}, "pgd_l2_acc": {"0.5": 0.4, "1": 0.3}}
            >>> Run(Path("metrics.json"), metrics).excess_radii()
            [0.5]
        """
        attacked = self.radii("pgd_l2_acc")
        certified = self.radii("certified_acc")
        return sorted(r for r, acc in certified.items() if r in attacked and acc > attacked[r] + CERTIFIED_TOL)

    def violations(self) -> list[str]:
        """What in this run's certification is impossible for a sound bound (empty when nothing is): certified
        above PGD-ℓ2 accuracy (:meth:`excess_radii`), an empirical lower bound above the certified upper bound.

        Returns:
            list[str]: one sentence per violation.

        Example:
            >>> metrics = {"certified_acc": {"0.5": 0.6}, "pgd_l2_acc": {"0.5": 0.4}}
            >>> Run(Path("metrics.json"), metrics).violations()
            ['at ε=0.5: certified 60.0 % > PGD-ℓ2 40.0 %']
        """
        found = []
        bound = self.mapping("lipschitz")
        upper, lower = bound.get("upper"), bound.get("lower")
        if upper is not None and lower is not None and lower > upper * (1 + CERTIFIED_TOL):
            found.append(f"Lipschitz lower bound {lower:.4g} > upper bound {upper:.4g}")
        certified, attacked = self.radii("certified_acc"), self.radii("pgd_l2_acc")
        for r in self.excess_radii():
            found.append(f"at ε={r:g}: certified {100 * certified[r]:.1f} % > PGD-ℓ2 {100 * attacked[r]:.1f} %")
        return found

    @property
    def history(self) -> tuple[list[float], dict[str, list[float]]]:
        """tuple[list[float], dict[str, list[float]]]: the recorded steps and σ series (``NaN`` for gaps)."""
        raw = self.metrics.get("history") or {}
        steps = [float(s) for s in raw.get("step") or []]
        sigma = {
            str(name): [v if (v := _finite(x)) is not None else math.nan for x in series]
            for name, series in (raw.get("sigma") or {}).items()
            if isinstance(series, list)
        }
        return steps, sigma


@dataclass
class Group:
    """The runs that share model, data, method, target and BatchNorm mode.

    Args:
        model: the model's name.
        data: the data set's name.
        method: the clipping method.
        target: the clip target, ``None`` for ``none``.
        bn_mode: the BatchNorm mode.
        runs: the runs.

    Example:
        >>> clipped, unclipped = Group("", "", "fastclip", 1.0, "bn"), Group("", "", "none", None, "bn")
        >>> clipped.sort_key() < unclipped.sort_key()
        True
    """

    model: str
    data: str
    method: str
    target: float | None
    bn_mode: str
    runs: list[Run] = field(default_factory=list)

    def sort_key(self) -> tuple[Any, ...]:
        """Order: model, data, method (paper order), target (``None`` last), BatchNorm mode.

        Returns:
            tuple[Any, ...]: a sort key.
        """
        return (
            self.model,
            self.data,
            _order(self.method, METHOD_ORDER),
            (self.target is None, self.target or 0.0),
            _order(self.bn_mode, BN_ORDER),
        )

    def values(self, key: str) -> list[float]:
        """The finite values of a top-level numeric field over the runs.

        Args:
            key: the field's name.

        Returns:
            list[float]: one value per run that has it.
        """
        return [v for run in self.runs if (v := run.number(key)) is not None]

    def per_run(self, key: str, reduce: str) -> list[float]:
        """One statistic per run of a ``name → number`` field.

        Args:
            key: the field's name.
            reduce: ``"mean"`` or ``"max"`` over the entries of one run.

        Returns:
            list[float]: one value per run with a non-empty field.
        """
        out = []
        for run in self.runs:
            entries = list(run.mapping(key).values())
            if entries:
                out.append(statistics.fmean(entries) if reduce == "mean" else max(entries))
        return out

    def attack(self, name: str) -> list[float]:
        """Robust accuracies of one attack over the runs.

        Args:
            name: the attack's name.

        Returns:
            list[float]: one fraction per run that evaluated it.
        """
        return [acc[name] for run in self.runs if name in (acc := run.mapping("robust_acc"))]

    def at_radius(self, key: str, radius: float) -> list[float]:
        """Accuracies at one radius over the runs.

        Args:
            key: ``certified_acc`` or ``pgd_l2_acc``.
            radius: the ℓ2 radius ε.

        Returns:
            list[float]: one fraction per run that measured it.
        """
        return [acc[radius] for run in self.runs if radius in (acc := run.radii(key))]

    def pooled(self, key: str) -> list[float]:
        """All values of a ``name → number`` field over all runs (the violins' data).

        Args:
            key: the field's name.

        Returns:
            list[float]: the pooled values.
        """
        return [v for run in self.runs for v in run.mapping(key).values()]


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _order(name: str, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(name) if name in order else len(order), name)


def _style(method: str, known: Sequence[str]) -> tuple[str, str]:
    if method in METHOD_STYLE:
        return METHOD_STYLE[method]
    extra = sorted(m for m in known if m not in METHOD_STYLE)
    return _EXTRA_STYLE[extra.index(method) % len(_EXTRA_STYLE)] if method in extra else _EXTRA_STYLE[0]


def _fmt_target(target: float | None) -> str:
    return "–" if target is None else f"{target:g}"


def find_metrics(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``metrics.json`` below the given directories (a path may also name the file itself).

    Args:
        paths: run or multirun directories.

    Returns:
        list[Path]: the files, sorted and without duplicates.

    Raises:
        SystemExit: when none is found, naming the paths searched (and those that do not exist).

    Example:
        >>> find_metrics(["/nonexistent"])
        Traceback (most recent call last):
        ...
        SystemExit: no metrics.json found under /nonexistent (does not exist)...
    """
    paths = [Path(p) for p in paths]
    found: set[Path] = set()
    for path in paths:
        if path.is_file() and path.name == METRICS_NAME:
            found.add(path.resolve())
        elif path.is_dir():
            found.update(p.resolve() for p in path.rglob(METRICS_NAME) if p.is_file())
    if not found:
        where = ", ".join(f"{p} (does not exist)" if not p.exists() else str(p) for p in paths)
        raise SystemExit(
            f"no {METRICS_NAME} found under {where}; pass the run or multirun directory that "
            "experiments/train.py wrote (its Hydra output directory)"
        )
    return sorted(found)


def load_runs(files: Iterable[Path]) -> list[Run]:
    """Parse ``metrics.json`` files; unreadable ones are skipped with a message on stderr.

    Args:
        files: the files.

    Returns:
        list[Run]: the runs that could be read.

    Raises:
        SystemExit: when none of the files could be read.

    Example:
        >>> load_runs([])
        Traceback (most recent call last):
        ...
        SystemExit: none of the 0 metrics.json files could be read
    """
    files = list(files)
    runs = []
    for path in files:
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            print(f"report: skipping {path}: {error}", file=sys.stderr)
            continue
        if not isinstance(metrics, dict):
            print(f"report: skipping {path}: not a JSON object", file=sys.stderr)
            continue
        runs.append(Run(path, metrics))
    if not runs:
        raise SystemExit(f"none of the {len(files)} {METRICS_NAME} files could be read")
    return runs


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Group runs by (model, data, method, target, BatchNorm mode), in report order.

    Args:
        runs: the runs.

    Returns:
        list[Group]: the groups, sorted by :meth:`Group.sort_key`.

    Example:
        >>> runs = [Run(Path(f"{s}/metrics.json"), {"method": "gouk", "target": 1, "seed": s}) for s in (0, 1)]
        >>> [(g.method, len(g.runs)) for g in group_runs(runs)]
        [('gouk', 2)]
    """
    groups: dict[tuple[Any, ...], Group] = {}
    for run in runs:
        key = (run.model, run.data, run.method, run.target, run.bn_mode)
        groups.setdefault(key, Group(*key)).runs.append(run)
    return sorted(groups.values(), key=Group.sort_key)


def _varying(groups: Sequence[Group], *fields: str) -> list[str]:
    return [f for f in fields if len({getattr(g, f) for g in groups}) > 1]


def _label(group: Group, fields: Sequence[str], sep: str = " ") -> str:
    parts = []
    for name in fields:
        value = getattr(group, name)
        if name == "target":
            if value is not None:
                parts.append(f"c={value:g}")
        elif value:
            parts.append(str(value))
    return sep.join(parts)


def _attacks(groups: Sequence[Group]) -> list[str]:
    names = {name for g in groups for run in g.runs for name in run.mapping("robust_acc")}
    return sorted(names)


def _radii(groups: Sequence[Group]) -> list[float]:
    """The ℓ2 radii at which any run measured certified or PGD-ℓ2 accuracy, ascending."""
    return sorted({r for g in groups for run in g.runs for key in _CERTIFY_KEYS for r in run.radii(key)})


def _bounds(group: Group, which: str) -> list[float]:
    """The Lipschitz bound ``upper`` or ``lower`` of each run that has it."""
    return [b[which] for run in group.runs if which in (b := run.mapping("lipschitz"))]


def _run_name(run: Run, sources: Sequence[Path]) -> str:
    """The run's directory, relative to the source directory it was found under when possible."""
    directory = run.path.parent
    for source in sources:
        base = source.resolve()
        base = base.parent if base.is_file() else base
        if directory.is_relative_to(base):
            relative = directory.relative_to(base)
            return str(Path(base.name) / relative) if str(relative) != "." else base.name
    return str(directory)


def _red(text: str) -> str:
    return f'<span style="color:red">{text}</span>'


def _pct(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    if len(values) > 1:
        return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"
    return f"{mean:.1f}"


def _num(values: Sequence[float], fmt: str = ".3f") -> str:
    return f"{statistics.fmean(values):{fmt}}" if values else "–"


@dataclass(frozen=True)
class Difference:
    """The mean of paired differences and its confidence interval.

    Args:
        mean: the mean of the differences.
        n: the number of pairs.
        low: the interval's lower end, ``None`` when ``n < 2``.
        high: the interval's upper end, ``None`` when ``n < 2``.

    Example:
        >>> Difference(0.02, 1).low is None
        True
    """

    mean: float
    n: int
    low: float | None = None
    high: float | None = None


def paired_difference(
    a: Mapping[Any, float], b: Mapping[Any, float], confidence: float = CONFIDENCE
) -> Difference | None:
    """The mean of ``a[k] − b[k]`` over the keys (seeds) in both, with Student's t interval.

    The interval is ``mean ± t.ppf((1 + confidence) / 2, n − 1) · sd / √n``, ``sd`` the sample standard deviation
    of the ``n`` differences; none for ``n < 2``.

    Args:
        a: value by seed on one side.
        b: value by seed on the other.
        confidence: the interval's confidence level.

    Returns:
        Difference | None: the mean and interval, ``None`` when no key is in both.

    Example:
        >>> d = paired_difference({0: 0.90, 1: 0.92, 2: 0.94}, {0: 0.89, 1: 0.90, 2: 0.91, 3: 0.5})
        >>> d.n, round(d.mean, 4), round(d.low, 4), round(d.high, 4)
        (3, 0.02, -0.0048, 0.0448)
        >>> paired_difference({0: 1.0}, {0: 0.5}), paired_difference({0: 1.0}, {1: 0.5})
        (Difference(mean=0.5, n=1, low=None, high=None), None)
    """
    diffs = [a[k] - b[k] for k in sorted(set(a) & set(b))]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Difference(mean, len(diffs))
    half = float(student_t.ppf((1 + confidence) / 2, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Difference(mean, len(diffs), mean - half, mean + half)


@dataclass(frozen=True)
class PairedRow:
    """The paired differences of :data:`PAIRED_METHOD` minus one baseline at one configuration.

    Args:
        baseline: the baseline method.
        target: the clip target (of :data:`PAIRED_METHOD`; the baseline ``none`` has none).
        bn_mode: the BatchNorm mode.
        model: the model's name.
        data: the data set's name.
        seeds: the seeds run on both sides.
        cells: column label → the difference, ``None`` where no pair has the quantity.

    Example:
        >>> PairedRow("gouk", 1.0, "bn", "", "", (0,), {}).seeds
        (0,)
    """

    baseline: str
    target: float
    bn_mode: str
    model: str
    data: str
    seeds: tuple[int, ...]
    cells: dict[str, Difference | None]


@dataclass(frozen=True)
class PairedTable:
    """The paired differences of :data:`PAIRED_METHOD` against every baseline.

    Args:
        columns: (label, in percentage points) of each quantity, in display order.
        rows: one per baseline and configuration, in display order.

    Example:
        >>> PairedTable([], []).rows
        []
    """

    columns: list[tuple[str, bool]]
    rows: list[PairedRow]


def _quantities(groups: Sequence[Group]) -> list[tuple[str, bool, Callable[[Run], float | None]]]:
    """(label, in percentage points, value of a run) of each quantity the paired table compares."""

    def entry(key: str, name: Any) -> Callable[[Run], float | None]:
        return lambda run: (run.radii(key) if key in _CERTIFY_KEYS else run.mapping(key)).get(name)

    out: list[tuple[str, bool, Callable[[Run], float | None]]] = [
        ("clean acc (pp)", True, lambda run: run.number("test_acc"))
    ]
    out += [(f"{a} acc (pp)", True, entry("robust_acc", a)) for a in _attacks(groups)]
    for r in _radii(groups):
        out += [(f"ε={r:g} certified (pp)", True, entry("certified_acc", r))]
        out += [(f"ε={r:g} PGD-ℓ2 (pp)", True, entry("pgd_l2_acc", r))]
    out.append(("σ layer max", False, lambda run: max(run.mapping("spectral_norm").values(), default=None)))
    return out


def _by_seed(runs: Iterable[Run], value: Callable[[Run], float | None]) -> dict[int, float]:
    """A quantity by seed: the runs with a seed and the quantity, the mean where several share a seed."""
    found: dict[int, list[float]] = {}
    for run in runs:
        if run.seed is not None and (v := value(run)) is not None:
            found.setdefault(run.seed, []).append(v)
    return {seed: statistics.fmean(values) for seed, values in found.items()}


def paired_differences(groups: Sequence[Group], method: str = PAIRED_METHOD) -> PairedTable:
    """``method`` minus each baseline, paired over seeds, for every quantity of the report.

    A baseline is every other method with runs at the same (target, BatchNorm mode, model, data) as ``method``;
    one without a target (the unclipped ``none``) is paired with ``method`` at each of its targets with the same
    BatchNorm mode, model and data. Runs are paired by their ``seed`` (only seeds on both sides count; runs
    without one are left out; several runs of one seed are averaged); quantities: clean accuracy, each attack's
    robust accuracy, certified and PGD-ℓ2 accuracy at each radius, the largest per-layer σ. See
    :func:`paired_difference` for the interval.

    Args:
        groups: the groups.
        method: the method compared against the others.

    Returns:
        PairedTable: the columns that some row has, the rows with at least one shared seed.

    Example:
        >>> runs = [
        ...     Run(Path(f"{m}{s}/metrics.json"), {"method": m, "target": 1, "seed": s, "test_acc": acc})
        ...     for m, s, acc in [("fastclip", 0, 0.9), ("fastclip", 1, 0.92), ("gouk", 0, 0.89), ("gouk", 1, 0.9)]
        ... ]
        >>> table = paired_differences(group_runs(runs))
        >>> row = table.rows[0]
        >>> row.baseline, row.seeds, round(row.cells["clean acc (pp)"].mean, 4), table.columns
        ('gouk', (0, 1), 0.015, [('clean acc (pp)', True)])
    """
    quantities = _quantities(groups)
    rows = []
    for ours in (g for g in groups if g.method == method and g.target is not None):
        for base in groups:
            where = (base.bn_mode, base.model, base.data) == (ours.bn_mode, ours.model, ours.data)
            if base.method == method or not where or base.target not in (ours.target, None):
                continue
            seeds = {r.seed for r in ours.runs} & {r.seed for r in base.runs} - {None}
            if not seeds:
                continue
            cells = {
                label: paired_difference(_by_seed(ours.runs, value), _by_seed(base.runs, value))
                for label, _, value in quantities
            }
            row = PairedRow(base.method, ours.target, ours.bn_mode, ours.model, ours.data, tuple(sorted(seeds)), cells)
            rows.append(row)
    rows.sort(key=lambda r: (r.model, r.data, _order(r.baseline, METHOD_ORDER), r.target, _order(r.bn_mode, BN_ORDER)))
    columns = [(label, pct) for label, pct, _ in quantities if any(r.cells[label] for r in rows)]
    return PairedTable(columns, rows)


def _signed(value: float, fmt: str) -> str:
    """``value`` with its sign (a true minus), none for an exact zero.

    Example:
        >>> _signed(2.345, ".1f"), _signed(-0.01, ".1f"), _signed(0.0, ".1f")
        ('+2.3', '−0.0', '0.0')
    """
    return f"{value:{fmt}}" if value == 0 else f"{value:+{fmt}}".replace("-", "−")


def _difference_cell(d: Difference | None, percent: bool, n: int) -> str:
    """``+2.3 [−0.4, +5.0]`` (percentage points for accuracies), ``[n/a]`` for one pair; the cell's n if not n."""
    if d is None:
        return "–"
    scale, fmt = (100.0, ".1f") if percent else (1.0, ".3f")
    interval = (
        "n/a" if d.low is None or d.high is None else f"{_signed(scale * d.low, fmt)}, {_signed(scale * d.high, fmt)}"
    )
    return f"{_signed(scale * d.mean, fmt)} [{interval}]" + (f" (n={d.n})" if d.n != n else "")


def render_paired(table: PairedTable, method: str = PAIRED_METHOD) -> list[str]:
    """The Markdown section of the paired differences: a heading, how to read it, the table.

    Args:
        table: the differences (:func:`paired_differences`).
        method: the method compared against the others.

    Returns:
        list[str]: the lines, none when the table has no row.

    Example:
        >>> cells = {"clean acc (pp)": Difference(0.02, 3, -0.005, 0.045)}
        >>> row = PairedRow("gouk", 1.0, "bn", "", "", (0, 1, 2), cells)
        >>> render_paired(PairedTable([("clean acc (pp)", True)], [row]))[-1]
        '| gouk | 1 | bn | 3 | +2.0 [−0.5, +4.5] |'
    """
    if not table.rows:
        return []
    extra = [f for f in ("model", "data") if len({getattr(r, f) for r in table.rows}) > 1]
    header = [*extra, "baseline", "target", "BN mode", "n", *(label for label, _ in table.columns)]
    name = "FastClip" if method == "fastclip" else method
    lines = [
        "",
        f"## {name} − baseline, paired over seeds",
        "",
        f"Each cell is the mean over the n seeds run by both of {name} minus the baseline at the same clip target, "
        "BatchNorm mode, model and data (the unclipped `none` against each target), in percentage points (pp) for "
        f"accuracies and plain for σ (positive: {name} higher), and in brackets its {100 * CONFIDENCE:g}% "
        "confidence interval (Student's t, n − 1 degrees of freedom; n/a when n < 2, a cell's own n in parentheses "
        f"when some runs lack the quantity): an interval that excludes 0 is a difference at the {100 * CONFIDENCE:g}% "
        "level, each cell on its own.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < len(extra) + 3 else "---:" for i in range(len(header))) + "|",
    ]
    for r in table.rows:
        row = [getattr(r, e) for e in extra] + [r.baseline, _fmt_target(r.target), r.bn_mode, str(len(r.seeds))]
        row += [_difference_cell(r.cells.get(label), pct, len(r.seeds)) for label, pct in table.columns]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render_markdown(
    groups: Sequence[Group], figures: dict[str, str | None], sources: Sequence[Path], n_files: int
) -> str:
    """The text of ``report.md``.

    Args:
        groups: the groups, in display order.
        figures: figure file name → ``None`` when written, else the reason it was not.
        sources: the directories the runs were collected from.
        n_files: how many ``metrics.json`` files were found.

    Returns:
        str: Markdown.

    Example:
        >>> run = Run(Path("metrics.json"), {"method": "none", "test_acc": 0.5})
        >>> "| none | – | bn | 1 | 50.0 |" in render_markdown(group_runs([run]), {}, [Path(".")], 1)
        True
    """
    extra = _varying(groups, "model", "data")
    attacks = _attacks(groups)
    has_comp = any(run.mapping("spectral_norm_composition") for g in groups for run in g.runs)
    has_bn = any(run.mapping("spectral_norm_batchnorm") for g in groups for run in g.runs)
    has_bound = any(run.mapping("lipschitz") for g in groups for run in g.runs)
    radii = _radii(groups)
    n_runs = sum(len(g.runs) for g in groups)

    header = [*(e for e in extra), "method", "target", "BN mode", "n", "clean acc (%)"]
    header += [f"{a} acc (%)" for a in attacks]
    header += ["L upper", "L lower"] if has_bound else []
    header += [f"ε={r:g}: certified / PGD-ℓ2 (%)" for r in radii]
    header += ["σ layer mean", "σ layer max"]
    header += ["σ conv∘BN max"] if has_comp else []
    header += ["BN gain max"] if has_bn else []
    header += ["epoch time (s)"]
    lines = [
        "# Spectral clipping report",
        "",
        f"{n_runs} runs ({n_files} `{METRICS_NAME}` files) from "
        + ", ".join(f"`{s}`" for s in sources)
        + f", in {len(groups)} groups. Values are means over the runs of a group (n); accuracies in %, "
        "± the standard deviation over runs when n > 1. σ: the ground-truth spectral norm of the final weights; "
        "*σ layer mean/max* is the mean/max over a run's layers, averaged over runs"
        + ("; *σ conv∘BN max* the largest conv∘BatchNorm composition" if has_comp else "")
        + ("; *BN gain max* the largest BatchNorm gain max |γ|/√(var+ε)" if has_bn else "")
        + "."
        + (
            " *L upper*: the certified bound on the ℓ2 Lipschitz constant of input → logits (eval mode), composed "
            "from exact per-layer norms; *L lower*: an empirical lower bound (largest difference quotient at a test "
            "batch)."
            if has_bound
            else ""
        )
        + (
            " *ε: certified / PGD-ℓ2*: the accuracy certified at ℓ2 radius ε (logit margin > √2·L·ε) beside the "
            "accuracy under PGD-ℓ2 at the same radius, on the same samples; inputs in [0, 1], ℓ2 over the image. "
            "Certified can never exceed PGD-ℓ2."
            if radii
            else ""
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < len(extra) + 3 else "---:" for i in range(len(header))) + "|",
    ]
    for g in groups:
        row = [getattr(g, e) for e in extra] + [g.method, _fmt_target(g.target), g.bn_mode, str(len(g.runs))]
        row.append(_pct(g.values("test_acc")))
        row += [_pct(g.attack(a)) for a in attacks]
        row += [_num(_bounds(g, "upper"), "#.3g"), _num(_bounds(g, "lower"), "#.3g")] if has_bound else []
        excess = {r for run in g.runs for r in run.excess_radii()}
        for r in radii:
            cell = f"{_pct(g.at_radius('certified_acc', r))} / {_pct(g.at_radius('pgd_l2_acc', r))}"
            row.append(_red(cell) if r in excess else cell)
        row += [_num(g.per_run("spectral_norm", "mean")), _num(g.per_run("spectral_norm", "max"))]
        row += [_num(g.per_run("spectral_norm_composition", "max"))] if has_comp else []
        row += [_num(g.per_run("spectral_norm_batchnorm", "max"))] if has_bn else []
        row.append(_num(g.values("epoch_time_s"), ".2f"))
        lines.append("| " + " | ".join(row) + " |")

    captions = {
        VIOLIN_NAME: "Final per-layer spectral norms per method (violins; dashed lines: targets)",
        BN_NAME: "σ of a conv, its BatchNorm and their composition over training",
        ACCURACY_NAME: "Clean and robust accuracy vs. clip target",
        CERTIFIED_NAME: "Certified (solid) and PGD-ℓ2 (dashed) accuracy vs. ℓ2 radius ε",
    }
    violations = [(run, v) for g in groups for run in g.runs for v in run.violations()]
    if violations:
        lines += [
            "",
            _red(
                f"**Impossible certification in {len({id(run) for run, _ in violations})} run(s)**: certified "
                "accuracy above the accuracy under PGD-ℓ2 at the same radius, or a Lipschitz lower bound above the "
                "upper bound — the bound (or the evaluation) is wrong:"
            ),
            "",
        ]
        lines += [f"- {_red(f'run `{_run_name(run, sources)}`: {v}')}" for run, v in violations]
    lines += render_paired(paired_differences(groups))
    lines += ["", "## Figures", ""]
    for name, caption in captions.items():
        if name not in figures:
            continue
        reason = figures[name]
        if reason is None:
            lines += [f"- {caption}: `{name}`", "", f"  ![{caption}]({name})", ""]
        else:
            lines += [f"- {caption}: not drawn — {reason}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def _font_size(width: float) -> int:
    """The base font size (points) of a figure ``width`` inches wide: at least ``_FONT``, and large enough that its
    text stays ``_READ_FONT_PX`` pixels tall when the PNG is shown ``_READ_WIDTH_PX`` wide (as in a README), up to
    ``_FONT + 4`` (a figure wider than that allows is not meant to be read at that width).

    Example:
        >>> _font_size(8.0), _font_size(12.0), _font_size(30.0)
        (10, 13, 14)
    """
    return min(max(_FONT, math.ceil(_READ_FONT_PX * width * 72 / _READ_WIDTH_PX - 1e-9)), _FONT + 4)


def _setup_fonts(width: float = 0.0) -> int:
    """Set matplotlib's font sizes for a figure ``width`` inches wide (legends included); return the base size."""
    size = _font_size(width)
    plt.rcParams.update(
        {
            "font.size": size,
            "axes.titlesize": size + 1,
            "axes.labelsize": size + 1,
            "xtick.labelsize": size,
            "ytick.labelsize": size,
            "legend.fontsize": size - 1,
            "legend.title_fontsize": size,
            "figure.titlesize": size + 2,
        }
    )
    return size


def _panel_rows(widths: Sequence[float], max_row: float) -> list[list[int]]:
    """Pack panels of the given widths (inches) left to right into rows of at most ``max_row`` inches.

    Example:
        >>> _panel_rows([8.5, 2.8, 2.8, 2.8], 8.5)
        [[0], [1, 2, 3]]
    """
    rows: list[list[int]] = []
    for i, width in enumerate(widths):
        if rows and sum(widths[j] for j in rows[-1]) + width <= max_row + 1e-9:
            rows[-1].append(i)
        else:
            rows.append([i])
    return rows


def _panel_axes(
    widths: Sequence[float], height: float, max_row: float, legend: float = 0.0
) -> tuple[plt.Figure, list[Any], list[int]]:
    """A figure whose panels have the given widths (inches, as a share of their row), packed into rows of at
    most ``max_row`` inches (:func:`_panel_rows`), left-aligned; constrained layout, with ``legend`` inches more
    for a legend beside the panels; fonts sized for the figure's width (:func:`_setup_fonts`). The axes do not
    share y (shared across subfigures, every change of limits redraws the whole figure): give them the same
    limits, or :func:`_same_ylim` once drawn.

    Returns:
        tuple[plt.Figure, list[Any], list[int]]: the figure, the axes (one per width), the row of each.
    """
    rows = _panel_rows(widths, max_row)
    total = max(sum(widths[j] for j in row) for row in rows)
    _setup_fonts(total + legend)
    fig = plt.figure(figsize=(total + legend, height * len(rows)), layout="constrained")
    subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0] if len(rows) > 1 else [fig]
    axes: list[Any] = [None] * len(widths)
    row_of = [0] * len(widths)
    for r, (row, sub) in enumerate(zip(rows, subfigs, strict=True)):
        used = sum(widths[j] for j in row)
        ratios = [widths[j] for j in row] + ([total - used] if total - used > 1e-6 else [])
        created = sub.subplots(1, len(ratios), width_ratios=ratios, squeeze=False)[0]
        for j, ax in zip(row, created, strict=False):
            axes[j], row_of[j] = ax, r
        for ax in created[len(row) :]:
            ax.set_visible(False)
    return fig, axes, row_of


def _same_ylim(axes: Sequence[Any]) -> None:
    """Give the axes the y limits that hold all of their data."""
    limits = [ax.get_ylim() for ax in axes]
    low, high = min(lo for lo, _ in limits), max(hi for _, hi in limits)
    for ax in axes:
        ax.set_ylim(low, high)


def _save(fig: plt.Figure, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    if fig.get_layout_engine() is None:
        fig.tight_layout(rect=rect)
    # bbox_inches="tight" keeps the legends placed outside the axes inside the image.
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


def _draw_violins(
    ax: Any, data: Sequence[tuple[Group, list[float]]], methods: Sequence[str], fields: list[str]
) -> None:
    """Violins (one per group), the layers as dots, dashed target lines over each cluster of one target."""
    positions = list(range(1, len(data) + 1))
    shown = [g for g, _ in data]
    for pos, (g, values) in zip(positions, data, strict=True):
        color, marker = _style(g.method, methods)
        # A kernel density of fewer than 4 values misleads: show those as dots with a median bar.
        drawn = len(values) >= 4 and max(values) - min(values) > 1e-9 * max(1.0, abs(max(values)))
        if drawn:
            parts = ax.violinplot([values], positions=[pos], widths=0.8, showextrema=False, showmedians=True)
            for body in parts["bodies"]:
                body.set_facecolor(color)
                body.set_edgecolor("black")
                body.set_alpha(0.55)
            parts["cmedians"].set_color("black")
        else:
            ax.hlines(statistics.median(values), pos - 0.3, pos + 0.3, colors="black", linewidth=1.5, zorder=2.6)
        offsets = [0.18 * ((i * 0.618034) % 1.0 - 0.5) for i in range(len(values))]
        ax.scatter(
            [pos + o for o in offsets],
            values,
            s=14 if drawn else 40,
            color=color,
            marker=marker,
            edgecolor="black",
            linewidth=0.4,
            zorder=3,
        )
    for target in sorted({g.target for g in shown if g.target is not None}):
        xs = [pos for pos, g in zip(positions, shown, strict=True) if g.target == target]
        ax.hlines(target, min(xs) - 0.45, max(xs) + 0.45, colors="black", linestyles="--", linewidth=1.2, zorder=2.5)
    for pos, prev, cur in zip(positions[1:], shown, shown[1:], strict=False):
        if prev.target != cur.target:
            ax.axvline(pos - 0.5, color="0.8", linewidth=0.8)
    many = len(data) > _MANY_VIOLINS
    labels = [_label(g, fields, " " if many else "\n") for g in shown]
    ax.set_xticks(positions, labels, rotation=40 if many else 0, ha="right" if many else "center")
    ax.set_xlim(0.4, len(data) + 0.6)
    ax.set_ylabel("final σ of each layer")
    ax.grid(axis="y", alpha=0.3)


def plot_violin_sigma(groups: Sequence[Group], path: Path) -> str | None:
    """The paper's headline figure: violins of the final per-layer spectral norms of each group.

    One violin per method (× target when several), pooling the values of ``spectral_norm`` over the group's
    runs, with the individual layers as dots; the violins are clustered by target and a dashed line marks
    each cluster's target. One panel per BatchNorm mode (and model, data set) when those vary.

    Args:
        groups: the groups.
        path: the PNG to write.

    Returns:
        str | None: ``None`` when written, else why not.
    """
    data = [(g, g.pooled("spectral_norm")) for g in groups]
    data = [(g, v) for g, v in data if v]
    if not data:
        return "no run has per-layer spectral norms (`spectral_norm` is empty)"
    data.sort(key=lambda gv: ((gv[0].target is None, gv[0].target or 0.0), gv[0].sort_key()))
    shown = [g for g, _ in data]
    panel_fields = _varying(shown, "bn_mode", "model", "data")
    fields = ["method", *_varying(shown, "target")]
    panels: dict[tuple[Any, ...], list[tuple[Group, list[float]]]] = {}
    for g, values in data:
        panels.setdefault(tuple(getattr(g, f) for f in panel_fields), []).append((g, values))
    methods = sorted({g.method for g in shown})
    targets = sorted({g.target for g in shown if g.target is not None})
    # Panels side by side, as wide as their violins (two at least, for the title), in rows that fit the legend beside
    widths = [(_VIOLIN_WIDTH if len(p) <= _MANY_VIOLINS else 0.55) * max(len(p), 2) + 0.9 for p in panels.values()]
    widths = [max(widths[0], 5.0)] if len(widths) == 1 else widths
    legend_width = 1.8
    fig, axes, row_of = _panel_axes(widths, 4.2, _MAX_ROW_WIDTH - legend_width, legend_width)
    for i, (ax, (key, panel)) in enumerate(zip(axes, panels.items(), strict=True)):
        _draw_violins(ax, panel, methods, fields)
        if i and row_of[i - 1] == row_of[i]:
            ax.set_ylabel("")
        if panel_fields:
            ax.set_title(", ".join(f"{f.replace('_', ' ')}: {v}" for f, v in zip(panel_fields, key, strict=True)))
    fig.supxlabel("method" + (" and clip target c" if "target" in fields else ""))
    all_values = [v for _, vals in data for v in vals] + targets
    if min(all_values) > 0 and max(all_values) / min(all_values) > 30:
        for ax in axes:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    _same_ylim(axes)
    n_runs = sum(len(g.runs) for g in shown)
    fig.suptitle(f"Final per-layer spectral norms per method ({n_runs} runs, layers pooled over a group's runs)")
    handles = [
        Line2D(
            [],
            [],
            color=_style(m, methods)[0],
            marker=_style(m, methods)[1],
            linestyle="",
            markersize=8,
            markeredgecolor="black",
            label=m,
        )
        for m in sorted(methods, key=lambda m: _order(m, METHOD_ORDER))
    ]
    if targets:
        handles.append(Line2D([], [], color="black", linestyle="--", label="target c"))
    fig.legend(handles=handles, loc="outside right center", frameon=False)
    _save(fig, path)
    return None


def _composition_runs(groups: Sequence[Group]) -> list[tuple[Group, Run, str]]:
    """Runs with a conv∘BN composition in their history, chosen to differ in method, BN mode and target."""
    candidates: list[tuple[int, int, Group, Run, str]] = []
    for gi, g in enumerate(groups):
        for ri, run in enumerate(g.runs):
            steps, sigma = run.history
            comps = sorted(k for k in sigma if "+" in k and any(math.isfinite(v) for v in sigma[k]))
            if steps and comps:
                # The composition that peaks highest: the one clipping the conv alone controls least.
                comp = max(comps, key=lambda k: max((v for v in sigma[k] if math.isfinite(v)), default=0.0))
                candidates.append((ri, gi, g, run, comp))
    chosen: list[tuple[int, int, Group, Run, str]] = []

    # Greedy: the candidate sharing the fewest of method / BN mode / target with those already chosen.
    def overlap(item: tuple[int, int, Group, Run, str]) -> tuple[int, int, int]:
        g = item[2]
        same = sum((c[2].method == g.method) + (c[2].bn_mode == g.bn_mode) + (c[2].target == g.target) for c in chosen)
        return (same, item[0], item[1])

    while candidates and len(chosen) < _MAX_BN_PANELS:
        best = min(candidates, key=overlap)
        candidates.remove(best)
        chosen.append(best)
    chosen.sort(key=lambda item: (item[1], item[0]))
    return [(g, run, comp) for _, _, g, run, comp in chosen]


def plot_bn_sigma_over_training(groups: Sequence[Group], path: Path) -> str | None:
    """The paper's BatchNorm figure: σ over training of a conv, its BatchNorm and their composition.

    One panel per run that recorded a conv∘BN composition in ``history`` (at most four, one per group
    first); in each, the composition whose σ peaks highest, its conv and its BatchNorm, and the target.

    Args:
        groups: the groups.
        path: the PNG to write.

    Returns:
        str | None: ``None`` when written, else why not.
    """
    chosen = _composition_runs(groups)
    if not chosen:
        return "no run recorded a conv∘BatchNorm composition in its `history` (models without BatchNorm?)"
    n = len(chosen)
    cols = 2 if n > 1 else 1
    size = _setup_fonts(5.2 * cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows + 0.5), squeeze=False)
    fields = ["method", "target", *_varying([g for g, _, _ in chosen], "model", "data")]
    series_style = [
        ("conv", "#1f77b4", "-", "o"),
        ("BatchNorm", "#ff7f0e", "--", "s"),
        ("conv∘BN", "#7f0000", "-", "^"),  # dark: apart from the conv's blue in grey print too
    ]
    for ax, (g, run, comp) in zip(axes.flat, chosen, strict=False):
        steps, sigma = run.history
        parts = comp.split("+")
        names = [parts[0], "+".join(parts[1:]), comp]
        for (kind, color, style, marker), name in zip(series_style, names, strict=True):
            values = sigma.get(name)
            if not values:
                continue
            m = min(len(values), len(steps))
            every = max(1, m // 12)
            ax.plot(
                steps[:m],
                values[:m],
                color=color,
                linestyle=style,
                marker=marker,
                markevery=every,
                markersize=5,
                linewidth=2.0 if kind == "conv∘BN" else 1.5,
            )
        # The final weights' ground truth (the table's values), after any clipping at the end of training.
        finals = [
            run.mapping("spectral_norm").get(names[0]),
            run.mapping("spectral_norm_batchnorm").get(names[1]),
            run.mapping("spectral_norm_composition").get(comp),
        ]
        for (_, color, _, marker), final in zip(series_style, finals, strict=True):
            if final is not None and steps:
                ax.plot(
                    [steps[-1]],
                    [final],
                    linestyle="",
                    marker=marker,
                    markersize=11,
                    markerfacecolor="none",
                    markeredgecolor=color,
                    markeredgewidth=1.8,
                    zorder=4,
                )
        if g.target is not None:
            ax.axhline(g.target, color="black", linestyle=":", linewidth=1.2)
        seed = run.metrics.get("seed")
        title = ", ".join(
            [_label(g, fields, ", "), f"BN mode {g.bn_mode}"] + ([f"seed {seed}"] if seed is not None else [])
        )
        ax.set_title(f"{title}\n{names[0]} → {names[1]}", fontsize=size)
        ax.set_xlabel("training step")
        ax.set_ylabel("spectral norm σ")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles = [
        Line2D(
            [], [], color=color, linestyle=style, marker=marker, linewidth=2.0 if kind == "conv∘BN" else 1.5, label=kind
        )
        for kind, color, style, marker in series_style
    ]
    handles.append(
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            markersize=10,
            markerfacecolor="none",
            markeredgecolor="black",
            label="final weights (ground truth)",
        )
    )
    handles.append(Line2D([], [], color="black", linestyle=":", linewidth=1.2, label="clip target c"))
    fig.suptitle("Spectral norm over training: a conv, its BatchNorm and their composition conv∘BN")
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    _save(fig, path, rect=(0, 0.65 / fig.get_figheight(), 1, 1))
    return None


def _metric_marker(index: int) -> dict[str, Any]:
    """Marker fill of the ``index``-th accuracy metric (0: clean, full; then open, half-filled, ...): the metric
    stays recognisable on a lone point, where no line style shows.

    Example:
        >>> _metric_marker(0), _metric_marker(1), _metric_marker(2)
        ({}, {'markerfacecolor': 'white'}, {'fillstyle': 'bottom', 'markerfacecoloralt': 'white'})
    """
    fill = _METRIC_FILLS[index % len(_METRIC_FILLS)]
    if fill == "full":
        return {}
    if fill == "none":
        return {"markerfacecolor": "white"}
    return {"fillstyle": fill, "markerfacecoloralt": "white"}


def _accuracy_points(groups: Sequence[Group], metric: str) -> list[tuple[float | None, float, float]]:
    """(target, mean, std) in % of the clean accuracy (``metric == "clean"``) or an attack's, per group that has it."""
    points = []
    for g in groups:
        values = g.values("test_acc") if metric == "clean" else g.attack(metric)
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            points.append((g.target, 100 * statistics.fmean(values), 100 * std))
    return points


def _draw_accuracy_panel(
    ax: Any, members: Sequence[Group], methods: Sequence[str], metrics: Sequence[tuple[str, Any]]
) -> None:
    """One panel of :func:`plot_accuracy_vs_target`: the targets evenly spaced, the methods side by side at each."""
    targets = sorted({g.target for g in members if g.target is not None})
    clipped = [m for m in methods if any(g.method == m and g.target is not None and m != "none" for g in members)]
    step = min(0.8 / max(len(clipped), 1), 0.25)
    for method in methods:
        color, marker = _style(method, methods)
        mine = sorted((g for g in members if g.method == method), key=lambda g: g.target or 0.0)
        for index, (metric, style) in enumerate(metrics):
            points = _accuracy_points(mine, metric)
            if not points:
                continue
            if method == "none" or all(t is None for t, _, _ in points):
                mean = statistics.fmean(p[1] for p in points)
                ax.axhline(mean, color=color, linestyle=style, linewidth=1.6, alpha=0.9)
                if index == 0:  # a direct label: the reference lines have no marker
                    ax.annotate(
                        method, (1.0, mean), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                        textcoords="offset points", ha="right", va="bottom", color=color, fontweight="bold", zorder=2.5,
                    )  # fmt: skip
                continue
            shift = (clipped.index(method) - (len(clipped) - 1) / 2) * step
            xs = [targets.index(t) + shift for t, _, _ in points if t is not None]
            points = [p for p in points if p[0] is not None]
            line = ([xs[0] - 0.4 * step, xs[0] + 0.4 * step], [points[0][1]] * 2) if len(points) == 1 else None
            # the lines below every marker; a lone point shows no line style: a short segment in it (and the
            # marker's fill) tell the metric
            ax.plot(*(line or (xs, [p[1] for p in points])), color=color, linestyle=style, linewidth=1.8, zorder=1.5)
            ax.errorbar(
                xs,
                [p[1] for p in points],
                yerr=[p[2] for p in points],
                color=color,
                linestyle="",
                zorder=3,
                marker=marker,
                markersize=8,
                capsize=3,
                linewidth=1.8,
                markeredgecolor="black",
                markeredgewidth=0.7,
                **_metric_marker(index),
            )
    ax.set_xticks(range(len(targets)), [f"{t:g}" for t in targets])
    ax.set_xlim(-0.5, max(len(targets), 1) - 0.5)
    ax.set_xlabel("clip target c")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)


def plot_accuracy_vs_target(groups: Sequence[Group], path: Path) -> str | None:
    """Clean and robust accuracy against the clip target, one line per method and metric.

    Colour and marker identify the method, the line style and the marker's fill the metric (solid, filled: clean;
    dashed, dotted, ... and open, half-filled, ...: one per attack); error bars are the standard deviation over
    runs. The targets are evenly spaced, the methods side by side at each; the unclipped ``none`` runs are
    horizontal lines in the same styles, labelled. One panel per BatchNorm mode (and model/data) when several, each
    as wide as its targets.

    Args:
        groups: the groups.
        path: the PNG to write.

    Returns:
        str | None: ``None`` when written, else why not.
    """
    with_acc = [g for g in groups if g.values("test_acc")]
    if not with_acc:
        return "no run has a `test_acc`"
    attacks = _attacks(with_acc)
    metrics = [("clean", "-")] + [(a, _ATTACK_LINESTYLES[i % len(_ATTACK_LINESTYLES)]) for i, a in enumerate(attacks)]
    panel_fields = _varying(with_acc, "bn_mode", "model", "data")
    panels: dict[tuple[Any, ...], list[Group]] = {}
    for g in with_acc:
        panels.setdefault(tuple(getattr(g, f) for f in panel_fields), []).append(g)
    methods = sorted({g.method for g in with_acc}, key=lambda m: _order(m, METHOD_ORDER))
    widths = []
    for members in panels.values():
        n_targets = len({g.target for g in members if g.target is not None})
        n_methods = len({g.method for g in members if g.target is not None and g.method != "none"})
        widths.append(max(2.6, max(n_targets, 1) * (0.5 + 0.3 * max(n_methods, 1)) + 0.8))
    widths = [max(widths[0], 5.0)] if len(widths) == 1 else widths
    legend_width = 2.4
    fig, axes, row_of = _panel_axes(widths, 4.4, _MAX_ROW_WIDTH - legend_width, legend_width)
    for i, (ax, (key, members)) in enumerate(zip(axes, panels.items(), strict=True)):
        _draw_accuracy_panel(ax, members, methods, metrics)
        ax.set_ylabel("" if i and row_of[i - 1] == row_of[i] else "accuracy (%)")
        title = ", ".join(f"{f.replace('_', ' ')}: {v}" for f, v in zip(panel_fields, key, strict=True))
        ax.set_title(title or "Accuracy vs. clip target")
    method_handles = [
        Line2D(
            [],
            [],
            color=_style(m, methods)[0],
            marker="" if m == "none" else _style(m, methods)[1],
            markersize=8,
            markeredgecolor="black",
            linestyle="-",
            label=m + (" (unclipped)" if m == "none" else ""),
        )
        for m in methods
    ]
    metric_handles = [
        Line2D([], [], color="black", linestyle=s, marker="o", markersize=8, label=f"{m} accuracy", **_metric_marker(i))
        for i, (m, s) in enumerate(metrics)
    ]
    fig.legend(handles=method_handles, title="method", loc="outside right upper", frameon=False)
    fig.legend(handles=metric_handles, title="metric", loc="outside right lower", frameon=False)
    if panel_fields:
        fig.suptitle("Clean and robust accuracy vs. clip target")
    _save(fig, path)
    return None


def _series_styles(groups: Sequence[Group]) -> dict[tuple[Any, ...], tuple[str, str]]:
    """Colour and marker of each series (a group up to its target): the method's own for its most common
    variant (BatchNorm mode, model, data), the spare styles for the others; stable across panels."""
    counts: dict[tuple[Any, ...], int] = {}
    for g in groups:
        key = (g.method, g.bn_mode, g.model, g.data)
        counts[key] = counts.get(key, 0) + 1
    methods = sorted({g.method for g in groups})
    styles: dict[tuple[Any, ...], tuple[str, str]] = {}
    spare = iter(_EXTRA_STYLE * (1 + len(counts) // len(_EXTRA_STYLE)))
    taken: set[str] = set()
    order = sorted(counts, key=lambda k: (_order(k[0], METHOD_ORDER), -counts[k], _order(k[1], BN_ORDER), k[2:]))
    for key in order:
        if key[0] not in taken:
            taken.add(key[0])
            styles[key] = _style(key[0], methods)
        else:
            styles[key] = next(spare)
    return styles


def plot_certified_vs_eps(groups: Sequence[Group], path: Path) -> str | None:
    """Certified and PGD-ℓ2 accuracy against the ℓ2 radius ε, one line pair per group.

    Solid lines are the certified accuracy (logit margin > √2·L·ε with the run's Lipschitz bound L), dashed the
    accuracy under PGD-ℓ2 at the same radius: an empirical upper bound on the robust accuracy, so the gap between
    a pair is what the bound leaves uncertified. Colour and marker identify the group (the method, and the
    BatchNorm mode when several); the legend gives each group's mean L. One panel per clip target (and model/data
    set when several), the unclipped runs in every panel; error bars are the standard deviation over runs.

    Args:
        groups: the groups.
        path: the PNG to write.

    Returns:
        str | None: ``None`` when written, else why not.
    """
    shown = [g for g in groups if any(run.radii(key) for run in g.runs for key in _CERTIFY_KEYS)]
    if not shown:
        return "no run has `certified_acc` or `pgd_l2_acc` (train.py's certify group was off)"
    place = _varying(shown, "model", "data")

    def where(g: Group) -> tuple[Any, ...]:
        return tuple(getattr(g, f) for f in place)

    # a panel per (model, data, target); the unclipped runs join every panel of theirs, or get one of their own
    keys = {(*where(g), g.target) for g in shown if g.target is not None}
    keys |= {(*where(g), None) for g in shown if not any(k[:-1] == where(g) for k in keys)}
    panels: dict[tuple[Any, ...], list[Group]] = {
        key: [g for g in shown if g.target in (key[-1], None) and where(g) == key[:-1]]
        for key in sorted(keys, key=lambda k: (k[:-1], k[-1] is None, k[-1] or 0.0))
    }
    styles = _series_styles(shown)
    radii = _radii(shown)
    entries = max(len(members) for members in panels.values())
    widths = [4.6] * len(panels) if len(panels) > 1 else [5.5]
    # each panel's legend (a line per series) below its axes: as tall as the longest
    fig, axes, row_of = _panel_axes(widths, 3.9 + 0.24 * entries, _MAX_ROW_WIDTH)
    for i, (ax, (key, members)) in enumerate(zip(axes, panels.items(), strict=True)):
        variant = _varying(members, "bn_mode")
        for g in members:
            color, marker = styles[(g.method, g.bn_mode, g.model, g.data)]
            # the attack first: where the two meet (ε = 0) the certified marker stays visible on top
            for metric, style in (("pgd_l2_acc", "--"), ("certified_acc", "-")):
                points = [(r, v) for r in radii if (v := g.at_radius(metric, r))]
                if not points:
                    continue
                ax.errorbar(
                    [r for r, _ in points],
                    [100 * statistics.fmean(v) for _, v in points],
                    yerr=[100 * statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points],
                    color=color,
                    linestyle=style,
                    marker=marker,
                    markersize=7,
                    capsize=3,
                    linewidth=1.8 if style == "-" else 1.4,
                    markeredgecolor="black",
                    markeredgewidth=0.5,
                    markerfacecolor=color if style == "-" else "white",
                )
        handles = []
        for g in members:
            color, marker = styles[(g.method, g.bn_mode, g.model, g.data)]
            upper = _bounds(g, "upper")
            label = _label(g, ["method", *variant]) + (" (unclipped)" if g.target is None else "")
            label += f", L ≤ {statistics.fmean(upper):.3g}" if upper else ""
            handles.append(
                Line2D([], [], color=color, marker=marker, markeredgecolor="black", linestyle="-", label=label)
            )
        below = offset_copy(ax.transAxes, fig=fig, y=-0.62, units="inches")  # under the tick and axis labels
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below, frameon=False)
        ax.set_xticks(radii, [f"{r:g}" for r in radii])
        ax.set_xlabel("ℓ2 radius ε (inputs in [0, 1])")
        ax.set_ylabel("" if i and row_of[i - 1] == row_of[i] else "accuracy (%)")
        ax.set_ylim(-2, 102)
        target = "unclipped" if key[-1] is None else f"clip target c = {key[-1]:g}"
        ax.set_title(", ".join([*(str(v) for v in key[:-1] if v), target]))
        ax.grid(alpha=0.3)
    styles_legend = [
        Line2D([], [], color="black", linestyle="-", marker="o", label="certified (Lipschitz margin)"),
        Line2D([], [], color="black", linestyle="--", marker="o", markerfacecolor="white", label="PGD-ℓ2 attack"),
    ]
    fig.legend(handles=styles_legend, loc="outside lower center", ncol=2, frameon=False)
    fig.suptitle("Certified vs. empirical robustness: accuracy within an ℓ2 ball of radius ε")
    _save(fig, path)
    return None


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
    figures = {
        VIOLIN_NAME: plot_violin_sigma(groups, out / VIOLIN_NAME),
        BN_NAME: plot_bn_sigma_over_training(groups, out / BN_NAME),
        ACCURACY_NAME: plot_accuracy_vs_target(groups, out / ACCURACY_NAME),
    }
    if any(run.radii(key) for run in runs for key in _CERTIFY_KEYS):  # else the report is as it always was
        figures[CERTIFIED_NAME] = plot_certified_vs_eps(groups, out / CERTIFIED_NAME)
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
