"""The text of ``report.md``: the table of the groups (means over their runs), the runs whose certification is
impossible, the paired differences, and the figures with their captions."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .figures import CAPTIONS
from .groups import Group, all_radii, attack_names, lipschitz_bounds, varying
from .paired import CONFIDENCE, PAIRED_METHOD, Difference, PairedTable, paired_differences
from .runs import METRICS_NAME, Run

__all__ = ["REPORT_NAME", "render_markdown", "render_paired"]

REPORT_NAME = "report.md"


def _fmt_target(target: float | None) -> str:
    """A clip target in a table cell: ``–`` for none (the unclipped runs)."""
    return "–" if target is None else f"{target:g}"


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
    """``text`` in red: what the report flags as impossible."""
    return f'<span style="color:red">{text}</span>'


def _pct(values: Sequence[float]) -> str:
    """Fractions as a percentage: the mean, ± the standard deviation when several, ``–`` when none."""
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    if len(values) > 1:
        return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"
    return f"{mean:.1f}"


def _num(values: Sequence[float], fmt: str = ".3f") -> str:
    """The mean of the values in the format ``fmt``, ``–`` when none."""
    return f"{statistics.fmean(values):{fmt}}" if values else "–"


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
        >>> from reporting.paired import PairedRow
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


@dataclass(frozen=True)
class _Columns:
    """The main table's optional columns: what varies or was measured over the groups.

    Args:
        extra: the fields (``model``, ``data``) that vary, the first columns.
        attacks: the attacks some run evaluated, a column each.
        radii: the ℓ2 radii some run was certified at, a column each.
        bound: whether some run has a Lipschitz bound (the columns *L upper*, *L lower*).
        composition: whether some run has conv∘BN compositions (*σ conv∘BN max*).
        batchnorm: whether some run has BatchNorm gains (*BN gain max*).
    """

    extra: list[str]
    attacks: list[str]
    radii: list[float]
    bound: bool
    composition: bool
    batchnorm: bool

    @classmethod
    def of(cls, groups: Sequence[Group]) -> _Columns:
        """The columns the groups need."""

        def has(key: str) -> bool:
            return any(run.mapping(key) for g in groups for run in g.runs)

        return cls(
            extra=varying(groups, "model", "data"),
            attacks=attack_names(groups),
            radii=all_radii(groups),
            bound=has("lipschitz"),
            composition=has("spectral_norm_composition"),
            batchnorm=has("spectral_norm_batchnorm"),
        )

    def header(self) -> list[str]:
        """The column labels."""
        header = [*self.extra, "method", "target", "BN mode", "n", "clean acc (%)"]
        header += [f"{a} acc (%)" for a in self.attacks]
        header += ["L upper", "L lower"] if self.bound else []
        header += [f"ε={r:g}: certified / PGD-ℓ2 (%)" for r in self.radii]
        header += ["σ layer mean", "σ layer max"]
        header += ["σ conv∘BN max"] if self.composition else []
        header += ["BN gain max"] if self.batchnorm else []
        header += ["epoch time (s)"]
        return header

    def row(self, g: Group) -> list[str]:
        """The cells of one group; a certified cell in red where a run's certification is impossible there."""
        row = [getattr(g, e) for e in self.extra] + [g.method, _fmt_target(g.target), g.bn_mode, str(len(g.runs))]
        row.append(_pct(g.values("test_acc")))
        row += [_pct(g.attack(a)) for a in self.attacks]
        if self.bound:
            row += [_num(lipschitz_bounds(g, "upper"), "#.3g"), _num(lipschitz_bounds(g, "lower"), "#.3g")]
        excess = {r for run in g.runs for r in run.excess_radii()}
        for r in self.radii:
            cell = f"{_pct(g.at_radius('certified_acc', r))} / {_pct(g.at_radius('pgd_l2_acc', r))}"
            row.append(_red(cell) if r in excess else cell)
        row += [_num(g.per_run("spectral_norm", "mean")), _num(g.per_run("spectral_norm", "max"))]
        row += [_num(g.per_run("spectral_norm_composition", "max"))] if self.composition else []
        row += [_num(g.per_run("spectral_norm_batchnorm", "max"))] if self.batchnorm else []
        row.append(_num(g.values("epoch_time_s"), ".2f"))
        return row


def _intro(groups: Sequence[Group], sources: Sequence[Path], n_files: int, columns: _Columns) -> str:
    """The paragraph above the table: where the runs come from, how to read the columns present."""
    n_runs = sum(len(g.runs) for g in groups)
    return (
        f"{n_runs} runs ({n_files} `{METRICS_NAME}` files) from "
        + ", ".join(f"`{s}`" for s in sources)
        + f", in {len(groups)} groups. Values are means over the runs of a group (n); accuracies in %, "
        "± the standard deviation over runs when n > 1. σ: the ground-truth spectral norm of the final weights; "
        "*σ layer mean/max* is the mean/max over a run's layers, averaged over runs"
        + ("; *σ conv∘BN max* the largest conv∘BatchNorm composition" if columns.composition else "")
        + ("; *BN gain max* the largest BatchNorm gain max |γ|/√(var+ε)" if columns.batchnorm else "")
        + "."
        + (
            " *L upper*: the certified bound on the ℓ2 Lipschitz constant of input → logits (eval mode), composed "
            "from exact per-layer norms; *L lower*: an empirical lower bound (largest difference quotient at a test "
            "batch)."
            if columns.bound
            else ""
        )
        + (
            " *ε: certified / PGD-ℓ2*: the accuracy certified at ℓ2 radius ε (logit margin > √2·L·ε) beside the "
            "accuracy under PGD-ℓ2 at the same radius, on the same samples; inputs in [0, 1], ℓ2 over the image. "
            "Certified can never exceed PGD-ℓ2."
            if columns.radii
            else ""
        )
    )


def _violation_lines(groups: Sequence[Group], sources: Sequence[Path]) -> list[str]:
    """The red list of the runs whose certification is impossible for a sound bound (none when every run's is)."""
    violations = [(run, v) for g in groups for run in g.runs for v in run.violations()]
    if not violations:
        return []
    lines = [
        "",
        _red(
            f"**Impossible certification in {len({id(run) for run, _ in violations})} run(s)**: certified "
            "accuracy above the accuracy under PGD-ℓ2 at the same radius, or a Lipschitz lower bound above the "
            "upper bound — the bound (or the evaluation) is wrong:"
        ),
        "",
    ]
    return lines + [f"- {_red(f'run `{_run_name(run, sources)}`: {v}')}" for run, v in violations]


def _figure_lines(figures: dict[str, str | None]) -> list[str]:
    """The figures section: each figure drawn (its caption, file name and image) or why it was not."""
    lines = ["", "## Figures", ""]
    for name, caption in CAPTIONS.items():
        if name not in figures:
            continue
        reason = figures[name]
        if reason is None:
            lines += [f"- {caption}: `{name}`", "", f"  ![{caption}]({name})", ""]
        else:
            lines += [f"- {caption}: not drawn — {reason}.", ""]
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
        >>> from reporting.groups import group_runs
        >>> run = Run(Path("metrics.json"), {"method": "none", "test_acc": 0.5})
        >>> "| none | – | bn | 1 | 50.0 |" in render_markdown(group_runs([run]), {}, [Path(".")], 1)
        True
    """
    columns = _Columns.of(groups)
    header = columns.header()
    lines = [
        "# Spectral clipping report",
        "",
        _intro(groups, sources, n_files, columns),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < len(columns.extra) + 3 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(columns.row(g)) + " |" for g in groups]
    lines += _violation_lines(groups, sources)
    lines += render_paired(paired_differences(groups))
    lines += _figure_lines(figures)
    return "\n".join(lines).rstrip() + "\n"
