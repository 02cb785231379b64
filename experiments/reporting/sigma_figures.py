"""The report's σ figures: the paper's headline violins of the final per-layer spectral norms, and its BatchNorm
figure, σ over training of a conv, its BatchNorm and their composition."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .groups import METHOD_ORDER, Group, group_label, order_key, varying
from .runs import Run
from .style import MAX_ROW_WIDTH, method_style, panel_axes, same_ylim, save_figure, setup_fonts

__all__ = ["plot_bn_sigma_over_training", "plot_violin_sigma"]

#: the most runs the BatchNorm figure shows, a panel each
_MAX_BN_PANELS = 4
#: the width of one violin (inches)
_VIOLIN_WIDTH = 1.0
#: more violins than this in a panel: narrower, their labels on one slanted line
_MANY_VIOLINS = 16
#: (series, colour, line style, marker) of the BatchNorm figure's three σ series
_SERIES_STYLE: list[tuple[str, str, Any, str]] = [
    ("conv", "#1f77b4", "-", "o"),
    ("BatchNorm", "#ff7f0e", "--", "s"),
    ("conv∘BN", "#7f0000", "-", "^"),  # dark: apart from the conv's blue in grey print too
]


def _draw_violins(
    ax: Any, data: Sequence[tuple[Group, list[float]]], methods: Sequence[str], fields: list[str]
) -> None:
    """Violins (one per group), the layers as dots, dashed target lines over each cluster of one target."""
    positions = list(range(1, len(data) + 1))
    shown = [g for g, _ in data]
    for pos, (g, values) in zip(positions, data, strict=True):
        color, marker = method_style(g.method, methods)
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
    labels = [group_label(g, fields, " " if many else "\n") for g in shown]
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
    panel_fields = varying(shown, "bn_mode", "model", "data")
    fields = ["method", *varying(shown, "target")]
    panels: dict[tuple[Any, ...], list[tuple[Group, list[float]]]] = {}
    for g, values in data:
        panels.setdefault(tuple(getattr(g, f) for f in panel_fields), []).append((g, values))
    methods = sorted({g.method for g in shown})
    targets = sorted({g.target for g in shown if g.target is not None})
    # Panels side by side, as wide as their violins (two at least, for the title), in rows that fit the legend beside
    widths = [(_VIOLIN_WIDTH if len(p) <= _MANY_VIOLINS else 0.55) * max(len(p), 2) + 0.9 for p in panels.values()]
    widths = [max(widths[0], 5.0)] if len(widths) == 1 else widths
    legend_width = 1.8
    fig, axes, row_of = panel_axes(widths, 4.2, MAX_ROW_WIDTH - legend_width, legend_width)
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
    same_ylim(axes)
    n_runs = sum(len(g.runs) for g in shown)
    fig.suptitle(f"Final per-layer spectral norms per method ({n_runs} runs, layers pooled over a group's runs)")
    handles = [
        Line2D(
            [],
            [],
            color=method_style(m, methods)[0],
            marker=method_style(m, methods)[1],
            linestyle="",
            markersize=8,
            markeredgecolor="black",
            label=m,
        )
        for m in sorted(methods, key=lambda m: order_key(m, METHOD_ORDER))
    ]
    if targets:
        handles.append(Line2D([], [], color="black", linestyle="--", label="target c"))
    fig.legend(handles=handles, loc="outside right center", frameon=False)
    save_figure(fig, path)
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


def _draw_history(ax: Any, run: Run, comp: str) -> list[str]:
    """One panel of :func:`plot_bn_sigma_over_training`: the σ series of the composition ``comp``, its conv and its
    BatchNorm over the training steps, and their final weights' ground truth; returns the three series' names."""
    steps, sigma = run.history
    parts = comp.split("+")
    names = [parts[0], "+".join(parts[1:]), comp]
    for (kind, color, style, marker), name in zip(_SERIES_STYLE, names, strict=True):
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
    for (_, color, _, marker), final in zip(_SERIES_STYLE, finals, strict=True):
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
    return names


def _history_legend() -> list[Line2D]:
    """The legend of :func:`plot_bn_sigma_over_training`: the three series, the final weights, the target."""
    handles = [
        Line2D(
            [], [], color=color, linestyle=style, marker=marker, linewidth=2.0 if kind == "conv∘BN" else 1.5, label=kind
        )
        for kind, color, style, marker in _SERIES_STYLE
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
    return handles


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
    size = setup_fonts(5.2 * cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows + 0.5), squeeze=False)
    fields = ["method", "target", *varying([g for g, _, _ in chosen], "model", "data")]
    for ax, (g, run, comp) in zip(axes.flat, chosen, strict=False):
        names = _draw_history(ax, run, comp)
        if g.target is not None:
            ax.axhline(g.target, color="black", linestyle=":", linewidth=1.2)
        seed = run.metrics.get("seed")
        title = ", ".join(
            [group_label(g, fields, ", "), f"BN mode {g.bn_mode}"] + ([f"seed {seed}"] if seed is not None else [])
        )
        ax.set_title(f"{title}\n{names[0]} → {names[1]}", fontsize=size)
        ax.set_xlabel("training step")
        ax.set_ylabel("spectral norm σ")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle("Spectral norm over training: a conv, its BatchNorm and their composition conv∘BN")
    fig.legend(handles=_history_legend(), loc="lower center", ncol=3, frameon=False)
    save_figure(fig, path, rect=(0, 0.65 / fig.get_figheight(), 1, 1))
    return None
