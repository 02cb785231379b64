"""Paired statistics: :data:`PAIRED_METHOD` minus every other method, paired over seeds at the same configuration,
the mean difference of each quantity of the report with its Student's t confidence interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy.stats import t as student_t

from .groups import BN_ORDER, METHOD_ORDER, Group, all_radii, attack_names, order_key
from .runs import CERTIFY_KEYS, Run

__all__ = [
    "CONFIDENCE",
    "PAIRED_METHOD",
    "Difference",
    "PairedRow",
    "PairedTable",
    "paired_difference",
    "paired_differences",
]

#: the method whose paired differences against every other method (the baselines) the report gives
PAIRED_METHOD = "fastclip"
#: the confidence level of the paired differences' intervals
CONFIDENCE = 0.95


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
        return lambda run: (run.radii(key) if key in CERTIFY_KEYS else run.mapping(key)).get(name)

    out: list[tuple[str, bool, Callable[[Run], float | None]]] = [
        ("clean acc (pp)", True, lambda run: run.number("test_acc"))
    ]
    out += [(f"{a} acc (pp)", True, entry("robust_acc", a)) for a in attack_names(groups)]
    for r in all_radii(groups):
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
        >>> from pathlib import Path
        >>> from reporting.groups import group_runs
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
    for ours in groups:
        if ours.method != method or ours.target is None:
            continue
        for base in groups:
            where = (base.bn_mode, base.model, base.data) == (ours.bn_mode, ours.model, ours.data)
            if base.method == method or not where or base.target not in (ours.target, None):
                continue
            seeds = {r.seed for r in ours.runs if r.seed is not None} & {r.seed for r in base.runs}
            if not seeds:
                continue
            cells = {
                label: paired_difference(_by_seed(ours.runs, value), _by_seed(base.runs, value))
                for label, _, value in quantities
            }
            row = PairedRow(base.method, ours.target, ours.bn_mode, ours.model, ours.data, tuple(sorted(seeds)), cells)
            rows.append(row)
    rows.sort(
        key=lambda r: (r.model, r.data, order_key(r.baseline, METHOD_ORDER), r.target, order_key(r.bn_mode, BN_ORDER))
    )
    columns = [(label, pct) for label, pct, _ in quantities if any(r.cells[label] for r in rows)]
    return PairedTable(columns, rows)
