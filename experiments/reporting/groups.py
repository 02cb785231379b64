"""Grouping runs: the runs of one (model, data, method, target, BatchNorm mode) make a :class:`Group`, in the
report's display order; and the questions every part of the report asks of the groups (which fields vary, which
attacks and radii were measured, a group's label)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .runs import CERTIFY_KEYS, Run

__all__ = [
    "BN_ORDER",
    "METHOD_ORDER",
    "Group",
    "all_radii",
    "attack_names",
    "group_label",
    "group_runs",
    "lipschitz_bounds",
    "order_key",
    "varying",
]

#: Display order of the methods (the paper's first, the unclipped reference last); others follow by name.
METHOD_ORDER = ("fastclip", "gouk", "miyato", "senderovich", "gram", "none")
#: Display order of the BatchNorm modes.
BN_ORDER = ("bn", "no_bn", "bn_clipped", "bn_composed")


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
            order_key(self.method, METHOD_ORDER),
            (self.target is None, self.target or 0.0),
            order_key(self.bn_mode, BN_ORDER),
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


def order_key(name: str, order: Sequence[str]) -> tuple[int, str]:
    """Sort key of a name in a display order (:data:`METHOD_ORDER`, :data:`BN_ORDER`): the listed names in their
    order, the others after them by name.

    Args:
        name: the name.
        order: the display order.

    Returns:
        tuple[int, str]: the key.

    Example:
        >>> sorted(["zeta", "none", "alpha", "fastclip"], key=lambda m: order_key(m, METHOD_ORDER))
        ['fastclip', 'none', 'alpha', 'zeta']
    """
    return (order.index(name) if name in order else len(order), name)


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Group runs by (model, data, method, target, BatchNorm mode), in report order.

    Args:
        runs: the runs.

    Returns:
        list[Group]: the groups, sorted by :meth:`Group.sort_key`.

    Example:
        >>> from pathlib import Path
        >>> runs = [Run(Path(f"{s}/metrics.json"), {"method": "gouk", "target": 1, "seed": s}) for s in (0, 1)]
        >>> [(g.method, len(g.runs)) for g in group_runs(runs)]
        [('gouk', 2)]
    """
    groups: dict[tuple[Any, ...], Group] = {}
    for run in runs:
        key = (run.model, run.data, run.method, run.target, run.bn_mode)
        groups.setdefault(key, Group(*key)).runs.append(run)
    return sorted(groups.values(), key=Group.sort_key)


def varying(groups: Sequence[Group], *fields: str) -> list[str]:
    """The fields (:class:`Group` attributes) that take more than one value over the groups.

    Args:
        groups: the groups.
        *fields: the attribute names to check, in the order returned.

    Returns:
        list[str]: those that vary.
    """
    return [f for f in fields if len({getattr(g, f) for g in groups}) > 1]


def group_label(group: Group, fields: Sequence[str], sep: str = " ") -> str:
    """A group's label in figures: the values of ``fields``, the target as ``c=…`` (none when unclipped), empty
    values left out.

    Args:
        group: the group.
        fields: the attribute names shown.
        sep: what joins them.

    Returns:
        str: the label.

    Example:
        >>> group_label(Group("", "", "gouk", 0.5, "bn"), ["method", "target", "model"])
        'gouk c=0.5'
    """
    parts = []
    for name in fields:
        value = getattr(group, name)
        if name == "target":
            if value is not None:
                parts.append(f"c={value:g}")
        elif value:
            parts.append(str(value))
    return sep.join(parts)


def attack_names(groups: Sequence[Group]) -> list[str]:
    """The attacks any run evaluated (the keys of ``robust_acc``), sorted by name."""
    names = {name for g in groups for run in g.runs for name in run.mapping("robust_acc")}
    return sorted(names)


def all_radii(groups: Sequence[Group]) -> list[float]:
    """The ℓ2 radii at which any run measured certified or PGD-ℓ2 accuracy, ascending."""
    return sorted({r for g in groups for run in g.runs for key in CERTIFY_KEYS for r in run.radii(key)})


def lipschitz_bounds(group: Group, which: str) -> list[float]:
    """The Lipschitz bound ``upper`` or ``lower`` of each run that has it."""
    return [b[which] for run in group.runs if which in (b := run.mapping("lipschitz"))]
