"""Zoo: the callback, unchanged, in unmodified torchvision and timm models, checked against float64 ground truths.

Each model trains a few optimizer steps in a real ``lightning.pytorch.Trainer`` on small random images with
``SpectralClipCallback(target=1.0, every_n_steps=2)`` (0.5 for DeiT, whose init is below 1 everywhere; the final
clip at train end runs too), on the CPU with the suite's one intra-op thread. Then the spectral
norm of every selected layer (every ``Linear`` and ``Conv*d``, the callback's default) is measured here,
independently of what the callback reports: the layer's input shape is recorded with forward pre-hooks during
one train-mode forward of a copy of the model on a training batch, and σ₁ of ``x ↦ layer(x) − layer(0)`` on
inputs of that shape is computed in float64 (the weight's matrix norm for ``Linear``; a dense SVD or ARPACK on
a float64 copy of the layer for convolutions). Every layer must end at or below ``target · 1.02``.

Layers the callback says it will not clip (a layer that is not linear in its weight, such as timm's
``StdConv2d``, which standardizes its weight in ``forward``) are left out of the bound and listed in the
failure message; a plain ``nn.Linear``/``nn.ConvNd`` must never be among them. See :func:`refused_layers` for
how the callback is asked.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import lightning.pytorch as pl
import pytest
import torch
from helpers import Classifier
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.utils.data import DataLoader, TensorDataset

from lightning_specclip import SpectralClipCallback
from lightning_specclip.spectral.exact import dense_matrix, lanczos_singular_values

pytestmark = pytest.mark.slow

TARGET = 1.0
SLACK = 1.02  # the bound checked: true σ₁ ≤ TARGET · SLACK (FastClip lands within 1%)
STEPS = 4
BATCH = 4
IMAGE = (3, 32, 32)
NUM_CLASSES = 10
DENSE_MAX_IN = 512  # below this many inputs a dense float64 SVD is cheaper than ARPACK
# exact classes the callback must always clip (a subclass may transform its weight, like timm's StdConv2d)
STANDARD_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

# id -> (library, constructor name, extra keyword arguments); every model untrained, built as its library builds it
MODELS: dict[str, tuple[str, str, dict]] = {
    "tv-mobilenet_v3_small": ("torchvision", "mobilenet_v3_small", {}),
    "tv-efficientnet_b0": ("torchvision", "efficientnet_b0", {}),
    "tv-convnext_tiny": ("torchvision", "convnext_tiny", {}),
    "tv-regnet_x_400mf": ("torchvision", "regnet_x_400mf", {}),
    "tv-resnet18": ("torchvision", "resnet18", {}),
    "timm-resnetv2_50x1_bit": ("timm", "resnetv2_50x1_bit", {}),  # BiT: StdConv2d everywhere
    "timm-deit_tiny_patch16_224": ("timm", "deit_tiny_patch16_224", {"img_size": IMAGE[1]}),  # 2×2 patches + cls
    "timm-convnext_atto": ("timm", "convnext_atto", {}),
}
# timm's ViT init (trunc-normal, std 0.02) leaves every DeiT layer below 1: a lower target makes the clip act
TARGETS: dict[str, float] = {"timm-deit_tiny_patch16_224": 0.5}


def build(model_id: str) -> nn.Module:
    """One zoo model, randomly initialised (no weights can be downloaded), with ``NUM_CLASSES`` outputs."""
    library, name, kwargs = MODELS[model_id]
    if library == "torchvision":
        models = pytest.importorskip("torchvision.models")
        return getattr(models, name)(weights=None, num_classes=NUM_CLASSES, **kwargs)
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)


def loader(seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((STEPS * BATCH, *IMAGE), generator=gen)
    y = torch.randint(0, NUM_CLASSES, (STEPS * BATCH,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def selected_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """What the callback selects by default, found independently: every Linear and Conv*d/ConvTranspose*d."""
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Linear | _ConvNd)]


def record_input_shapes(model: nn.Module, batch: torch.Tensor) -> dict[str, list[tuple[int, ...]]]:
    """Every distinct per-sample input shape of every selected layer in one train-mode forward of a copy.

    A copy, so that nothing the model owns (BatchNorm running statistics) changes.
    """
    probe = copy.deepcopy(model).train()
    shapes: dict[str, list[tuple[int, ...]]] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen = shapes.setdefault(name, [])
                if tuple(args[0].shape[1:]) not in seen:
                    seen.append(tuple(args[0].shape[1:]))

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in selected_layers(probe)]
    try:
        with torch.no_grad():
            probe(batch)
    finally:
        for h in handles:
            h.remove()
    return shapes


def true_sigma(layer: nn.Module, shape: tuple[int, ...]) -> float:
    """σ₁ of ``x ↦ layer(x) − layer(0)`` on inputs of ``shape``, in float64, from the layer itself."""
    if isinstance(layer, nn.Linear):
        return float(torch.linalg.matrix_norm(layer.weight.detach().double(), 2))
    op = copy.deepcopy(layer).double().eval()  # float64 parameters and buffers; the model's layer is untouched
    if math.prod(shape) <= DENSE_MAX_IN:
        matrix = dense_matrix(op, shape)
        assert matrix.dtype == torch.float64
        return float(torch.linalg.matrix_norm(matrix, 2))
    result = lanczos_singular_values(op, shape, k=1, tol=1e-8)
    assert result.values.dtype == torch.float64
    return float(result.values[0])


def base_name(target_name: str) -> str:
    """The layer behind a target: ``"conv@16x8x8"`` (a further input shape) → ``"conv"``."""
    return target_name.split("@")[0]


def _summary_rows(callback: SpectralClipCallback) -> list[dict[str, str]]:
    """The rows of :meth:`SpectralClipCallback.summary` as ``{column: cell}``, cut at the header's columns."""
    lines = callback.summary().splitlines()[1:]  # the title, then the header and one row per target
    if not lines:
        return []
    header = lines[0]
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[max(0, i - 2) : i] == "  ")]
    columns = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    return [
        {col: line[a:b].strip() for col, a, b in zip(columns, starts, [*starts[1:], None], strict=True)}
        for line in lines[1:]
    ]


def refused_layers(callback: SpectralClipCallback) -> dict[str, str]:
    """Targets the callback tracks but says it does not clip, with the reason it gives.

    Asked every way the public API offers, so that the test follows the library as it grows:

    * ``callback.not_clipped`` (``{target name: reason}``, filled on the first batch), where it exists;
    * ``callback.options["method"].supports(target)`` is ``False`` (the older "tracked only" path);
    * the target's row in :meth:`SpectralClipCallback.summary` shows no target (``-``) although one float
      target covers every layer, or has a ``note`` saying why.
    """
    refused: dict[str, str] = {}
    for name, reason in (getattr(callback, "not_clipped", None) or {}).items():
        refused[name] = str(reason)
    method = callback.options["method"]
    for t in callback.maps:
        if not method.supports(t):
            refused.setdefault(t.name, f"method {method.name!r} does not support it")
    names = {t.name for t in callback.maps}
    for row in _summary_rows(callback):
        name = row.get("layer")
        if name not in names:
            continue
        if row.get("note"):
            refused.setdefault(name, f"summary: {row['note']}")
        elif isinstance(callback.options["target"], float) and row.get("target") == "-":
            refused.setdefault(name, "summary: no target")
    return refused


@dataclass
class LayerResult:
    """One selected layer at one input shape it ran at."""

    name: str
    kind: str
    shape: tuple[int, ...] | None  # what the recording forward saw (None: the layer never ran)
    target: str | None  # the callback's target for this layer and shape (None: not among its targets)
    sigma: float | None = None  # the float64 ground truth (None: not measured)
    reported: float | None = None  # callback.sigmas[target]

    def row(self) -> str:
        sigma = "-" if self.sigma is None else f"{self.sigma:.4f}"
        reported = "-" if self.reported is None else f"{self.reported:.4f}"
        return f"{self.name} [{self.kind} {self.shape}] true σ={sigma} reported σ={reported}"


@dataclass
class ZooRun:
    """What one model's fit left: every layer's ground truth, the refused targets, timings."""

    model_id: str
    target: float
    layers: list[LayerResult] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    clipped: int = 0  # targets whose weights some clip changed (the summary's clips column)
    fit_seconds: float = 0.0
    truth_seconds: float = 0.0

    @property
    def checked(self) -> list[LayerResult]:
        return [r for r in self.layers if r.sigma is not None]

    def problems(self) -> list[str]:
        bound = self.target * SLACK
        out = []
        for r in self.layers:
            if r.target in self.refused:  # listed in report(); the test checks no plain layer is among them
                continue
            if r.shape is None:
                out.append(f"{r.name} [{r.kind}] never ran in the recording forward")
            elif r.target is None:
                out.append(f"{r.row()}: not among the callback's targets at this input shape (not clipped)")
            elif r.sigma > bound:
                silent = r.reported is not None and r.reported <= bound
                out.append(f"{r.row()} > {bound:g}" + (" (SILENT: the callback reports it within)" if silent else ""))
        return out

    def report(self) -> str:
        worst = sorted(self.checked, key=lambda r: -r.sigma)[:5]
        lines = [
            f"{self.model_id}: {len(self.layers)} layer shapes, {len(self.checked)} checked, max true σ "
            f"{max((r.sigma for r in self.checked), default=float('nan')):.4f} (target {self.target:g}, "
            f"{self.clipped} clipped); "
            f"fit {self.fit_seconds:.1f}s, ground truth {self.truth_seconds:.1f}s",
            "worst: " + "; ".join(r.row() for r in worst),
        ]
        if self.refused:
            lines.append(f"not clipped by the callback ({len(self.refused)}, excluded from the bound):")
            lines += [f"  {name}: {reason}" for name, reason in sorted(self.refused.items())]
        return "\n".join(lines)


def run_zoo(model_id: str, *, seed: int = 0) -> tuple[ZooRun, pl.LightningModule, SpectralClipCallback]:
    """Build, train with the callback and measure every layer; a crash in ``fit`` propagates."""
    torch.manual_seed(seed)
    module = Classifier(build(model_id), lr=0.01)
    data = loader(seed)
    shapes = record_input_shapes(module, next(iter(data))[0])
    target = TARGETS.get(model_id, TARGET)
    callback = SpectralClipCallback(target=target, every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    run = ZooRun(model_id, target)
    start = time.perf_counter()
    trainer.fit(module, data)
    run.fit_seconds = time.perf_counter() - start
    assert trainer.global_step == STEPS
    measure(run, module, callback, shapes)
    return run, module, callback


def measure(
    run: ZooRun, module: nn.Module, callback: SpectralClipCallback, shapes: dict[str, list[tuple[int, ...]]]
) -> None:
    """Fill ``run`` with the ground truth of every selected layer at every input shape it ran at.

    A plain ``nn.Linear`` has one norm at every shape, so any callback target of it counts; a convolution's
    must be at the shape recorded here. Refused targets are not measured.
    """
    start = time.perf_counter()
    run.refused = refused_layers(callback)
    run.clipped = sum(1 for row in _summary_rows(callback) if row.get("clips", "0").isdigit() and row["clips"] != "0")
    reported = callback.sigmas
    by_layer: dict[str, dict[tuple[int, ...], str]] = {}
    for t in callback.maps:
        if t.kind == "layer":
            by_layer.setdefault(base_name(t.name), {})[tuple(t.input_shape)] = t.name
    for name, layer in selected_layers(module):
        targets = by_layer.get(name, {})
        for shape in shapes.get(name) or [None]:
            if type(layer) is nn.Linear:
                target = next(iter(targets.values()), None)
            else:
                target = targets.get(shape)
            result = LayerResult(name, type(layer).__name__, shape, target, reported=reported.get(target))
            if shape is not None and target not in run.refused:
                result.sigma = true_sigma(layer, shape)
            run.layers.append(result)
    run.truth_seconds = time.perf_counter() - start


@pytest.mark.parametrize("model_id", list(MODELS))
def test_zoo_every_layer_within_target(model_id):
    run, module, _ = run_zoo(model_id)
    print("\n" + run.report())
    layers = dict(module.named_modules())
    wrongly_refused = [n for n in run.refused if type(layers.get(base_name(n))) in STANDARD_TYPES]
    assert not wrongly_refused, f"plain layers refused: {wrongly_refused}\n{run.report()}"
    problems = run.problems()
    assert not problems, f"{len(problems)} layer(s) off:\n  " + "\n  ".join(problems) + "\n" + run.report()
    assert run.checked, "no layer checked"


def test_ground_truth_float64_matches_dense():
    """The ARPACK path of :func:`true_sigma` agrees with a dense float64 SVD, and leaves the layer as it was."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect")
    shape = (4, 12, 12)  # 576 inputs: above DENSE_MAX_IN, so ARPACK runs
    weight = conv.weight.detach().clone()
    dense = torch.linalg.matrix_norm(dense_matrix(copy.deepcopy(conv).double(), shape), 2)
    assert true_sigma(conv, shape) == pytest.approx(float(dense), rel=1e-7)
    assert conv.weight.dtype == torch.float32 and torch.equal(conv.weight, weight)
