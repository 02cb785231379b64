"""lipschitz_bound and CertifiedAccuracy, checked against independent float64 ground truths: the dense Jacobian of
the model (torch.autograd.functional.jacobian) and its SVD, never the values the code reports."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchattacks
import torchvision
from helpers import sigma_as_called
from torch import nn
from torch.autograd.functional import jacobian

from lightning_specclip.data import DigitsDataModule
from lightning_specclip.lipschitz import CertifiedAccuracy, UnsupportedNodeError, certified, lipschitz_bound
from lightning_specclip.models import Normalize


def _jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """The largest singular value of the model's Jacobian at one input, from the dense float64 Jacobian."""
    model = copy.deepcopy(model).double().eval()
    shape = x.shape
    J = jacobian(lambda v: model(v.view(1, *shape)).flatten(), x.double().flatten())
    return float(torch.linalg.svdvals(J)[0])


def _random_bn(bn: nn.BatchNorm2d, generator: torch.Generator) -> nn.BatchNorm2d:
    """A BatchNorm with trained-looking statistics and affine parameters (gains from 0.3 to 3)."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=generator))
        bn.running_var.copy_(torch.rand(c, generator=generator) * 2 + 0.1)
        bn.weight.copy_(torch.rand(c, generator=generator) * 2 + 0.3)
        bn.bias.copy_(torch.randn(c, generator=generator))
    return bn


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_one_conv_is_bounded_by_its_exact_norm(padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode)
    result = lipschitz_bound(conv, (2, 7, 7), samples=4)
    expected = sigma_as_called(conv, (2, 7, 7))
    assert result.upper == pytest.approx(expected, rel=1e-3)
    assert result.upper >= expected * (1 - 1e-12)  # small maps are measured exactly: no slack below
    assert result.lower <= result.upper * (1 + 1e-9)
    assert result.lower >= 0.95 * expected  # a linear map's Jacobian norm is its σ everywhere: power iteration nears it


def test_a_map_too_large_for_a_dense_svd_is_bounded_within_tol():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 2, 3, stride=2, padding=1, padding_mode="reflect")
    shape = (2, 34, 34)  # 2312 inputs: above the dense limit, measured by gap-free Lanczos
    result = lipschitz_bound(conv, shape, samples=2)
    expected = sigma_as_called(conv, shape)
    assert expected <= result.upper <= expected / (1 - 1e-3) * (1 + 1e-9)
    assert 0 < result.failure <= 1e-6
    assert result.layers[""] == pytest.approx(expected, rel=1e-8)


class _Residual(nn.Module):
    def __init__(self, channels: int, batchnorm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return nn.functional.leaky_relu(self.bn2(self.conv2(out)) + x, 0.2)


def _net(seed: int, batchnorm: bool) -> nn.Sequential:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(
        Normalize([0.3], [0.4]),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4) if batchnorm else nn.Identity(),
        nn.ReLU(),
        _Residual(4, batchnorm),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="replicate"),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            _random_bn(m, generator)
    return net


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "conv-bn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_upper_bounds_the_jacobian_of_random_nets(seed, batchnorm):
    net = _net(seed, batchnorm)
    result = lipschitz_bound(net, (1, 8, 8), samples=8, seed=seed)
    generator = torch.Generator().manual_seed(100 + seed)
    norms = [_jacobian_norm(net, torch.rand(1, 8, 8, generator=generator)) for _ in range(6)]
    assert max(norms) <= result.upper
    assert result.lower <= result.upper
    assert result.lower > 0
    if batchnorm:
        assert set(result.compositions) == {"1+2", "4.conv1+4.bn1", "4.conv2+4.bn2"}


def test_residual_and_concat_rules_on_hand_built_models():
    torch.manual_seed(3)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)

    class Concat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.a(x), 0.5 * self.b(x), x], dim=1)

    shape = (2, 5, 5)
    residual = Residual()
    s1, s2 = sigma_as_called(residual.conv1, shape), sigma_as_called(residual.conv2, shape)
    assert lipschitz_bound(residual, shape, samples=2).upper == pytest.approx(s1 * s2 + 1, rel=1e-9)

    concat = Concat()
    sa, sb = sigma_as_called(concat.a, shape), sigma_as_called(concat.b, shape)
    result = lipschitz_bound(concat, shape, samples=2)
    assert result.upper == pytest.approx(math.sqrt(sa**2 + (0.5 * sb) ** 2 + 1), rel=1e-9)
    kinds = {node.kind for node in result.nodes.values()}
    assert {"input", "linear", "scale", "concat", "output"} <= kinds


def test_normalization_pooling_and_activation_rules():
    torch.manual_seed(4)
    linear = nn.Linear(2 * 3 * 3, 2)
    model = nn.Sequential(Normalize([0.5, 0.5], [0.25, 0.5]), nn.MaxPool2d(3, stride=2), nn.Sigmoid(), nn.Flatten())
    model.append(linear)
    # Normalize divides by std ≥ 0.25 (×4); MaxPool2d(3, stride 2) on 8×8: an input lies in at most 2×2 windows
    # (×√4); Sigmoid's largest slope is 1/4
    result = lipschitz_bound(model, (2, 8, 8), samples=2)
    assert result.upper == pytest.approx(4 * 2 * 0.25 * sigma_as_called(linear, (18,)), rel=1e-9)
    avg = nn.AvgPool2d(2)
    assert lipschitz_bound(avg, (1, 4, 4), samples=2).upper == pytest.approx(0.5, rel=1e-9)  # mean of 4: 1/√4


def test_unsupported_ops_are_refused_by_name_and_constants_supply_them():
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(self.conv(x))

    with pytest.raises(UnsupportedNodeError, match=r"node 'mul'.*mul.*product or quotient of input-dependent"):
        lipschitz_bound(Gate(), (2, 4, 4), samples=2)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(UnsupportedNodeError, match=r"node '_1'.*LayerNorm.*module '1'.*constants=\{LayerNorm: L\}"):
        lipschitz_bound(model, (4,), samples=2)
    sigma = sigma_as_called(model[0], (4,))
    for constants in ({nn.LayerNorm: 3.0}, {"1": 3.0}):
        result = lipschitz_bound(model, (4,), samples=2, constants=constants)
        assert result.upper == pytest.approx(3.0 * sigma, rel=1e-9)
        assert result.nodes["_1"].kind == "user"
    with pytest.raises(ValueError, match="constants keys must be nn.Module types"):
        lipschitz_bound(model, (4,), constants={len: 1.0})


def test_a_real_model_with_squeeze_excitation_is_refused_naming_the_node():
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    with pytest.raises(
        UnsupportedNodeError,
        match=r"node 'mul'.*forward of 'features.1.block.1' \(SqueezeExcitation\).*squeeze-and-excitation",
    ):
        lipschitz_bound(model, (3, 32, 32), samples=1)


def test_the_model_is_left_as_it_was():
    net = _net(5, batchnorm=True).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lipschitz_bound(net, (1, 8, 8), samples=3)
    assert all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_bad_arguments_are_refused():
    linear = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="input_shape must be a non-empty tuple of positive sizes"):
        lipschitz_bound(linear, (0,))
    with pytest.raises(ValueError, match=r"data must have shape \(N, 3\)"):
        lipschitz_bound(linear, (3,), data=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        lipschitz_bound(linear, (3,), samples=0)
    with pytest.raises(ValueError, match="tol and failure must be in"):
        lipschitz_bound(linear, (3,), tol=1.5)

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(UnsupportedNodeError, match="returns one tensor"):
        lipschitz_bound(Pair(), (3,))


def test_certified_rule_and_metric_arguments():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.5], [1.0, 1.0, 0.0]])
    target = torch.tensor([0, 0, 1])
    # margins: 1.0 (correct), -1 (wrong), 0 (a tie: argmax picks class 0, wrong)
    flags = certified(logits, target, 2.0, torch.tensor([0.0, 0.35, 0.36]))
    assert flags.tolist() == [[True, True, False], [False, False, False], [False, False, False]]  # √2·2·0.35 < 1
    metric = CertifiedAccuracy(lipschitz=2.0, eps=0.35)
    metric.update(logits, target)
    assert metric.compute().dim() == 0 and float(metric.compute()) == pytest.approx(1 / 3)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="lipschitz must be a finite number > 0"):
            CertifiedAccuracy(lipschitz=bad, eps=0.1)
    with pytest.raises(ValueError, match="eps must be one or more finite radii >= 0"):
        CertifiedAccuracy(lipschitz=1.0, eps=[0.1, -0.1])


def test_certified_accuracy_merges_counts_as_under_ddp():
    generator = torch.Generator().manual_seed(0)
    logits, target = torch.randn(40, 5, generator=generator), torch.randint(0, 5, (40,), generator=generator)
    whole, first, second = (CertifiedAccuracy(lipschitz=0.5, eps=[0.0, 0.5, 1.0]) for _ in range(3))
    whole.update(logits, target)
    first.update(logits[:13], target[:13])
    second.update(logits[13:], target[13:])
    first.merge_state(second)  # what the sum reduction over ranks does
    assert torch.equal(first.compute(), whole.compute())


def _train_digits(epochs: int = 12) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small conv net trained on the bundled digits (plain loop); returns it and the test split."""
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    data.setup("test")
    net = nn.Sequential(
        Normalize([0.3053], [0.3760]),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    x, y = map(torch.cat, zip(*data.test_dataloader(), strict=True))
    return net.eval(), x, y


def test_certified_accuracy_is_below_pgd_l2_on_a_model_trained_on_digits():
    net, x, y = _train_digits()
    bound = lipschitz_bound(net, (1, 8, 8), data=x[:32])
    radii = [0.0, 0.02, 0.05, 0.1, 0.2, 0.5]
    metric = CertifiedAccuracy(bound.upper, radii)
    with torch.no_grad():
        logits = net(x)
    metric.update(logits, y)
    certified_acc = metric.compute()
    accuracy = float((logits.argmax(1) == y).float().mean())
    assert accuracy > 0.9
    assert float(certified_acc[0]) == pytest.approx(accuracy, abs=1e-9)
    assert all(a >= b for a, b in zip(certified_acc.tolist(), certified_acc.tolist()[1:], strict=False))
    assert float(certified_acc[1]) > 0  # the bound certifies something at a small radius
    for eps, cert in zip(radii[1:], certified_acc.tolist()[1:], strict=True):
        attack = torchattacks.PGDL2(net, eps=eps, alpha=eps / 4, steps=20, random_start=True)
        robust = float((net(attack(x, y)).argmax(1) == y).float().mean())
        assert cert <= robust + 1e-9, f"certified {cert:.4f} above PGD-L2 {robust:.4f} at eps={eps}"
    assert bound.lower <= bound.upper


def test_lower_bound_is_a_number_where_the_jacobian_vanishes():
    # every ReLU off at every probe input: a zero Jacobian (the power iteration's vector vanished: NaN once)
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.bias.fill_(-100.0)
    result = lipschitz_bound(nn.Sequential(layer, nn.ReLU()), (3,), samples=4)
    assert result.lower == 0.0
    assert result.upper == pytest.approx(sigma_as_called(layer, (3,)), rel=1e-9)


def test_tensors_inside_tuples_are_followed_not_dropped():
    class Halves(nn.Module):  # x.chunk → a conv on each half → cat: every branch counts
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            left, right = x.chunk(2, dim=1)
            return torch.cat([self.a(left), self.b(right)], dim=1)

    torch.manual_seed(6)
    halves = Halves()
    sa, sb = sigma_as_called(halves.a, (1, 5, 5)), sigma_as_called(halves.b, (1, 5, 5))
    result = lipschitz_bound(halves, (2, 5, 5), samples=2)
    assert result.upper == pytest.approx(math.sqrt(sa**2 + sb**2), rel=1e-9)
    assert _jacobian_norm(halves, torch.rand(2, 5, 5)) <= result.upper

    class Attention(nn.Module):  # a module that returns a tuple: refused by name, never read as a constant
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(4, 1, batch_first=True), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.attn(x, x, x)
            return self.head(out)

    with pytest.raises(UnsupportedNodeError, match=r"module 'attn'.*MultiheadAttention|MultiheadAttention.*'attn'"):
        lipschitz_bound(Attention(), (3, 4), samples=2)


class _UpWithOutputSize(nn.Module):
    """The U-Net idiom: a transposed convolution called with ``output_size=`` the skip connection's size."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x
        h = self.down(x)
        return self.up(h, output_size=skip.size()) + skip


def test_a_transposed_conv_called_with_output_size_is_measured_as_it_runs():
    model = _UpWithOutputSize()
    result = lipschitz_bound(model, (4, 8, 8), samples=2)
    called = sigma_as_called(model.up, (4, 4, 4), output_size=(8, 8))  # 8×8 out: one more row and column
    plain = sigma_as_called(model.up, (4, 4, 4))  # the module as constructed: 7×7 out
    assert result.layers["up"] == pytest.approx(called, rel=1e-6, abs=1e-6)
    assert abs(called - plain) > 1e-4
    assert result.nodes["up"].input_shape == (4, 4, 4)
    assert result.lower <= result.upper


def test_a_linear_layer_called_with_arguments_it_cannot_be_rebuilt_from_is_refused():
    class ScaledLinear(nn.Linear):
        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return super().forward(x) * scale

    ScaledLinear.__module__ = "torch.nn.modules.linear"  # kept whole by fx, as torch.nn's layers are: one node

    class Extra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = ScaledLinear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x, 5.0)  # runs 5·W, not the Linear's map

    with pytest.raises(UnsupportedNodeError, match="node 'fc'.*called with arguments besides its input"):
        lipschitz_bound(Extra(), (3,), samples=1)


def test_in_place_writes_read_through_another_reference_are_refused():
    class Method(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv(x)
            out.mul_(100)  # read through `out`, the conv's node: invisible to the graph walk
            return out

    class Function(Method):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv(x)
            y = nn.functional.leaky_relu(out, 100.0, inplace=True)
            return out + y

    with pytest.raises(UnsupportedNodeError, match="node 'mul_'.*in place.*out-of-place form"):
        lipschitz_bound(Method(), (1, 6, 6), samples=1)
    with pytest.raises(UnsupportedNodeError, match="node 'leaky_relu'.*in place.*out-of-place form"):
        lipschitz_bound(Function(), (1, 6, 6), samples=1)


def test_in_place_activations_whose_result_replaces_their_input_are_bounded():
    class Replacing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = nn.functional.relu(self.conv1(x), inplace=True)
            return self.act(self.conv2(h))

    model = Replacing()
    result = lipschitz_bound(model, (1, 7, 7), samples=2)
    assert result.upper == pytest.approx(result.layers["conv1"] * result.layers["conv2"], rel=1e-9)
    assert result.lower <= result.upper
    resnet = torchvision.models.resnet18(num_classes=3)  # nn.ReLU(inplace=True) after its BatchNorms and sums
    result = lipschitz_bound(resnet, (3, 16, 16), samples=1, iters=2)
    assert 0 < result.lower <= result.upper
