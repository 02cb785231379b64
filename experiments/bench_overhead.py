"""Training-time overhead of SpectralClipCallback: fit time with the callback over fit time without it.

The paper's schedule: a warm-up of the spectrum solver once, one warm-started iteration per optimizer step,
a clip every 100 steps (and one at the end of training). ResNet-18 for 32×32 inputs on synthetic data, every
Conv and the final Linear selected (21 layers). All runs share one process, the same data, the same initial
weights and the same number of steps. The baseline (no callback) runs first and again after every round of the
methods (``--repeats`` rounds); each method's fit is divided by the mean of the two baseline fits around it, and
the median of these paired ratios over the rounds is reported. On a shared machine a single ratio moves by
several percent from run to run, so the time spent inside the callback's hooks is also measured in the same
fit: "ratio within the run" is fit time / (fit time − callback time), the overhead free of the drift between
runs.

    python experiments/bench_overhead.py                      # CPU: width 16, 300 steps
    python experiments/bench_overhead.py --width 16 --batch-size 128 --steps 200 --methods fastclip --repeats 3
    python experiments/bench_overhead.py --width 16 --batch-size 128 --steps 200 --methods fastclip --rusage
    python experiments/bench_overhead.py --device cuda --width 64 --batch-size 128 --steps 600
    python experiments/bench_overhead.py --model torchvision:mobilenet_v3_small --steps 20 --every-n-steps 5

``--model torchvision:NAME`` trains an unmodified torchvision model (random weights, 10 classes) instead: a short
fine-tuning-like run, where the warm-up and the clip events are most of the cost.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_specclip import SpectralClipCallback
from lightning_specclip.models import ResNet18
from lightning_specclip.tracking import spectral_norms

COMPARED = ("fastclip", "gouk", "miyato", "none")


class _Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


HOOKS = (
    "setup",
    "on_train_start",
    "on_train_batch_end",
    "on_before_optimizer_step",
    "on_save_checkpoint",
    "on_train_end",
)


def _time_hooks(callback: pl.Callback, spent: list[float]) -> None:
    """Wrap the callback's hooks so that the time spent in them adds up in ``spent``.

    Host time: on a GPU the hooks' kernels run asynchronously, and waiting for them here would stop the host
    from running ahead of the device in every fit with the callback (a cost the callback itself does not have).
    """
    for hook in HOOKS:
        original = getattr(callback, hook)

        def timed(*args: object, _original=original, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        setattr(callback, hook, timed)


def _network(args: argparse.Namespace) -> nn.Module:
    """The network: the project's ResNet-18 at ``--width``, or ``torchvision:NAME`` as torchvision builds it."""
    if args.model == "resnet18":
        return ResNet18(width=args.width)
    return torchvision.models.get_model(args.model.removeprefix("torchvision:"), weights=None, num_classes=10)


def _describe(args: argparse.Namespace) -> str:
    return f"ResNet-18 (width {args.width})" if args.model == "resnet18" else args.model


def _fit(
    args: argparse.Namespace, method: str | None, state: dict, loader: DataLoader, track_every: int = 1
) -> tuple[float, float, nn.Module, tuple[float, float, int]]:
    """Fit time, time in the callback's hooks, the trained network, and (CPU user s, CPU sys s, minor page faults)
    of the process during the fit."""
    net = _network(args)
    net.load_state_dict(state)
    callbacks = []
    spent = [0.0]
    if method is not None:
        callbacks.append(
            SpectralClipCallback(
                args.target,
                method=method,
                warmup_iters=100,
                iters_per_step=1,
                every_n_steps=args.every_n_steps,
                track_every_n_steps=track_every,
            )
        )
        _time_hooks(callbacks[0], spent)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    model = _Classifier(net)
    if args.device == "cuda":
        torch.cuda.synchronize()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    trainer.fit(model, loader)
    if args.device == "cuda":
        torch.cuda.synchronize()
    fit = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    usage = (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt)
    return fit, spent[0], net, usage


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; print and write the markdown table.

    Args:
        argv: command-line arguments (see ``--help``).

    Returns:
        str: the markdown table.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--model", default="resnet18", help="resnet18 (the project's, see --width) or torchvision:NAME (e.g. resnet18)"
    )
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 base width (64 is the standard model)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every-n-steps", type=int, default=100)
    parser.add_argument("--target", type=float, default=1.0)
    parser.add_argument("--methods", nargs="+", default=list(COMPARED), choices=COMPARED)
    parser.add_argument("--measure", action="store_true", help="also measure the final spectral norms (slow)")
    parser.add_argument(
        "--extra-track-every", type=int, default=0, help="also time fastclip with track_every_n_steps=N (0: off)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds of (every method, then the baseline); medians are reported"
    )
    parser.add_argument(
        "--rusage", action="store_true", help="also report the process's CPU time and page faults per fit (medians)"
    )
    parser.add_argument("--out", type=Path, default=Path("reports/bench_overhead.md"))
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    data = TensorDataset(torch.rand(args.batch_size * 16, 3, 32, 32), torch.randint(0, 10, (args.batch_size * 16,)))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    state = _network(args).state_dict()
    _fit(argparse.Namespace(**{**vars(args), "steps": 5}), "fastclip", state, loader)  # warm caches and kernels

    runs: list[tuple[str, int]] = [(method, 1) for method in args.methods]
    if args.extra_track_every:
        runs.append((f"fastclip, track every {args.extra_track_every} steps", args.extra_track_every))
    # Baseline, then every method (in a rotated order), then the baseline again, `repeats` times: each method's
    # fit is compared with the mean of the two baseline fits around it, and the median over repeats is reported.
    usage: dict[str, list[tuple[float, float, int]]] = {"no callback": [], **{name: [] for name, _ in runs}}

    def fit_baseline() -> float:
        fit, _, _, used = _fit(args, None, state, loader)
        usage["no callback"].append(used)
        return fit

    baseline = [fit_baseline()]
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    spent: dict[str, list[float]] = {name: [] for name, _ in runs}
    paired: dict[str, list[float]] = {name: [] for name, _ in runs}
    nets: dict[str, nn.Module] = {}
    for round_ in range(args.repeats):
        shift = round_ % len(runs)  # rotate the order: no method is always the first after the baseline
        for name, every in runs[shift:] + runs[:shift]:
            method = "fastclip" if every > 1 else name
            fit, inside, nets[name], used = _fit(args, method, state, loader, every)
            times[name].append(fit)
            spent[name].append(inside)
            usage[name].append(used)
        baseline.append(fit_baseline())
        for name in times:
            paired[name].append(times[name][-1] / statistics.mean(baseline[-2:]))
    base = statistics.median(baseline)

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    lines = [
        f"{_describe(args)} on 3×32×32, batch {args.batch_size}, {args.steps} steps, device: {device}, "
        f"torch threads: {torch.get_num_threads()}",
        f"schedule: warm-up 100 iterations, 1 iteration per step, clip every {args.every_n_steps} steps, "
        f"target {args.target}",
        "",
        "| method | fit time (s) | ratio to no callback | time in the callback (s) | ratio within the run |"
        + (" max σ after |" if args.measure else ""),
        "|---|---|---|---|---|" + ("---|" if args.measure else ""),
        f"| no callback | {base:.1f} (runs: {', '.join(f'{t:.1f}' for t in baseline)}) | 1.000 | – | 1.000 |"
        + (" |" if args.measure else ""),
    ]
    example = torch.rand(1, 3, 32, 32)
    for method in times:
        name = f"{method} (track only)" if method == "none" else method
        fit, inside = statistics.median(times[method]), statistics.median(spent[method])
        within = statistics.median(t / (t - c) for t, c in zip(times[method], spent[method], strict=True))
        ratio = statistics.median(paired[method])
        fits = "" if args.repeats == 1 else f" (runs: {', '.join(f'{t:.1f}' for t in times[method])})"
        ratios = "" if args.repeats == 1 else f" (runs: {', '.join(f'{r:.3f}' for r in paired[method])})"
        row = f"| {name} | {fit:.1f}{fits} | {ratio:.3f}{ratios} | {inside:.1f} | {within:.3f} |"
        if args.measure:
            norms = spectral_norms(nets[method].cpu().float(), example)["layers"]
            row += f" {max(norms.values()):.3f} |"
        lines.append(row)
    if args.rusage:  # CPU time of all threads and minor page faults of the whole process, per fit
        lines += ["", "| method | CPU user (s) | CPU sys (s) | minor page faults |", "|---|---|---|---|"]
        for method, used in usage.items():
            user, sys_, faults = (statistics.median(u[i] for u in used) for i in range(3))
            lines.append(f"| {method} | {user:.1f} | {sys_:.1f} | {faults:,.0f} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
