"""The per-step update's floor on a CPU: ways to compute ``(A x, AᵀA x)`` for every layer at batch 1, side by side.

The paper's schedule runs one power step per layer after every optimizer step: two batch-1 products per layer.
Their share of a training step is the part of the callback's overhead no scheduling can remove. This benchmark
times, for ResNet-18 (21 maps) right after a batch-128 training step (caches as a training loop leaves them:
"cold") and back to back ("hot"), exact ways to run those products:

* ``PowerStep``: what the clipper runs (every layer alone, direct kernel calls);
* same-geometry convolutions as one grouped convolution (``PowerStep(group=True)``);
* channels-last tensors;
* the adjoint as a forward convolution (flipped kernel at stride 1, a transposed convolution at stride 2);
* one intra-op thread.

Each is checked against float64 products (largest relative error over layers). Reported with the training step's
own time, so that "products / step" is the per-step update's floor as a fraction of training.

    python experiments/bench_products.py                 # width 16, writes reports/bench_products.md
    python experiments/bench_products.py --repeats 3     # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_specclip import SpectralClipper
from lightning_specclip.models import ResNet18
from lightning_specclip.spectral import ImplicitLinear
from lightning_specclip.spectral.power import Grams

Products = Callable[[list[Tensor]], list[tuple[Tensor, Tensor]]]
_MASK = (True, False, False)


def _direct(ops: list[ImplicitLinear], memory_format: torch.memory_format, flipped: bool) -> Products:
    """Every layer alone with direct kernel calls; optionally channels-last, or the adjoint as a forward conv."""

    def run(xs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        out = []
        for A, x in zip(ops, xs, strict=True):
            m, W = A.op, A.tensors["weight"]
            if isinstance(m, nn.Linear):
                y = F.linear(x, W)
                out.append((y @ W, y))
                continue
            x, W = x.contiguous(memory_format=memory_format), W.contiguous(memory_format=memory_format)
            y = F.conv2d(x, W, None, m.stride, m.padding, m.dilation, m.groups)
            if flipped and m.groups == 1 and m.dilation == (1, 1):
                if m.stride == (1, 1):
                    pad = [k - 1 - p for k, p in zip(m.kernel_size, m.padding, strict=True)]
                    g = F.conv2d(y, W.transpose(0, 1).flip(-1, -2), None, 1, pad)
                else:
                    extra = [
                        n - ((o - 1) * s - 2 * p + k)
                        for n, o, s, p, k in zip(
                            x.shape[2:], y.shape[2:], m.stride, m.padding, m.kernel_size, strict=True
                        )
                    ]
                    g = F.conv_transpose2d(y, W, None, m.stride, m.padding, extra)
            else:
                g = torch.ops.aten.convolution_backward(
                    y, x, W, None, m.stride, m.padding, m.dilation, False, (0, 0), m.groups, _MASK
                )[0]
            out.append((g, y))
        return out

    return run


def _reference(ops: list[ImplicitLinear], xs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    out = []
    for A, x in zip(ops, xs, strict=True):
        B = ImplicitLinear(A.op, A.input_shape, dtype=torch.float64, check_affine=False)
        out.append(B.gram(x.double()))
    return out


def _error(got: list[tuple[Tensor, Tensor]], want: list[tuple[Tensor, Tensor]]) -> float:
    return max(
        float((a.double().reshape(b.shape) - b).norm() / b.norm())
        for pair, ref in zip(got, want, strict=True)
        for a, b in zip(pair, ref, strict=True)
    )


def main(argv: list[str] | None = None) -> str:
    """Run the measurements; print and write the markdown table.

    Args:
        argv: command-line arguments (see ``--help``).

    Returns:
        str: the markdown.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30, help="timed calls of each variant (medians)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench_products.md"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    net = ResNet18(width=args.width)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.rand(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    clipper = SpectralClipper(net, 1.0, every_n_steps=10**9)
    net(x)
    clipper.step()  # fixes the maps from the input shapes it saw
    clipper.remove()
    ops = [ImplicitLinear(t.module, t.input_shape, check_affine=False) for t in clipper.maps]
    xs = [torch.randn(1, *A.input_shape) for A in ops]

    def train_step() -> None:
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()

    variants: dict[str, tuple[Products, int]] = {
        "PowerStep's products (what the clipper runs)": (Grams(ops, group=False), threads),
        "same-geometry convolutions grouped": (Grams(ops, group=True), threads),
        "channels-last": (_direct(ops, torch.channels_last, flipped=False), threads),
        "adjoint as a forward convolution": (_direct(ops, torch.contiguous_format, flipped=True), threads),
        "one intra-op thread": (Grams(ops, group=False), 1),
    }
    cold: dict[str, list[float]] = {name: [] for name in variants}
    hot: dict[str, list[float]] = {name: [] for name in variants}
    steps: list[float] = []
    with torch.no_grad():
        for run, n in variants.values():  # warm up each (oneDNN primitives, allocator)
            torch.set_num_threads(n)
            run(xs)
    for _ in range(args.repeats):
        for name, (run, n) in variants.items():  # interleaved: the machine's drift hits every variant alike
            torch.set_num_threads(threads)
            start = time.perf_counter()
            train_step()
            steps.append(time.perf_counter() - start)
            torch.set_num_threads(n)
            with torch.no_grad():
                start = time.perf_counter()
                run(xs)
                cold[name].append(time.perf_counter() - start)
                start = time.perf_counter()
                run(xs)
                hot[name].append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    step = statistics.median(steps)
    base = statistics.median(cold[next(iter(variants))])
    reference = _reference(ops, xs)  # the weights as the training steps left them
    rows = []
    for name, (run, _) in variants.items():
        with torch.no_grad():
            error = _error(run(xs), reference)
        c, h = statistics.median(cold[name]), statistics.median(hot[name])
        rows.append(f"| {name} | {c * 1e3:.2f} | {h * 1e3:.2f} | {c / base:.2f} | {c / step:.2%} | {error:.1e} |")
    lines = [
        f"ResNet-18 (width {args.width}), {len(ops)} maps at batch 1, training step at batch {args.batch_size}: "
        f"{step * 1e3:.0f} ms (median); torch {torch.__version__}, {threads} threads, CPU; medians of "
        f"{args.repeats} calls",
        "",
        "| products of every map | cold (ms) | hot (ms) | cold / PowerStep | cold / training step | max rel. error |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
