"""Spectrum extraction benchmark: layer kinds × methods, side by side in one process.

For each layer kind (convolutions with zero, circular and reflect padding, stride 2, a 5×5 kernel, a
``Conv1d``, a ``ConvTranspose2d`` with stride 2, conv → BatchNorm, and a ``Linear`` for reference) it
measures the top singular value with

* ``default``: :func:`lightning_specclip.spectrum` (``solver="auto"``, block Krylov, library defaults);
* ``power_qr``: the published PowerQR (``solver="power_qr"``), with the library's stopping rule and with
  the same number of ``AᵀA`` products as the default used;
* ``gouk``: single-vector power iteration through the layer's own conv / conv-transpose (Gouk et al., 2021;
  assumes zero padding), with the default's budget of ``AᵀA`` products;
* ``miyato``: power iteration on the reshaped kernel (Miyato et al., 2018; what
  ``torch.nn.utils.parametrizations.spectral_norm`` does), 100 iterations;
* ``arpack``: SciPy's ARPACK on the implicit operator
  (:func:`lightning_specclip.spectral.exact.lanczos_singular_values`), ``tol=1e-5``;
* ``fft``: per-frequency SVDs of the kernel (:func:`lightning_specclip.spectral.exact.fft_singular_values`),
  only where exact (circular padding, stride dividing the input size);

against a ground truth (dense float64 SVD for small layers; FFT in float64 for circular padding; ARPACK in
float64 with ``tol=0`` otherwise), reporting the relative error, the wall time (median of ``--repeats``) and
the ``AᵀA`` products (one forward and one backward pass per vector).

Then the time to reach a relative top-1 error of ``1e-4`` for ``default``, ``power_qr`` and ``arpack``:

* ``default`` and ``arpack``: for each of ``--seeds`` starting vectors (solver seeds), the loosest tolerance
  from a fixed ladder whose answer is within ``1e-4`` (the same treatment for both), timed; the median over
  the seeds is reported. One random start decides a lot on clustered spectra: ARPACK needs 61 to 261
  products on the Conv1d kind depending on its seed, so a single seed compares luck, not solvers;
* ``power_qr``: iterated in chunks (``init=previous.right``, which continues the iteration exactly since
  its state is the block ``X``), timing only the :func:`spectrum` calls, until the error is ``≤ 1e-4``
  (chunks of at most a tenth of the iterations so far; capped, then reported as not reached; a run longer
  than 20 s is not repeated; one seed: it is an order of magnitude away).

All solvers share one :class:`~lightning_specclip.ImplicitLinear` per layer (built untimed) and run with
``torch.set_num_threads(--threads)`` and the same limit on the BLAS threads of NumPy/SciPy (threadpoolctl),
which ARPACK uses: left at its default (all cores), OpenBLAS spins against torch on a 2-core machine and makes
ARPACK several times slower. ``--basis-size`` and ``--block-size`` pass tuning options to the default solver.
Writes a markdown report to ``--out`` and prints it::

    .venv/bin/python experiments/bench_spectrum.py            # full run, several minutes on 2 cores
    .venv/bin/python experiments/bench_spectrum.py --quick    # small layers, seconds
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:  # ARPACK's BLAS (OpenBLAS inside SciPy) has its own threads: limit them like torch's
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn (the experiments extra)
    threadpool_limits = None

from lightning_specclip import ImplicitLinear, spectrum
from lightning_specclip.methods.gouk import gouk_sigma
from lightning_specclip.methods.miyato import miyato_sigma
from lightning_specclip.spectral.exact import dense_singular_values, fft_singular_values, lanczos_singular_values

__all__ = ["Kind", "Row", "TargetRow", "kinds", "main", "run"]

TARGET = 1e-4
# the same ladder of tolerances for both solvers that have a stopping rule (ARPACK also gets tol=0): four steps
# a decade, so that neither solver's time depends much on where its answer crosses the 1e-4 line
DEFAULT_TOLS = tuple(float(f"{10 ** (-q / 4):.3g}") for q in range(4, 25))
ARPACK_TOLS = (*DEFAULT_TOLS, 0.0)
DENSE_LIMIT = 2048  # largest input size for the dense SVD ground truth
DEFAULT_OPTIONS: dict[str, Any] = {}  # extra keyword arguments of the default solver (--basis-size, --block-size)


@dataclass
class Kind:
    """One layer kind of the benchmark.

    Attributes:
        name: short label.
        build: makes the layer (called under a fixed seed).
        input_shape: one input, without the batch dimension.
        conv: whether the issue's timing target applies (convolution kinds).
        fft: keyword arguments of :func:`fft_singular_values` where it is exact (circular padding), else
            ``None``.
        single_layer: ``Linear``/``Conv``/``ConvTranspose`` alone, where Gouk's and Miyato's estimators apply.
        miyato_dim: the output dimension of the weight for Miyato (``1`` for transposed convolutions).
    """

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    conv: bool = True
    fft: dict[str, Any] | None = None
    single_layer: bool = True
    miyato_dim: int = 0


@dataclass
class Row:
    """One (layer kind, method) measurement.

    Attributes:
        kind: layer kind.
        method: method label.
        sigma: the estimate of the top singular value (``nan`` when not applicable).
        error: relative error against the ground truth.
        seconds: median wall time.
        products: ``AᵀA`` products (``None`` where the method does not apply the layer).
        note: how it was run, or why it does not apply.
    """

    kind: str
    method: str
    sigma: float = math.nan
    error: float = math.nan
    seconds: float = math.nan
    products: float | None = None
    note: str = ""


@dataclass
class TargetRow:
    """Time to reach ``TARGET`` relative top-1 error for one layer kind.

    Attributes:
        kind: layer kind.
        conv: whether the issue's target applies.
        truth: the ground truth and where it came from.
        results: per method (``default``, ``power_qr``, ``arpack``): seconds (``nan`` if not reached), error,
            ``AᵀA`` products and the setting used.
    """

    kind: str
    conv: bool
    truth: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels) * 0.5)
        bn.running_var.copy_(torch.rand(channels) + 0.5)
        bn.weight.copy_(1 + 0.3 * torch.randn(channels))
        bn.bias.copy_(0.1 * torch.randn(channels))
    return bn


def kinds(quick: bool = False) -> list[Kind]:
    """The layer kinds: 64 → 64 channels on 32×32 inputs (length 256 in 1-D), or 8 → 8 on 10×10 with ``quick``.

    Args:
        quick: small layers for a smoke test (dense ground truth, seconds in all).

    Returns:
        list[Kind]: the kinds, convolution kinds first.

    Example:
        >>> [k.name for k in kinds(quick=True)][:3]
        ['conv3x3 zeros', 'conv3x3 circular', 'conv3x3 reflect']
    """
    c, n, n1 = (8, 10, 100) if quick else (64, 32, 256)
    img = (c, n, n)
    circ = {"input_size": (n, n)}
    return [
        Kind("conv3x3 zeros", lambda: nn.Conv2d(c, c, 3, padding=1), img),
        Kind("conv3x3 circular", lambda: nn.Conv2d(c, c, 3, padding=1, padding_mode="circular"), img, fft=circ),
        Kind("conv3x3 reflect", lambda: nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect"), img),
        Kind("conv3x3 stride 2", lambda: nn.Conv2d(c, c, 3, padding=1, stride=2), img),
        Kind(
            "conv3x3 stride 2 circular",
            lambda: nn.Conv2d(c, c, 3, padding=1, stride=2, padding_mode="circular"),
            img,
            fft={**circ, "stride": 2},
        ),
        Kind("conv5x5 zeros", lambda: nn.Conv2d(c, c, 5, padding=2), img),
        Kind("conv1d k3 zeros", lambda: nn.Conv1d(c, c, 3, padding=1), (c, n1)),
        Kind(
            "convT2d stride 2",
            lambda: nn.ConvTranspose2d(c, c, 4, stride=2, padding=1),
            (c, n // 2, n // 2),
            miyato_dim=1,
        ),
        Kind("conv3x3 → BN", lambda: nn.Sequential(nn.Conv2d(c, c, 3, padding=1), _bn(c)), img, single_layer=False),
        Kind("linear", lambda: nn.Linear(c * 16, c * 16), (c * 16,), conv=False),
    ]


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """Run ``fn`` ``repeats`` times; return the last result and the median wall time."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _rel(estimate: float, truth: float) -> float:
    return abs(estimate - truth) / truth


def _ground_truth(kind: Kind, module: nn.Module) -> tuple[float, str]:
    n = math.prod(kind.input_shape)
    if n <= DENSE_LIMIT:
        return dense_singular_values(module, kind.input_shape)[0].item(), "dense SVD, float64"
    if kind.fft is not None:
        return fft_singular_values(module.weight, k=1, **kind.fft)[0].item(), "FFT, float64"
    res = lanczos_singular_values(module, kind.input_shape, k=1, tol=0.0, dtype=torch.float64)
    return res.values[0].item(), "ARPACK, float64, tol=0"


def _side_by_side(kind: Kind, module: nn.Module, A: ImplicitLinear, truth: float, repeats: int) -> list[Row]:
    rows = []
    default, secs = _timed(lambda: spectrum(A, k=1, **DEFAULT_OPTIONS), repeats)
    budget = default.matvecs
    rows.append(
        Row(kind.name, "default", default.sigma, _rel(default.sigma, truth), secs, budget, "tol=1e-5 (library default)")
    )
    pqr, secs = _timed(lambda: spectrum(A, k=1, solver="power_qr"), repeats)
    rows.append(
        Row(kind.name, "power_qr", pqr.sigma, _rel(pqr.sigma, truth), secs, pqr.matvecs, "tol=1e-5 (library default)")
    )
    pqr, secs = _timed(lambda: spectrum(A, k=1, solver="power_qr", max_iters=budget, tol=1e-30), repeats)
    rows.append(Row(kind.name, "power_qr", pqr.sigma, _rel(pqr.sigma, truth), secs, pqr.matvecs, "default's budget"))
    if kind.single_layer:
        (sigma, _), secs = _timed(lambda: gouk_sigma(module, kind.input_shape, n_iter=budget), repeats)
        note = "default's budget; zero padding assumed"
        rows.append(Row(kind.name, "gouk", sigma, _rel(sigma, truth), secs, budget + 0.5, note))
        (sigma, _), secs = _timed(lambda: miyato_sigma(module.weight, n_iter=100, dim=kind.miyato_dim), repeats)
        rows.append(Row(kind.name, "miyato", sigma, _rel(sigma, truth), secs, None, "100 iterations on the kernel"))
    else:
        rows.append(Row(kind.name, "gouk", note="n/a: not a single conv/linear layer"))
        rows.append(Row(kind.name, "miyato", note="n/a: not a single conv/linear layer"))
    res, secs = _timed(lambda: lanczos_singular_values(A, k=1, tol=1e-5), repeats)
    sigma = res.values[0].item()
    rows.append(Row(kind.name, "arpack", sigma, _rel(sigma, truth), secs, res.gram_applications, "tol=1e-5"))
    if kind.fft is not None:
        values, secs = _timed(lambda: fft_singular_values(module.weight, k=1, dtype=torch.float32, **kind.fft), repeats)
        sigma = values[0].item()
        rows.append(Row(kind.name, "fft", sigma, _rel(sigma, truth), secs, None, "float32"))
    else:
        rows.append(Row(kind.name, "fft", note="n/a: exact for circular padding only"))
    return rows


def _loosest(
    run_once: Callable[[float], tuple[float, int]], tols: Sequence[float], truth: float
) -> tuple[float, float]:
    """The loosest tolerance whose answer is within ``TARGET``; ``nan`` if none is."""
    for tol in tols:
        sigma, _ = run_once(tol)
        if _rel(sigma, truth) <= TARGET:
            return tol, sigma
    return math.nan, math.nan


def _power_qr_to_target(A: ImplicitLinear, truth: float, cap: int) -> tuple[float, float, int]:
    """Iterate PowerQR in warm-started chunks until within ``TARGET``; time only the spectrum calls."""
    seconds, iters, prev = 0.0, 0, None
    err = math.inf
    while iters < cap:
        chunk = min(cap - iters, max(10, iters // 10))
        init = None if prev is None else prev.right
        start = time.perf_counter()
        prev = spectrum(A, k=1, solver="power_qr", init=init, max_iters=chunk, tol=1e-12)
        seconds += time.perf_counter() - start
        iters += prev.iters
        err = _rel(prev.sigma, truth)
        if err <= TARGET:
            return seconds, err, iters
    return math.nan, err, iters


def _median_over_seeds(
    run_once: Callable[[float, int], tuple[float, int]], tols: Sequence[float], truth: float, seeds: int, repeats: int
) -> dict[str, Any]:
    """Per seed (starting vector): the loosest tolerance within ``TARGET``, timed; the median over seeds."""
    seconds, products, settings = [], [], []
    for seed in range(seeds):
        tol, _ = _loosest(lambda t, seed=seed: run_once(t, seed), tols, truth)
        if math.isnan(tol):  # a seed that never got there: no median to report
            return {"seconds": math.nan, "error": math.nan, "products": None, "setting": f"not reached (seed {seed})"}
        (_, count), secs = _timed(lambda tol=tol, seed=seed: run_once(tol, seed), repeats)
        seconds.append(secs)
        products.append(count)
        settings.append(f"{tol:g}")
    return {
        "seconds": statistics.median(seconds),
        "error": math.nan,
        "products": int(statistics.median(products)),
        "setting": f"tol={'/'.join(dict.fromkeys(settings))}; products per seed {products}",
    }


def _to_target(
    kind: Kind, A: ImplicitLinear, truth: float, source: str, repeats: int, cap: int, seeds: int
) -> TargetRow:
    row = TargetRow(kind.name, kind.conv, f"{truth:.6f} ({source})")

    def default_once(tol: float, seed: int) -> tuple[float, int]:
        s = spectrum(A, k=1, tol=tol, seed=seed, **DEFAULT_OPTIONS)
        return s.sigma, s.matvecs

    row.results["default"] = _median_over_seeds(default_once, DEFAULT_TOLS, truth, seeds, repeats)

    runs = [_power_qr_to_target(A, truth, cap)]
    if not math.isnan(runs[0][0]) and runs[0][0] < 20:  # repeating a run of minutes adds little but time
        runs += [_power_qr_to_target(A, truth, cap) for _ in range(repeats - 1)]
    seconds = statistics.median(r[0] for r in runs)
    row.results["power_qr"] = {
        "seconds": seconds,
        "error": runs[0][1],
        "products": runs[0][2],
        "setting": (f"{runs[0][2]} iterations" if not math.isnan(seconds) else f"not reached in {cap}")
        + ("" if len(runs) == repeats else ", 1 run"),
    }

    def arpack_once(tol: float, seed: int) -> tuple[float, int]:
        res = lanczos_singular_values(A, k=1, tol=tol, seed=seed)
        return res.values[0].item(), res.gram_applications

    row.results["arpack"] = _median_over_seeds(arpack_once, ARPACK_TOLS, truth, seeds, repeats)
    return row


def run(
    quick: bool = False, repeats: int = 3, cap: int | None = None, seed: int = 0, seeds: int = 5
) -> tuple[list[Row], list[TargetRow]]:
    """Measure every layer kind with every method, and the time to ``TARGET`` error.

    Args:
        quick: small layers (see :func:`kinds`).
        repeats: timed repetitions per measurement (the median is reported).
        cap: most PowerQR iterations when chasing the target (default 20000, 3000 with ``quick``).
        seed: seed of the layers' weights (each kind gets ``seed + its index``).
        seeds: starting vectors (solver seeds ``0 … seeds−1``) over which the time to ``TARGET`` of the
            default and ARPACK is the median.

    Returns:
        tuple: the side-by-side rows and the time-to-target rows.

    Raises:
        ValueError: ``repeats`` or ``seeds`` below 1.

    Example:
        >>> rows, targets = run(quick=True, repeats=1)  # doctest: +SKIP
    """
    if repeats < 1 or seeds < 1:
        raise ValueError(f"repeats and seeds must be at least 1, got {repeats} and {seeds}")
    cap = cap or (3000 if quick else 20000)
    rows: list[Row] = []
    targets: list[TargetRow] = []
    for index, kind in enumerate(kinds(quick)):
        torch.manual_seed(seed + index)
        module = kind.build().eval()
        with torch.no_grad():
            truth, source = _ground_truth(kind, module)
        A = ImplicitLinear(module, kind.input_shape)
        start = time.perf_counter()
        rows += _side_by_side(kind, module, A, truth, repeats)
        targets.append(_to_target(kind, A, truth, source, repeats, cap, seeds))
        print(f"  {kind.name}: σ₁ = {truth:.6f} ({source}), {time.perf_counter() - start:.1f}s", flush=True)
    return rows, targets


def _fmt_s(seconds: float) -> str:
    if math.isnan(seconds):
        return "—"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _fmt_e(error: float) -> str:
    return "—" if math.isnan(error) else f"{error:.1e}"


def _ratio(a: float, b: float) -> float:
    return a / b if (b > 0 and not math.isnan(a) and not math.isnan(b)) else math.nan


def render(rows: list[Row], targets: list[TargetRow], header: str) -> str:
    """Format the measurements as markdown.

    Args:
        rows: side-by-side measurements.
        targets: time-to-target measurements.
        header: a line describing the machine and the run.

    Returns:
        str: the report.

    Example:
        >>> render([], [], "test").splitlines()[0]
        '## Spectrum extraction benchmark'
    """
    out = ["## Spectrum extraction benchmark", "", header, ""]
    out += [
        "### Top-1 singular value, methods side by side",
        "",
        "| layer | method | σ₁ estimate | rel. error | time | AᵀA products | setting |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        sigma = "—" if math.isnan(r.sigma) else f"{r.sigma:.6f}"
        products = "—" if r.products is None else f"{r.products:g}"
        out.append(
            f"| {r.kind} | {r.method} | {sigma} | {_fmt_e(r.error)} | {_fmt_s(r.seconds)} | {products} | {r.note} |"
        )
    out += [
        "",
        f"### Time to reach {TARGET:g} relative top-1 error",
        "",
        "| layer | σ₁ (ground truth) | default | power_qr | arpack | default / power_qr | default / arpack "
        "| default at tol=1e-5 / power_qr | target met |",
        "|---|---|---|---|---|---:|---:|---:|---|",
    ]
    failures = []
    library = {r.kind: r.seconds for r in rows if r.method == "default"}
    for t in targets:
        cells = []
        for method in ("default", "power_qr", "arpack"):
            r = t.results[method]
            products = "" if r["products"] is None else f", {r['products']} AᵀA"
            cells.append(f"{_fmt_s(r['seconds'])} ({r['setting']}{products})")
        d, p, a = (t.results[m]["seconds"] for m in ("default", "power_qr", "arpack"))
        vs_pqr, vs_arpack = _ratio(d, p), _ratio(d, a)
        if math.isnan(p) and not math.isnan(d):
            vs_pqr = 0.0  # PowerQR never got there
        ok = (not math.isnan(vs_pqr) and vs_pqr <= 0.25) and (not math.isnan(vs_arpack) and vs_arpack <= 1.0)
        met = ("yes" if ok else "**no**") if t.conv else "(not a conv kind)"
        if t.conv and not ok:
            failures.append(t.kind)
        pqr_ratio = "0 (PowerQR never got there)" if vs_pqr == 0.0 else f"{vs_pqr:.3f}"
        lib_ratio = _ratio(library.get(t.kind, math.nan), p)
        out.append(
            f"| {t.kind} | {t.truth} | {cells[0]} | {cells[1]} | {cells[2]} | {pqr_ratio} | {vs_arpack:.3f} "
            f"| {lib_ratio:.3f} | {met} |"
        )
    out += [
        "",
        "Target (issue 2): for conv kinds, default / power_qr ≤ 0.25 and default / arpack ≤ 1.",
        "Conv kinds missing it: " + (", ".join(failures) if failures else "none") + ".",
        "",
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the markdown report and write it to ``--out``.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``): ``--quick``, ``--out PATH`` (a ``.md`` file,
            or a directory to write ``bench_spectrum.md`` into), ``--repeats N``, ``--threads N``,
            ``--cap N``, ``--seed N``, ``--seeds N``, ``--basis-size N``, ``--block-size N``.

    Returns:
        int: ``0``.

    Raises:
        SystemExit: bad arguments (from ``argparse``).

    Example:
        >>> main(["--quick", "--repeats", "1", "--out", "/tmp/bench"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small layers, for a smoke test")
    parser.add_argument("--out", default="reports/bench_spectrum.md", help="markdown file or directory")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 3, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--cap", type=int, default=None, help="most PowerQR iterations when chasing 1e-4")
    parser.add_argument("--seed", type=int, default=0, help="seed of the layers' weights")
    parser.add_argument(
        "--seeds", type=int, default=None, help="starting vectors for the time to 1e-4 (default 5, 2 with --quick)"
    )
    parser.add_argument("--basis-size", type=int, default=None, help="basis_size of the default solver")
    parser.add_argument("--block-size", type=int, default=None, help="block_size of the default solver")
    args = parser.parse_args(argv)
    options = {"basis_size": args.basis_size, "block_size": args.block_size}
    DEFAULT_OPTIONS.clear()
    DEFAULT_OPTIONS.update({k: v for k, v in options.items() if v is not None})
    repeats = args.repeats or (1 if args.quick else 3)
    out = Path(args.out)
    if out.is_dir() or out.suffix != ".md":
        out = out / "bench_spectrum.md"
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    blas = threadpool_limits(limits=args.threads, user_api="blas") if threadpool_limits is not None else None
    try:
        start = time.perf_counter()
        seeds = args.seeds or (2 if args.quick else 5)
        rows, targets = run(quick=args.quick, repeats=repeats, cap=args.cap, seed=args.seed, seeds=seeds)
        total = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
        if blas is not None:
            blas.restore_original_limits()
    command = "experiments/bench_spectrum.py" + (" --quick" if args.quick else "")
    command += "".join(f" --{k.replace('_', '-')} {v}" for k, v in DEFAULT_OPTIONS.items())
    blas_note = f"BLAS threads {args.threads}" if blas is not None else "BLAS threads not limited (no threadpoolctl)"
    header = (
        f"`.venv/bin/python {command}` — {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, torch.set_num_threads({args.threads}), {blas_note}, median of {repeats}, "
        f"float32 operators, k=1, time to 1e-4: median over {seeds} starting vectors, total {total:.0f} s."
    )
    report = render(rows, targets, header)
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
