"""A circular-padded convolution cannot take an arbitrary spectrum: FFT clipping misses its target.

For a few random ``Conv2d`` layers with circular padding, clip the spectral norm to ``--target`` with the
FFT method (:func:`lightning_specclip.methods.senderovich.senderovich_clip_`: per-frequency SVD clipping,
then projection of the kernel back onto its ``k × k`` support) and measure the result exactly with
:func:`lightning_specclip.spectral.exact.fft_singular_values` (exact for circular padding). The clipped
spectrum ``min(σ, target)`` needs a kernel of full spatial support; after the projection the largest
singular value is above the target again. Repeating the clip (alternating projections onto two convex
sets) approaches the target only slowly and ends far from the spectrum ``min(σ, target)``. FastClip
(``lightning_specclip.spectral.clip.clip_spectral_norm_``) is shown next to it when that module is available.

Writes ``table.md`` and ``representability.png`` to ``--out``::

    python experiments/representability.py --out reports/representability
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from lightning_specclip.methods.senderovich import senderovich_clip_  # noqa: E402
from lightning_specclip.spectral.exact import fft_singular_values  # noqa: E402


@dataclass
class LayerResult:
    """What one layer went through.

    Attributes:
        before: all singular values before clipping, descending.
        ideal: ``min(before, target)``, the spectrum a full-support kernel would have.
        after: all singular values after one FFT clip (kernel projected onto its support).
        after_rounds: all singular values after the last of the repeated FFT clips.
        sigma_rounds: the spectral norm after each of the repeated FFT clips.
        fastclip: the spectral norm after FastClip, or ``None`` when FastClip is not available.
    """

    before: Tensor
    ideal: Tensor
    after: Tensor
    after_rounds: Tensor
    sigma_rounds: list[float]
    fastclip: float | None


def _fastclip_sigma(conv: nn.Conv2d, target: float, shape: tuple[int, ...]) -> float | None:
    """The exact (FFT) spectral norm of a copy of ``conv`` after FastClip, or ``None`` if not available.

    FastClip is imported lazily so that this experiment runs before ``lightning_specclip.spectral.clip``
    exists; once it does, the FastClip column and markers appear without further changes.

    Args:
        conv: the layer (not modified; a deep copy is clipped).
        target: the clip value.
        shape: the input shape ``(channels, height, width)`` without the batch dimension.

    Returns:
        float | None: ``σ₁`` of the circular convolution after FastClip, or ``None`` when FastClip cannot be
        imported.

    Raises:
        Exception: whatever ``clip_spectral_norm_`` raises once it is importable.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")
        >>> sigma = _fastclip_sigma(conv, 0.1, (2, 8, 8))  # below σ₁, so FastClip has work to do
        >>> sigma is None or abs(sigma / 0.1 - 1) < 2e-2
        True
    """
    try:
        from lightning_specclip.spectral.clip import clip_spectral_norm_
    except ImportError:
        return None
    clipped = copy.deepcopy(conv)
    clip_spectral_norm_(clipped, target, shape)
    return float(fft_singular_values(clipped.weight, shape[1:], clipped.stride, k=1)[0])


def run_layer(conv: nn.Conv2d, target: float, size: int, rounds: int) -> LayerResult:
    """Clip one circular conv with the FFT method ``rounds`` times (on a copy) and with FastClip.

    Args:
        conv: a ``Conv2d`` with circular padding and stride 1 (not modified).
        target: the clip value.
        size: the input height and width.
        rounds: how many times the FFT clip is applied in a row.

    Returns:
        LayerResult: the spectra and spectral norms.

    Raises:
        ValueError: see :func:`senderovich_clip_`.

    Example:
        >>> conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")
        >>> res = run_layer(conv, 0.1, 8, rounds=2)
        >>> len(res.sigma_rounds), res.after.shape
        (2, torch.Size([128]))
    """
    before = fft_singular_values(conv.weight, (size, size))
    work = copy.deepcopy(conv)
    sigma_rounds, after = [], before
    for r in range(rounds):
        _, sigma = senderovich_clip_(work, target, (size, size))
        sigma_rounds.append(sigma)
        if r == 0:
            after = fft_singular_values(work.weight, (size, size))
    after_rounds = fft_singular_values(work.weight, (size, size))
    fastclip = _fastclip_sigma(conv, target, (conv.in_channels, size, size))
    return LayerResult(before, before.clamp(max=target), after, after_rounds, sigma_rounds, fastclip)


def write_table(results: list[LayerResult], args: argparse.Namespace, path: Path) -> None:
    """Write the markdown table of spectral norms.

    Args:
        results: one entry per layer.
        args: the parsed command line (for the caption).
        path: where to write ``table.md``.

    Example:
        >>> import tempfile
        >>> ns = argparse.Namespace(channels=2, kernel=3, size=8, target=1.0, rounds=1)
        >>> res = run_layer(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), 1.0, 8, 1)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_table([res], ns, Path(tmp) / "table.md")
    """
    fast = any(r.fastclip is not None for r in results)
    head = [
        "layer",
        "σ₁ before",
        "σ₁ after 1 FFT clip",
        f"σ₁ after {args.rounds} FFT clips",
        "σ > target after 1 clip",
        "spectrum error after 1 clip",
        f"spectrum error after {args.rounds} clips",
    ]
    if fast:
        head.append("σ₁ after FastClip")
    lines = [
        f"# Representability: FFT clipping of circular {args.channels}→{args.channels} "
        f"{args.kernel}×{args.kernel} convolutions on {args.size}×{args.size} inputs, target {args.target:g}",
        "",
        "All values are exact singular values of the circular convolution (per-frequency SVDs of the "
        "kernel's FFT). The FFT clip sets every singular value above the target to the target, which needs "
        "a kernel of full spatial support; projecting back onto the layer's support moves the spectrum "
        "again. Spectrum error: ‖σ − min(σ₀, target)‖ / ‖min(σ₀, target)‖ over all sorted singular values "
        "σ, against the clipped original spectrum σ₀.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for i, r in enumerate(results):
        tol = 1e-9 * args.target
        over = int((r.after > args.target + tol).sum())
        err = float((r.after - r.ideal).norm() / r.ideal.norm())
        err_rounds = float((r.after_rounds - r.ideal).norm() / r.ideal.norm())
        row = [
            str(i),
            f"{float(r.before[0]):.4f}",
            f"{r.sigma_rounds[0]:.4f}",
            f"{r.sigma_rounds[-1]:.4f}",
            f"{over} / {r.after.numel()}",
            f"{err:.3g}",
            f"{err_rounds:.3g}",
        ]
        if fast:
            row.append("n/a" if r.fastclip is None else f"{r.fastclip:.4f}")
        lines.append("| " + " | ".join(row) + " |")
    if not fast:
        lines += [
            "",
            "FastClip (`lightning_specclip.spectral.clip`) was not importable when this table was made.",
        ]
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[LayerResult], target: float, path: Path) -> None:
    """Plot ``σ₁`` over repeated FFT clips for every layer, and the first layer's spectra.

    Args:
        results: one entry per layer.
        target: the clip value (a reference line).
        path: where to write the PNG.

    Example:
        >>> import tempfile
        >>> res = run_layer(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), 1.0, 8, 2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot([res], 1.0, Path(tmp) / "fig.png")
    """
    fig, (ax_rounds, ax_spec) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        rounds = range(1, len(r.sigma_rounds) + 1)
        ax_rounds.plot(rounds, r.sigma_rounds, marker="o", ms=3, label=f"layer {i}: FFT clip")
    fast = [r.fastclip for r in results if r.fastclip is not None]
    if fast:
        ax_rounds.plot([1] * len(fast), fast, marker="*", ms=12, ls="", color="k", label="FastClip (all layers)")
    ax_rounds.axhline(target, color="k", ls="--", lw=1, label="target")
    ax_rounds.xaxis.get_major_locator().set_params(integer=True)
    ax_rounds.set_xlabel("FFT clipping rounds")
    ax_rounds.set_ylabel("σ₁ after clipping (exact, circular)")
    ax_rounds.set_title("Repeated FFT clipping approaches the target only slowly")
    ax_rounds.legend(fontsize=8)

    r = results[0]
    idx = torch.arange(1, r.before.numel() + 1)
    ax_spec.plot(idx, r.before, label="before")
    ax_spec.plot(idx, r.ideal, label="min(σ, target): needs a full-support kernel")
    ax_spec.plot(idx, r.after, label="FFT clip, kernel projected onto k×k (1 round)")
    ax_spec.plot(idx, r.after_rounds, label=f"FFT clip, {len(r.sigma_rounds)} rounds")
    ax_spec.axhline(target, color="k", ls="--", lw=1, label="target")
    ax_spec.set_xlabel("index of the singular value (descending)")
    ax_spec.set_ylabel("singular value")
    ax_spec.set_title("Layer 0: the whole spectrum")
    ax_spec.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[LayerResult]:
    """Run the experiment and write ``table.md`` and ``representability.png``.

    Args:
        argv: command line (default ``sys.argv[1:]``).

    Returns:
        list[LayerResult]: the per-layer results.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:  # doctest: +ELLIPSIS
        ...     res = main(["--out", tmp, "--layers", "1", "--channels", "2", "--size", "8", "--rounds", "2"])
        wrote ... vs target 1 ...
        >>> len(res)
        1
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/representability"), help="output folder")
    parser.add_argument("--layers", type=int, default=4, help="number of random layers")
    parser.add_argument("--channels", type=int, default=16, help="input and output channels")
    parser.add_argument("--kernel", type=int, default=3, help="kernel size (odd)")
    parser.add_argument("--size", type=int, default=16, help="input height and width")
    parser.add_argument("--target", type=float, default=1.0, help="clip value")
    parser.add_argument("--rounds", type=int, default=20, help="repeated FFT clips")
    parser.add_argument("--scale", type=float, default=4.0, help="factor on PyTorch's default initialisation")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.kernel % 2 == 0 or args.rounds < 1 or args.layers < 1:
        parser.error("--kernel must be odd, --rounds and --layers positive")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    results = []
    for _ in range(args.layers):
        conv = nn.Conv2d(
            args.channels,
            args.channels,
            args.kernel,
            padding=args.kernel // 2,
            padding_mode="circular",
            bias=False,
        ).double()
        with torch.no_grad():
            conv.weight.mul_(args.scale)
        results.append(run_layer(conv, args.target, args.size, args.rounds))
    write_table(results, args, args.out / "table.md")
    plot(results, args.target, args.out / "representability.png")
    worst = max(r.sigma_rounds[0] for r in results)
    print(
        f"wrote {args.out / 'table.md'} and {args.out / 'representability.png'}; "
        f"largest σ₁ after one FFT clip {worst:.4f} vs target {args.target:g} "
        f"(miss {100 * (worst / args.target - 1):.1f}%)"
    )
    if not math.isfinite(worst):
        raise RuntimeError("non-finite spectral norm")
    return results


if __name__ == "__main__":
    main()
