"""The report's figures: each one's file name and caption, and drawing them all into an output directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .accuracy_figures import plot_accuracy_vs_target, plot_certified_vs_eps
from .groups import Group
from .runs import CERTIFY_KEYS
from .sigma_figures import plot_bn_sigma_over_training, plot_violin_sigma

__all__ = ["ACCURACY_NAME", "BN_NAME", "CAPTIONS", "CERTIFIED_NAME", "VIOLIN_NAME", "draw_figures"]

VIOLIN_NAME = "violin_sigma.png"
BN_NAME = "bn_sigma_over_training.png"
ACCURACY_NAME = "accuracy_vs_target.png"
CERTIFIED_NAME = "certified_vs_eps.png"
#: each figure's caption in ``report.md``, in the order the report lists them
CAPTIONS = {
    VIOLIN_NAME: "Final per-layer spectral norms per method (violins; dashed lines: targets)",
    BN_NAME: "σ of a conv, its BatchNorm and their composition over training",
    ACCURACY_NAME: "Clean and robust accuracy vs. clip target",
    CERTIFIED_NAME: "Certified (solid) and PGD-ℓ2 (dashed) accuracy vs. ℓ2 radius ε",
}


def draw_figures(groups: Sequence[Group], out: Path) -> dict[str, str | None]:
    """Draw the report's figures into ``out``: the violins, the BatchNorm figure and accuracy vs. target always, the
    certified accuracy only when some run was certified (else the report is as it was before certification).

    Args:
        groups: the groups.
        out: the output directory (it exists).

    Returns:
        dict[str, str | None]: figure file name → ``None`` when written, else the reason it was not.
    """
    figures = {
        VIOLIN_NAME: plot_violin_sigma(groups, out / VIOLIN_NAME),
        BN_NAME: plot_bn_sigma_over_training(groups, out / BN_NAME),
        ACCURACY_NAME: plot_accuracy_vs_target(groups, out / ACCURACY_NAME),
    }
    if any(run.radii(key) for g in groups for run in g.runs for key in CERTIFY_KEYS):
        figures[CERTIFIED_NAME] = plot_certified_vs_eps(groups, out / CERTIFIED_NAME)
    return figures
