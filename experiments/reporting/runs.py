"""Loading runs: find the ``metrics.json`` files ``experiments/train.py`` wrote and read each into a :class:`Run`,
its fields normalised (defaults for old runs, non-finite numbers dropped)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CERTIFIED_TOL", "CERTIFY_KEYS", "METRICS_NAME", "Run", "find_metrics", "load_runs"]

METRICS_NAME = "metrics.json"
#: certified accuracy may exceed PGD-ℓ2 accuracy by this much (float32 rounding; one sample in a million is more)
CERTIFIED_TOL = 1e-6
#: the fields of a run's certification by ``train.py``'s ``certify`` group, each ``radius → accuracy``
CERTIFY_KEYS = ("certified_acc", "pgd_l2_acc")


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


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


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
    roots = [Path(p) for p in paths]
    found: set[Path] = set()
    for path in roots:
        if path.is_file() and path.name == METRICS_NAME:
            found.add(path.resolve())
        elif path.is_dir():
            found.update(p.resolve() for p in path.rglob(METRICS_NAME) if p.is_file())
    if not found:
        where = ", ".join(f"{p} (does not exist)" if not p.exists() else str(p) for p in roots)
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
