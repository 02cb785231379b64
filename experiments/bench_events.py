"""Cost of the clipper's pieces of work, per layer: a clip event by method, the per-step update, the warm-up.

Where the training-time overhead of ``bench_overhead.py`` comes from, counted rather than inferred: ResNet-18 for
32×32 inputs (every Conv and the final Linear: 21 maps), trained a few steps with a clip, then ``--drift`` more
steps without one (the weights grow back above the target, as between two clips of a real run). From that one
state, each method runs one clip event (the per-step update and the clip of every map, as
``SpectralClipper.step`` does at a clip step) on its own copy. Reported per event and per layer: wall time,
operator products (vectors through ``A``: the measurements' ``AᵀA`` products, the least-squares rounds'
products, and for the baselines our measurement of what they wrote, which their own papers do not pay), ATen
ops dispatched (each one a kernel launch on a GPU) and host synchronizations (``item``/``_local_scalar_dense``:
each one a wait for the device on a GPU), counted with ``torch.profiler`` on the CPU. Then the same for one
per-step update (also with same-geometry convolutions run as one grouped convolution,
``clipper.tracker.group_convolutions = True``, on a CPU) and for the warm-up (the first step).

    python experiments/bench_events.py                        # width 16, writes reports/bench_events.md
    python experiments/bench_events.py --width 4 --drift 2    # smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_specclip import SpectralClipper
from lightning_specclip.models import ResNet18
from lightning_specclip.spectral import operator, power

COMPARED = ("fastclip", "gouk", "miyato")
_SYNCS = ("aten::_local_scalar_dense", "aten::item")


@contextmanager
def _count_products() -> Iterator[Callable[[], int]]:
    """Count the vectors that go through any ``ImplicitLinear.apply`` inside the block, and those whose convolutions
    ``power.Grams`` runs directly (one per layer, grouped or not); yields a reader."""
    count = [0]
    original, grouped = operator.ImplicitLinear.apply, power.Grams.__call__

    def counted(self: operator.ImplicitLinear, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        count[0] += x.shape[0]
        return original(self, x, *args, **kwargs)

    def counted_grouped(self: power.Grams, vectors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        count[0] += sum(len(g) for g, direct in zip(self.groups, self.direct, strict=True) if direct)  # others: apply
        return grouped(self, vectors)

    operator.ImplicitLinear.apply = counted  # type: ignore[method-assign]
    power.Grams.__call__ = counted_grouped  # type: ignore[method-assign]
    try:
        yield lambda: count[0]
    finally:
        operator.ImplicitLinear.apply = original  # type: ignore[method-assign]
        power.Grams.__call__ = grouped  # type: ignore[method-assign]


def _measure(
    prepare: Callable[[], Callable[[], None]], products: Callable[[], int], repeats: int
) -> tuple[float, int, int, int]:
    """Median wall time (s) of the work ``prepare()`` returns, over ``repeats`` fresh runs (the preparation is not
    timed), then the products, ATen ops and host syncs of one more run."""
    times = []
    for _ in range(repeats):
        work = prepare()
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    work = prepare()
    before = products()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        work()
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    syncs = sum(e.count for e in events if e.key in _SYNCS)
    return statistics.median(times), products() - before, ops, syncs


def _run_method(
    method: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, products: Callable[[], int]
) -> tuple[dict[str, tuple[float, int, int, int]], int, float]:
    """Train with one method's clipper to the drifted state; measure its clip event, per-step update and warm-up.

    Returns:
        the measurements by name (``event``, ``per-step``, ``warm-up``), the number of maps, and the largest
        tracked σ right after the event.
    """
    torch.manual_seed(0)
    net = ResNet18(width=args.width)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    clipper = SpectralClipper(net, 1.0, method=method, every_n_steps=10**9, warmup_iters=100)

    def train_step() -> None:
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()

    train_step()
    first = copy.deepcopy(net.state_dict())

    def warmup() -> Callable[[], None]:  # the first step measures every map cold
        fresh = copy.deepcopy(net)
        fresh.load_state_dict(first)
        cold = SpectralClipper(fresh, 1.0, method=method, every_n_steps=10**9, warmup_iters=100)
        with torch.no_grad():
            fresh(x)  # the training-mode forward that shows the clipper its input shapes
        return cold.step

    measured = {"warm-up": _measure(warmup, products, args.repeats)}
    clipper.step()
    clipper.clip()
    for _ in range(args.drift):
        train_step()
        clipper.step()
    measured["per-step"] = _measure(lambda: clipper.step, products, args.repeats * 5)
    # the same update with same-geometry convolutions run as one grouped convolution
    clipper.tracker.group_convolutions = True
    measured["per-step, grouped convolutions"] = _measure(lambda: clipper.step, products, args.repeats * 5)
    clipper.tracker.group_convolutions = False
    saved_net, saved_clipper = copy.deepcopy(net.state_dict()), clipper.state_dict()

    def event() -> Callable[[], None]:
        net.load_state_dict(saved_net)  # every run starts from the same drifted weights and tracked state
        clipper.load_state_dict(saved_clipper)

        def run() -> None:  # what SpectralClipper.step does at a clip step
            clipper.track()
            clipper.clip_event(final=False)

        return run

    measured["event"] = _measure(event, products, args.repeats)
    worst = max(clipper.sigmas.values())
    maps = len(clipper.maps)
    clipper.remove()
    return measured, maps, worst


def main(argv: list[str] | None = None) -> str:
    """Run the measurements; print and write the markdown tables.

    Args:
        argv: command-line arguments (see ``--help``).

    Returns:
        str: the markdown.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--drift", type=int, default=20, help="training steps between the first clip and the event")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement (median)")
    parser.add_argument("--methods", nargs="+", default=list(COMPARED), choices=COMPARED)
    parser.add_argument("--out", type=Path, default=Path("reports/bench_events.md"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y = torch.rand(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    rows, work = [], []
    for method in args.methods:
        with _count_products() as products:
            measured, maps, worst = _run_method(method, args, x, y, products)
        seconds, n_products, ops, syncs = measured["event"]
        rows.append(
            f"| {method} | {seconds * 1e3:.0f} | {seconds / maps * 1e3:.1f} | {n_products / maps:.1f} | "
            f"{ops / maps:.0f} | {syncs / maps:.1f} | {worst:.4f} |"
        )
        for name in [n for n in ("per-step", "per-step, grouped convolutions", "warm-up") if n in measured]:
            seconds, n_products, ops, syncs = measured[name]
            work.append(f"| {method} | {name} | {seconds * 1e3:.1f} | {n_products} | {ops} | {syncs} |")
    lines = [
        f"ResNet-18 (width {args.width}) on 3×32×32, {maps} maps, {args.drift} steps of drift after a clip, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU",
        "",
        "| clip event | wall (ms) | wall per layer (ms) | products per layer | ATen ops per layer | host syncs per "
        "layer | largest tracked σ after |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| method | work | wall (ms) | products | ATen ops | host syncs |",
        "|---|---|---|---|---|---|",
        *work,
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
