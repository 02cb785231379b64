"""Figure style shared by the report's figures: one colour and marker per method, font sizes that stay readable at
the width the README shows a figure, panels packed into rows, and saving to PNG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

__all__ = [
    "EXTRA_STYLE",
    "MAX_ROW_WIDTH",
    "METHOD_STYLE",
    "font_size",
    "method_style",
    "panel_axes",
    "panel_rows",
    "same_ylim",
    "save_figure",
    "setup_fonts",
]

#: One colour and marker per method, stable across figures.
METHOD_STYLE = {
    "fastclip": ("#1f77b4", "o"),
    "gouk": ("#ff7f0e", "s"),
    "miyato": ("#2ca02c", "^"),
    "senderovich": ("#d62728", "D"),
    "gram": ("#9467bd", "v"),
    "none": ("#555555", "X"),
}
#: the spare styles: methods outside :data:`METHOD_STYLE`, a method's less common variants; markers of their own
EXTRA_STYLE = [("#8c564b", "P"), ("#e377c2", "*"), ("#17becf", "h"), ("#bcbd22", "<"), ("#7f7f7f", ">")]
#: the widest row of panels in a figure (inches, its legend included)
MAX_ROW_WIDTH = 10.5
_DPI = 120
#: the smallest base font size (points)
_FONT = 10
#: figures are drawn to be read this wide (pixels), as the README shows them, with text at least this tall (pixels)
_READ_WIDTH_PX = 800
_READ_FONT_PX = 12


def method_style(method: str, known: Sequence[str]) -> tuple[str, str]:
    """The colour and marker of a method: its own in :data:`METHOD_STYLE`, else a spare one by its rank among the
    other ``known`` methods.

    Args:
        method: the method.
        known: every method of the figure.

    Returns:
        tuple[str, str]: the colour and the marker.

    Example:
        >>> method_style("gouk", []), method_style("new", ["new", "fastclip"])
        (('#ff7f0e', 's'), ('#8c564b', 'P'))
    """
    if method in METHOD_STYLE:
        return METHOD_STYLE[method]
    extra = sorted(m for m in known if m not in METHOD_STYLE)
    return EXTRA_STYLE[extra.index(method) % len(EXTRA_STYLE)] if method in extra else EXTRA_STYLE[0]


def font_size(width: float) -> int:
    """The base font size (points) of a figure ``width`` inches wide: at least ``_FONT``, and large enough that its
    text stays ``_READ_FONT_PX`` pixels tall when the PNG is shown ``_READ_WIDTH_PX`` wide (as in a README), up to
    ``_FONT + 4`` (a figure wider than that allows is not meant to be read at that width).

    Example:
        >>> font_size(8.0), font_size(12.0), font_size(30.0)
        (10, 13, 14)
    """
    return min(max(_FONT, math.ceil(_READ_FONT_PX * width * 72 / _READ_WIDTH_PX - 1e-9)), _FONT + 4)


def setup_fonts(width: float = 0.0) -> int:
    """Set matplotlib's font sizes for a figure ``width`` inches wide (legends included); return the base size."""
    size = font_size(width)
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


def panel_rows(widths: Sequence[float], max_row: float) -> list[list[int]]:
    """Pack panels of the given widths (inches) left to right into rows of at most ``max_row`` inches.

    Example:
        >>> panel_rows([8.5, 2.8, 2.8, 2.8], 8.5)
        [[0], [1, 2, 3]]
    """
    rows: list[list[int]] = []
    for i, width in enumerate(widths):
        if rows and sum(widths[j] for j in rows[-1]) + width <= max_row + 1e-9:
            rows[-1].append(i)
        else:
            rows.append([i])
    return rows


def panel_axes(
    widths: Sequence[float], height: float, max_row: float, legend: float = 0.0
) -> tuple[plt.Figure, list[Any], list[int]]:
    """A figure whose panels have the given widths (inches, as a share of their row), packed into rows of at
    most ``max_row`` inches (:func:`panel_rows`), left-aligned; constrained layout, with ``legend`` inches more
    for a legend beside the panels; fonts sized for the figure's width (:func:`setup_fonts`). The axes do not
    share y (shared across subfigures, every change of limits redraws the whole figure): give them the same
    limits, or :func:`same_ylim` once drawn.

    Returns:
        tuple[plt.Figure, list[Any], list[int]]: the figure, the axes (one per width), the row of each.
    """
    rows = panel_rows(widths, max_row)
    total = max(sum(widths[j] for j in row) for row in rows)
    setup_fonts(total + legend)
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


def same_ylim(axes: Sequence[Any]) -> None:
    """Give the axes the y limits that hold all of their data."""
    limits = [ax.get_ylim() for ax in axes]
    low, high = min(lo for lo, _ in limits), max(hi for _, hi in limits)
    for ax in axes:
        ax.set_ylim(low, high)


def save_figure(fig: plt.Figure, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    """Write the figure to a PNG and close it.

    Args:
        fig: the figure; laid out tightly within ``rect`` unless it has a layout engine already.
        path: the PNG to write.
        rect: the part of the figure (fractions) the axes may fill, the rest left to a legend.
    """
    if fig.get_layout_engine() is None:
        fig.tight_layout(rect=rect)
    # bbox_inches="tight" keeps the legends placed outside the axes inside the image.
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
