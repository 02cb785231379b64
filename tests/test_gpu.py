"""The core and the callback on a CUDA device, checked against float64 ground truth on the CPU.

Skipped without a GPU. cuDNN runs float32 convolutions in TF32 unless ``torch.backends.cudnn.allow_tf32`` is
off (PyTorch's default is on): the accuracy test turns it off, the clipping tests keep the default and allow
for it.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import Classifier, loader, scaled, small_cnn, trainer
from torch import nn

from lightning_specclip import ImplicitLinear, SpectralClipCallback, clip_spectral_norm_, spectrum
from lightning_specclip.spectral import PowerStep
from lightning_specclip.spectral.exact import dense_matrix, lanczos_singular_values
from lightning_specclip.tracking import ground_truth_sigma

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYERS = {
    "linear": (lambda: nn.Linear(40, 30), (40,)),
    "conv2d_zeros_stride2": (lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1), (3, 11, 11)),
    "conv1d_circular": (lambda: nn.Conv1d(3, 4, 5, padding=2, padding_mode="circular"), (3, 24)),
    "convT2d": (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (4, 6, 6)),
    "conv_bn": (lambda: nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5).eval()), (3, 8, 8)),
}


def _trainer(**kwargs) -> pl.Trainer:
    return trainer(accelerator="gpu", deterministic=False, **kwargs)


@pytest.mark.parametrize("name", list(LAYERS))
def test_operator_and_spectrum_on_cuda_match_the_cpu_ground_truth(name: str) -> None:
    factory, shape = LAYERS[name]
    torch.manual_seed(0)
    module = factory()
    if isinstance(module, nn.Sequential):  # running statistics that are not the identity
        with torch.no_grad():
            module[1].running_var.uniform_(0.5, 2.0)
            module[1].weight.uniform_(-2.0, 2.0)
    matrix = dense_matrix(copy.deepcopy(module).double(), shape)
    truth = torch.linalg.svdvals(matrix)
    module = module.cuda()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        A = ImplicitLinear(module, shape)
        assert A.device.type == "cuda"
        x = torch.randn(3, *shape, device="cuda")
        g, _ = A.gram(x)
        expected = x.flatten(1).double().cpu() @ (matrix.T @ matrix)
        torch.testing.assert_close(g.flatten(1).double().cpu(), expected, rtol=1e-4, atol=1e-4)
        s = spectrum(module, shape, k=2, tol=1e-6)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert s.values.device.type == "cuda" and s.converged
    torch.testing.assert_close(s.values.double().cpu(), truth[:2], rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("name", ["conv2d_zeros_stride2", "conv1d_circular", "conv_bn"])
def test_clip_on_cuda_lands_on_the_target(name: str) -> None:
    factory, shape = LAYERS[name]
    torch.manual_seed(0)
    module = factory()
    with torch.no_grad():
        module.get_submodule("0" if isinstance(module, nn.Sequential) else "").weight.mul_(3.0)
    module = module.cuda()
    result = clip_spectral_norm_(module, 1.0, shape)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert 0.98 <= ground_truth_sigma(copy.deepcopy(module).cpu(), shape) <= 1.02, result


def test_power_step_graph_replays_the_eager_steps_and_sees_weight_updates() -> None:
    torch.manual_seed(0)
    layers = [
        (nn.Conv2d(3, 8, 3, padding=1), (3, 16, 16)),
        (nn.Linear(20, 10), (20,)),
        (nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4).eval()), (3, 11, 11)),
    ]
    layers = [(m.cuda(), shape) for m, shape in layers]
    operators = [ImplicitLinear(m, shape) for m, shape in layers]
    graphed, eager = PowerStep(operators), PowerStep(operators, graph=False)
    assert graphed.graph and not eager.graph
    start = [torch.randn(1, *shape, device="cuda") for _, shape in layers]
    graph_vectors, eager_vectors = start, start
    for i in range(4):
        if i == 2:
            with torch.no_grad():
                layers[0][0].weight.mul_(0.5)
        graph_values, graph_vectors = graphed(graph_vectors)
        eager_values, eager_vectors = eager(eager_vectors)
        for a, b in zip([*graph_values, *graph_vectors], [*eager_values, *eager_vectors], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # after step 2 too: the graph reads the weights


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "bf16-true"])
def test_callback_on_cuda_in_every_precision(precision: str) -> None:
    torch.manual_seed(0)
    net = scaled(small_cnn(), 3.0)
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=20, compose_batchnorm=True)
    _trainer(max_steps=4, precision=precision, callbacks=[callback]).fit(Classifier(net), loader())
    assert all(torch.isfinite(p).all() for p in net.parameters())
    for target in callback.maps:
        assert ground_truth_sigma(copy.deepcopy(target.module).cpu(), target.input_shape) <= 1.02, target.name


def test_resnet18_on_cuda_clipped_after_fit() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = scaled(torchvision.models.resnet18(num_classes=10), 2.0)
    callback = SpectralClipCallback(1.0, every_n_steps=2, warmup_iters=30)
    _trainer(max_steps=3, callbacks=[callback]).fit(Classifier(net, lr=0.01), loader((3, 32, 32), n=24, batch_size=8))
    assert len(callback.maps) == 21
    for target in callback.maps:
        cpu = copy.deepcopy(target.module).cpu()
        sigma = lanczos_singular_values(cpu, target.input_shape, k=1, tol=1e-6)
        assert sigma.values[0] <= 1.02, target.name


def test_lockstep_measurements_and_clips_on_cuda_match_the_cpu_ground_truth() -> None:
    """``gap_free_spectra`` and ``clip_spectral_norms_`` (what a clip event runs) on CUDA: each map's value within the
    gap-free tolerance below its float64 CPU truth, each clipped layer on its target (TF32 allowed for)."""
    from lightning_specclip import clip_spectral_norms_, gap_free_spectra

    torch.manual_seed(0)
    layers = [(factory().cuda(), shape) for factory, shape in LAYERS.values()]
    layers += [(nn.Conv2d(8, 8, 3, padding=1).cuda(), (8, 16, 16)) for _ in range(3)]  # one size, several maps
    for module, _ in layers:
        with torch.no_grad():
            next(module.parameters()).mul_(5)
    truths = [ground_truth_sigma(copy.deepcopy(m).cpu(), shape) for m, shape in layers]
    found = gap_free_spectra([ImplicitLinear(m, shape) for m, shape in layers], 0.0075, left=False)
    for got, truth in zip(found, truths, strict=True):
        assert truth * (1 - 0.0075) * (1 - 2e-3) <= got.sigma <= truth * (1 + 2e-3)
    results = clip_spectral_norms_([m for m, _ in layers], 1.0, [shape for _, shape in layers])
    for (module, shape), result in zip(layers, results, strict=True):
        truth = ground_truth_sigma(copy.deepcopy(module).cpu(), shape)
        assert truth <= 1.0 * 1.01 * (1 + 2e-3) and result.after == pytest.approx(truth, rel=0.012)
