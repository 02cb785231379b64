"""lipschitz_bound's rules for functional forms and for a BatchNorm after an activation, checked against independent
float64 ground truths: dense Jacobians of the model (torch.autograd.functional.jacobian) and the dense SVD of each
map, never the values the code reports."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import sigma_as_called
from torch import nn
from torch.autograd.functional import jacobian

from lightning_specclip.lipschitz import ACTIVATION_CONSTANTS, UnsupportedNodeError, lipschitz_bound


def _jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """The spectral norm of the model's float64 Jacobian at one input."""
    model = copy.deepcopy(model).double().eval()
    J = jacobian(lambda v: model(v.view(1, *x.shape)).flatten(), x.double().flatten())
    return float(torch.linalg.matrix_norm(J, ord=2))


def _largest_jacobian_norm(model: nn.Module, shape: tuple[int, ...], count: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    return max(_jacobian_norm(model, torch.rand(shape, generator=generator)) for _ in range(count))


def _gain(bn: nn.BatchNorm2d) -> float:
    """The BatchNorm's largest gain |γ|/√(var+ε), computed here from its tensors."""
    return float((bn.weight.detach().double().abs() / (bn.running_var.double() + bn.eps).sqrt()).max())


def _trained_looking(bn: nn.BatchNorm2d, generator: torch.Generator) -> nn.BatchNorm2d:
    """Random running statistics with variances from 1e-3 to 10, and γ of both signs."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=generator))
        bn.running_var.copy_(10 ** (torch.rand(c, generator=generator) * 4 - 3))
        bn.weight.copy_(torch.randn(c, generator=generator) * 1.5)
        bn.bias.copy_(torch.randn(c, generator=generator))
    return bn


class _FunctionalPooling(nn.Module):
    """The network of ``_pooling_nets`` written with functions, on the same layers."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, fc: nn.Linear) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = conv1, conv2, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.pad(self.conv1(x), (1, 1, 1, 1), mode="reflect"))
        x = F.max_pool2d(x, 3, 2, 1)  # stride and padding given by position
        x = F.leaky_relu(self.conv2(F.pad(x, (1, 0, 0, 1))), negative_slope=3.0)
        x = F.adaptive_max_pool2d(F.avg_pool2d(x, 2, stride=1), 3)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 2), 1)
        return self.fc(F.dropout(x, 0.2, self.training))


def _pooling_nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(7)
    conv1, conv2, fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3, padding=1), nn.Linear(6 * 2 * 2, 3)
    modules = nn.Sequential(
        conv1,
        nn.ReflectionPad2d(1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.ZeroPad2d((1, 0, 0, 1)),
        conv2,
        nn.LeakyReLU(3.0),
        nn.AvgPool2d(2, stride=1),
        nn.AdaptiveMaxPool2d(3),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        fc,
    )
    return modules, _FunctionalPooling(conv1, conv2, fc)


def test_functional_pooling_padding_and_activations_bound_as_their_modules():
    modules, functional = _pooling_nets()
    shape = (1, 8, 8)
    with_modules = lipschitz_bound(modules, shape, samples=2)
    with_functions = lipschitz_bound(functional, shape, samples=2)
    # 1×8×8 → conv1 4×6×6 → reflect pad 4×8×8 → max pool (3, stride 2): an input in ≤ 2×2 windows (×√4) → 4×4×4
    # → zero pad 4×5×5 (×1) → conv2 6×5×5 → slope 3 → avg pool 6×4×4 → adaptive max 4→3: ≤ 2×2 windows (×√4) → 6×3×3
    # → adaptive avg 6×2×2 → fc
    expected = sigma_as_called(modules[0], shape) * sigma_as_called(nn.ReflectionPad2d(1), (4, 6, 6)) * 2.0
    expected *= (
        sigma_as_called(modules[5], (4, 5, 5)) * 3.0 * sigma_as_called(nn.AvgPool2d(2, stride=1), (6, 5, 5)) * 2.0
    )
    expected *= sigma_as_called(nn.AdaptiveAvgPool2d(2), (6, 3, 3)) * sigma_as_called(modules[12], (24,))
    assert with_modules.upper == pytest.approx(expected, rel=1e-9)
    assert with_functions.upper == pytest.approx(expected, rel=1e-9)
    kinds = [n.kind for n in with_functions.nodes.values() if n.kind not in ("input", "output")]
    assert kinds == [n.kind for n in with_modules.nodes.values() if n.kind not in ("input", "output")]
    assert _largest_jacobian_norm(functional, shape, 4, seed=0) <= with_functions.upper


def test_max_pooling_that_returns_indices_and_pooling_of_an_unbatched_tensor():
    class Indices(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            values, _ = F.max_pool2d(x, 3, stride=1, return_indices=True)  # indices unpacked, never read
            return values

    class ModuleIndices(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.MaxPool2d(3, 1, return_indices=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(x)[0]

    # 3×3 windows at stride 1: an input can be the max of up to 9 windows (×√9)
    for model in (Indices(), ModuleIndices()):
        assert lipschitz_bound(model, (1, 5, 5), samples=2).upper == pytest.approx(3.0, rel=1e-12)

    class Unpool(nn.Module):  # indices read: a piecewise constant integer map, refused
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            values, indices = F.max_pool2d(x, 2, return_indices=True)
            return F.max_unpool2d(values, indices, 2)

    with pytest.raises(UnsupportedNodeError, match=r"node 'getitem_1'.*int64 tensor"):
        lipschitz_bound(Unpool(), (1, 4, 4), samples=2)
    # MaxPool1d on a (N, L) tensor pools along L as if N were channels: 3 windows share an input, whatever the rank
    pool = nn.Sequential(nn.MaxPool1d(3, stride=1))
    result = lipschitz_bound(pool, (6,), samples=2)
    assert result.upper == pytest.approx(math.sqrt(3), rel=1e-12)
    x = torch.tensor([0.0, 0, 1, 0, 0, 0])  # the 1 is the max of three windows: Jacobian column of three ones
    assert _jacobian_norm(pool, x) == pytest.approx(math.sqrt(3), rel=1e-12)


def test_activation_arguments_and_broadcast_operands_count():
    elu = lipschitz_bound(nn.Sequential(nn.Flatten(), nn.ELU(2.0)), (3,), samples=2)
    assert elu.upper == pytest.approx(2.0)

    class Functional(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.elu(x, alpha=2.0) + torch.clamp(x, 0, 1).add(x, alpha=3.0)

    assert lipschitz_bound(Functional(), (3,), samples=2).upper == pytest.approx(2.0 + 1.0 + 3.0)

    class Broadcast(nn.Module):  # (N, 1) → (N, 4): each input element is repeated 4 times
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.ones(4) + (x + torch.zeros(1, 4)) + x.add(torch.zeros(4), alpha=2.0)

    result = lipschitz_bound(Broadcast(), (1,), samples=2)
    assert result.upper == pytest.approx(3 * math.sqrt(4), rel=1e-12)
    assert _jacobian_norm(Broadcast(), torch.tensor([0.5])) == pytest.approx(result.upper, rel=1e-12)


def _conv_relu_bn(seed: int) -> nn.Sequential:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        _trained_looking(nn.BatchNorm2d(4), generator),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        _trained_looking(nn.BatchNorm2d(4), generator),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        _trained_looking(nn.BatchNorm2d(4), generator),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_batchnorm_after_relu_is_measured_with_the_conv_before_it(seed):
    net = _conv_relu_bn(seed)
    shape, shapes = (1, 8, 8), [(1, 8, 8), (4, 8, 8), (4, 8, 8)]
    result = lipschitz_bound(net, shape, samples=4)
    assert _largest_jacobian_norm(net, shape, 20, seed=100 + seed) <= result.upper
    assert result.lower <= result.upper
    assert set(result.compositions) == {"0+1+2", "3+4+5", "6+7+8"}
    # the bound is Π σ₁(BN∘conv) · σ₁(fc), each measured here; separately it would be Π σ₁(conv)·max gain · σ₁(fc)
    blocks = [(net[i], net[i + 2], s) for i, s in zip((0, 3, 6), shapes, strict=True)]
    composed = math.prod(sigma_as_called(nn.Sequential(conv, bn), s) for conv, bn, s in blocks) * sigma_as_called(
        net[10], (64,)
    )
    separate = math.prod(sigma_as_called(conv, s) * _gain(bn) for conv, bn, s in blocks) * sigma_as_called(
        net[10], (64,)
    )
    assert result.upper == pytest.approx(composed, rel=1e-9)
    assert lipschitz_bound(net, shape, samples=1, compose_batchnorm=False).upper == pytest.approx(separate, rel=1e-6)
    assert result.upper < separate / 2  # variances from 1e-3 to 10: the largest gain is far from every direction


class _PitchNet(nn.Module):
    """A CREPE-like pitch tracker at small size: audio frames (1, L, 1), convolutions along time with (k, 1)
    kernels, each block conv → ReLU → BatchNorm → max pool (2, 1) → dropout, then a sigmoid classifier."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        widths, kernels = [1, 8, 4, 4], [16, 8, 4]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, (k, 1), stride=(4 if i == 0 else 1, 1))
            for i, (c_in, c_out, k) in enumerate(zip(widths[:-1], widths[1:], kernels, strict=True))
        )
        self.bns = nn.ModuleList(_trained_looking(nn.BatchNorm2d(c), generator) for c in widths[1:])
        self.act = nn.ReLU()
        self.classifier = nn.Linear(4 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            k = conv.kernel_size[0]
            x = F.pad(x, (0, 0, (k - 1) // 2, k // 2)) if i else F.pad(x, (0, 0, 6, 6))  # "same" after the first
            x = bn(F.relu(conv(x)) if i == 0 else self.act(conv(x)))
            x = F.dropout(F.max_pool2d(x, kernel_size=(2, 1)), 0.25, training=self.training)  # stride: the kernel
        return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(x.shape[0], -1)))


def test_pitch_tracker_stack_composes_each_block():
    net, shape = _PitchNet(3), (1, 128, 1)
    result = lipschitz_bound(net, shape, samples=4)
    assert set(result.compositions) == {"convs.0+relu+bns.0", "convs.1+act+bns.1", "convs.2+act+bns.2"}
    assert _largest_jacobian_norm(net, shape, 20, seed=5) <= result.upper
    # padded 1×140×1 → 8×32 → pool 8×16 → padded 8×23 → 4×16 → pool 4×8 → padded 4×11 → 4×8 → pool 4×4 → fc;
    # (2, 1) windows at stride (2, 1) share nothing: ×1; the sigmoid ×1/4
    padded = [(1, 140, 1), (8, 23, 1), (4, 11, 1)]
    blocks = list(zip(net.convs, net.bns, padded, strict=True))
    fc = sigma_as_called(net.classifier, (16,)) / 4
    composed = math.prod(sigma_as_called(nn.Sequential(conv, bn), s) for conv, bn, s in blocks) * fc
    separate = math.prod(sigma_as_called(conv, s) * _gain(bn) for conv, bn, s in blocks) * fc
    assert result.upper == pytest.approx(composed, rel=1e-9)
    assert result.upper < separate


def _conv_activation_bn(activation: nn.Module, bias: float) -> nn.Sequential:
    generator = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.bias.fill_(bias)
    return nn.Sequential(conv, activation, _trained_looking(nn.BatchNorm2d(3), generator))


@pytest.mark.parametrize(("activation", "slope"), [(nn.LeakyReLU(2.0), 2.0), (nn.GELU(), 1.1290), (nn.SiLU(), 1.0999)])
def test_slopes_outside_zero_one_are_kept_by_the_composition(activation, slope):
    # any element-wise activation commutes with the BatchNorm's diagonal: c·σ₁(BN∘conv), with the slope c kept
    shape = (2, 5, 5)
    net = _conv_activation_bn(activation, bias=-20.0)  # every pre-activation negative on inputs in [0, 1]
    result = lipschitz_bound(net, shape, samples=2)
    assert result.upper == pytest.approx(slope * sigma_as_called(nn.Sequential(net[0], net[2]), shape), rel=1e-9)
    largest = _largest_jacobian_norm(net, shape, 20, seed=2)
    assert largest <= result.upper * (1 + 1e-12)  # rounding: the bound is attained below
    if slope == 2.0:  # all on the slope-2 side the net is the linear map 2·BN∘conv: the bound is attained
        assert largest == pytest.approx(result.upper, rel=1e-9)
    unbiased = _conv_activation_bn(activation, bias=0.0)
    assert _largest_jacobian_norm(unbiased, shape, 20, seed=3) <= lipschitz_bound(unbiased, shape, samples=1).upper


def test_a_block_after_a_composed_block_is_bounded_with_both_slopes():
    # conv → LeakyReLU(3) → BN1 → ReLU → BN2: BN1 is composed with the conv; BN1's output is no longer an affine map
    # of the conv's input, so BN2 is not composed with it (that would drop the first slope): BN2 by its gain
    generator = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    conv, bn1, bn2 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), _trained_looking(nn.BatchNorm2d(3), generator)
    with torch.no_grad():
        conv.bias.fill_(-20.0)  # pre-activations negative on inputs in [0, 1]: slope 3 everywhere
        bn1.running_var.copy_(torch.tensor([1e-3, 1.0, 10.0]))
        bn1.bias.fill_(1e4)  # BN1's output positive: the ReLU passes everything
    net = nn.Sequential(conv, nn.LeakyReLU(3.0), bn1, nn.ReLU(), bn2)
    shape = (2, 5, 5)
    result = lipschitz_bound(net, shape, samples=2)
    assert set(result.compositions) == {"0+1+2"}
    assert result.upper == pytest.approx(3.0 * sigma_as_called(nn.Sequential(conv, bn1), shape) * _gain(bn2), rel=1e-6)
    # the net is the linear map 3·BN2∘BN1∘conv on these inputs
    assert _largest_jacobian_norm(net, shape, 4, seed=6) == pytest.approx(
        3.0 * sigma_as_called(nn.Sequential(conv, bn1, bn2), shape), rel=1e-9
    )
    assert _largest_jacobian_norm(net, shape, 4, seed=6) <= result.upper


def test_maps_that_do_not_act_element_by_element_are_not_composed_through(monkeypatch):
    # softmax over channels is 1-Lipschitz, so registering it as an "activation" bounds it soundly on its own; but
    # it mixes channels, so BN∘softmax∘conv may exceed σ₁(BN∘conv) by far: it must not be composed through
    monkeypatch.setitem(ACTIVATION_CONSTANTS, nn.Softmax, 1.0)
    conv, bn = nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(2, 2, 1, 1))  # writes channel 0 only
        bn.running_var.copy_(torch.tensor([1e4, 1e-4]))  # channel 0 scaled by 0.01, channel 1 by 100
    net = nn.Sequential(conv, nn.Softmax(dim=1), bn)
    shape = (2, 3, 3)
    result = lipschitz_bound(net, shape, samples=2)
    assert result.compositions == {}
    assert result.upper == pytest.approx(sigma_as_called(conv, shape) * 1.0 * _gain(bn), rel=1e-6)
    largest = _largest_jacobian_norm(net, shape, 4, seed=4)
    assert largest <= result.upper
    assert largest > 100 * sigma_as_called(nn.Sequential(conv, bn), shape)  # what a composition would have claimed
    # nor through a pooling, nor when the activation's output is read elsewhere too
    pooled = nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(2, 1), nn.BatchNorm2d(3))
    assert lipschitz_bound(pooled, (2, 5, 5), samples=1).compositions == {}

    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.conv(x))
            return self.bn(h) + h

    assert lipschitz_bound(TwoReaders(), (2, 4, 4), samples=1).compositions == {}


def test_functional_calls_the_rules_cannot_read_are_refused_by_node():
    class Pool(nn.Module):
        def __init__(self, adaptive: bool) -> None:
            super().__init__()
            self.adaptive = adaptive
            self.register_buffer("size", torch.tensor([2, 2]) if adaptive else torch.tensor(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.adaptive_max_pool2d(x, self.size) if self.adaptive else F.max_pool2d(x, self.size)

    with pytest.raises(UnsupportedNodeError, match=r"node 'max_pool2d'.*kernel_size.*tensor\(2\).*not ints"):
        lipschitz_bound(Pool(adaptive=False), (1, 4, 4), samples=1)
    with pytest.raises(UnsupportedNodeError, match=r"node 'adaptive_max_pool2d'.*output_size tensor\(\[2, 2\]\)"):
        lipschitz_bound(Pool(adaptive=True), (1, 4, 4), samples=1)

    class Dropout(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(x, 0.5)  # training defaults to True: dropout at inference

    with pytest.raises(UnsupportedNodeError, match=r"node 'dropout'.*training=True.*training=self.training"):
        lipschitz_bound(Dropout(), (4,), samples=1)

    class BatchStatistics(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(x, torch.zeros(2), torch.ones(2), training=True)

    with pytest.raises(UnsupportedNodeError, match=r"node 'batch_norm'.*batch statistics"):
        lipschitz_bound(BatchStatistics(), (2, 3), samples=1)
