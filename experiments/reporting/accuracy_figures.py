"""The report's accuracy figures: clean and robust accuracy against the clip target, and certified beside PGD-ℓ2
accuracy against the ℓ2 radius ε."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.lines import Line2D
from matplotlib.transforms import offset_copy

from .groups import (
    BN_ORDER,
    METHOD_ORDER,
    Group,
    all_radii,
    attack_names,
    group_label,
    lipschitz_bounds,
    order_key,
    varying,
)
from .runs import CERTIFY_KEYS
from .style import EXTRA_STYLE, MAX_ROW_WIDTH, method_style, panel_axes, save_figure

__all__ = ["plot_accuracy_vs_target", "plot_certified_vs_eps"]

#: Line styles of the accuracy curves: clean first, then one per attack.
_ATTACK_LINESTYLES = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]
#: Marker fills of the accuracy metrics: clean first, then one per attack (see ``_metric_marker``).
_METRIC_FILLS = ["full", "none", "bottom", "top", "left", "right"]


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
        color, marker = method_style(method, methods)
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
    attacks = attack_names(with_acc)
    metrics: list[tuple[str, Any]] = [("clean", "-")] + [
        (a, _ATTACK_LINESTYLES[i % len(_ATTACK_LINESTYLES)]) for i, a in enumerate(attacks)
    ]
    panel_fields = varying(with_acc, "bn_mode", "model", "data")
    panels: dict[tuple[Any, ...], list[Group]] = {}
    for g in with_acc:
        panels.setdefault(tuple(getattr(g, f) for f in panel_fields), []).append(g)
    methods = sorted({g.method for g in with_acc}, key=lambda m: order_key(m, METHOD_ORDER))
    widths = []
    for members in panels.values():
        n_targets = len({g.target for g in members if g.target is not None})
        n_methods = len({g.method for g in members if g.target is not None and g.method != "none"})
        widths.append(max(2.6, max(n_targets, 1) * (0.5 + 0.3 * max(n_methods, 1)) + 0.8))
    widths = [max(widths[0], 5.0)] if len(widths) == 1 else widths
    legend_width = 2.4
    fig, axes, row_of = panel_axes(widths, 4.4, MAX_ROW_WIDTH - legend_width, legend_width)
    for i, (ax, (key, members)) in enumerate(zip(axes, panels.items(), strict=True)):
        _draw_accuracy_panel(ax, members, methods, metrics)
        ax.set_ylabel("" if i and row_of[i - 1] == row_of[i] else "accuracy (%)")
        title = ", ".join(f"{f.replace('_', ' ')}: {v}" for f, v in zip(panel_fields, key, strict=True))
        ax.set_title(title or "Accuracy vs. clip target")
    method_handles = [
        Line2D(
            [],
            [],
            color=method_style(m, methods)[0],
            marker="" if m == "none" else method_style(m, methods)[1],
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
    save_figure(fig, path)
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
    spare = iter(EXTRA_STYLE * (1 + len(counts) // len(EXTRA_STYLE)))
    taken: set[str] = set()
    order = sorted(counts, key=lambda k: (order_key(k[0], METHOD_ORDER), -counts[k], order_key(k[1], BN_ORDER), k[2:]))
    for key in order:
        if key[0] not in taken:
            taken.add(key[0])
            styles[key] = method_style(key[0], methods)
        else:
            styles[key] = next(spare)
    return styles


def _certified_panels(shown: Sequence[Group]) -> dict[tuple[Any, ...], list[Group]]:
    """The panels of :func:`plot_certified_vs_eps`, keyed by (model, data when they vary, target): a panel per
    (model, data, target); the unclipped runs join every panel of theirs, or get one of their own."""
    place = varying(shown, "model", "data")

    def where(g: Group) -> tuple[Any, ...]:
        return tuple(getattr(g, f) for f in place)

    keys = {(*where(g), g.target) for g in shown if g.target is not None}
    keys |= {(*where(g), None) for g in shown if not any(k[:-1] == where(g) for k in keys)}
    return {
        key: [g for g in shown if g.target in (key[-1], None) and where(g) == key[:-1]]
        for key in sorted(keys, key=lambda k: (k[:-1], k[-1] is None, k[-1] or 0.0))
    }


def _draw_certified_series(
    ax: Any, members: Sequence[Group], styles: dict[tuple[Any, ...], tuple[str, str]], radii: Sequence[float]
) -> None:
    """The line pairs of one panel of :func:`plot_certified_vs_eps`: per group, PGD-ℓ2 (dashed) then certified."""
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


def _certified_legend(
    ax: Any, fig: Any, members: Sequence[Group], styles: dict[tuple[Any, ...], tuple[str, str]]
) -> None:
    """A panel's legend below its axes (a line per group, with its mean Lipschitz bound L)."""
    variant = varying(members, "bn_mode")
    handles = []
    for g in members:
        color, marker = styles[(g.method, g.bn_mode, g.model, g.data)]
        upper = lipschitz_bounds(g, "upper")
        label = group_label(g, ["method", *variant]) + (" (unclipped)" if g.target is None else "")
        label += f", L ≤ {statistics.fmean(upper):.3g}" if upper else ""
        handles.append(Line2D([], [], color=color, marker=marker, markeredgecolor="black", linestyle="-", label=label))
    below = offset_copy(ax.transAxes, fig=fig, y=-0.62, units="inches")  # under the tick and axis labels
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below, frameon=False)


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
    shown = [g for g in groups if any(run.radii(key) for run in g.runs for key in CERTIFY_KEYS)]
    if not shown:
        return "no run has `certified_acc` or `pgd_l2_acc` (train.py's certify group was off)"
    panels = _certified_panels(shown)
    styles = _series_styles(shown)
    radii = all_radii(shown)
    entries = max(len(members) for members in panels.values())
    widths = [4.6] * len(panels) if len(panels) > 1 else [5.5]
    # each panel's legend (a line per series) below its axes: as tall as the longest
    fig, axes, row_of = panel_axes(widths, 3.9 + 0.24 * entries, MAX_ROW_WIDTH)
    for i, (ax, (key, members)) in enumerate(zip(axes, panels.items(), strict=True)):
        _draw_certified_series(ax, members, styles, radii)
        _certified_legend(ax, fig, members, styles)
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
    save_figure(fig, path)
    return None
