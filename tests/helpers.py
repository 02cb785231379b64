"""What several test files share (imported as ``from helpers import ...``).

* Lightning: :class:`Classifier` (a ``BoringModel``-style LightningModule around any network), :func:`small_cnn`,
  :func:`loader`, a quiet CPU :func:`trainer`, :func:`scaled`, :func:`weights_hash`; :class:`UNet` / :func:`unet`
  (a transposed convolution called with ``output_size=``).
* Ground truths: the spectral norm of a layer's map at an input shape is
  :func:`lightning_specclip.tracking.ground_truth_sigma`, used directly. Kept here because they compute something
  else: :func:`sigma_as_called` (a layer *called with keyword arguments* such as ``output_size=``, from the dense
  Jacobian of the call, independently of the library), :func:`weight_sigma` (σ₁ of a weight matrix, no module),
  :func:`singular_values` (every singular value, of a module or a (conv, BN) pair).
* Bit-exact snapshots: :func:`raw_bits`, :func:`snapshot` / :func:`unchanged` (parameters and buffers),
  :func:`state_snapshot` / :func:`state_unchanged` (the float state dict, pairs included).
* Layers the clip tests share: :func:`seeded`, :func:`with_stats`, :func:`conv_bn`, :func:`big_conv`,
  :func:`big_conv_bn`, :func:`scale_to_`, :func:`first_weight`, :func:`circular_conv`, the baselines' layer tables
  (``ZERO_PADDED_LAYERS``, ``OTHER_PADDING_LAYERS``) and :func:`baseline_layer`.
"""

from __future__ import annotations

import copy
import hashlib

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_specclip.spectral.exact import dense_singular_values
from lightning_specclip.tracking import ground_truth_sigma


class Classifier(pl.LightningModule):
    """A LightningModule around any network, trained with plain SGD on cross-entropy."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def small_cnn(channels: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, stride=2),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 4 * 4, 10),
    )


def loader(shape=(1, 8, 8), n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=gen) * 4
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def scaled(net: nn.Module, factor: float) -> nn.Module:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.mul_(factor)
    return net


def weights_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, t in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def raw_bits(t: Tensor) -> Tensor:
    return t.detach().clone().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    tensors = (*module.named_parameters(), *module.named_buffers())
    return {name: raw_bits(t) for name, t in tensors if t.is_floating_point()}


def unchanged(module: nn.Module, snap: dict[str, Tensor]) -> bool:
    now = snapshot(module)
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def sigma_as_called(layer: nn.Module, shape: tuple[int, ...], **call) -> float:
    """σ₁ of ``x ↦ layer(x, **call) − layer(0, **call)`` in float64, from the dense Jacobian of the call."""
    layer = copy.deepcopy(layer).double().eval()
    zero = torch.zeros((1, *shape), dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return (layer(x.view(1, *shape), **call) - layer(zero, **call)).flatten()

    jacobian = torch.autograd.functional.jacobian(f, zero.flatten())
    return float(torch.linalg.matrix_norm(jacobian, 2))


class UNet(nn.Module):
    """Down and up once; the up-sampling transposed convolution is called with the skip connection's size."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.enc(x))
        up = torch.relu(self.up(torch.relu(self.down(skip)), output_size=skip.size()))
        return self.head(torch.cat([up, skip], 1))


def unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet()
    with torch.no_grad():
        net.up.weight.mul_(8)
    return net


BASELINE_TARGET = 0.7


def baseline_layer(factory, shape, factor: float, seed: int = 0) -> nn.Module:
    """The layer with its weight scaled so that σ₁ = ``factor · BASELINE_TARGET``."""
    torch.manual_seed(seed)
    module = factory()
    with torch.no_grad():
        module.weight.mul_(factor * BASELINE_TARGET / ground_truth_sigma(module, shape))
    return module


ZERO_PADDED_LAYERS = {
    "linear": (lambda: nn.Linear(12, 7), (12,)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 5, padding=2), (3, 16)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8)),
    "conv2d_stride2": (lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2), (3, 7, 9)),
    "conv2d_dilation2": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2), (3, 8, 8)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 6, 6)),
    "conv2d_valid": (lambda: nn.Conv2d(3, 4, 3), (3, 8, 8)),
    "conv3d_stride2": (lambda: nn.Conv3d(2, 3, 3, padding=1, stride=2), (2, 5, 4, 4)),
    "convT1d_stride2": (lambda: nn.ConvTranspose1d(4, 2, 4, stride=2, padding=1), (4, 6)),
    "convT2d_stride2": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (3, 5, 5)),
}


OTHER_PADDING_LAYERS = {
    mode: (lambda m=mode: nn.Conv2d(3, 4, 3, padding=1, padding_mode=m), (3, 8, 8))
    for mode in ("circular", "reflect", "replicate")
}


CLIP_TARGET = 0.7


def with_stats(bn: nn.modules.batchnorm._BatchNorm, seed: int = 1) -> nn.Module:
    """A BatchNorm with non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(0.25 + 1.75 * torch.rand(c, generator=gen))
        bn.weight.copy_(0.5 + torch.rand(c, generator=gen))
        bn.bias.copy_(torch.randn(c, generator=gen))
        bn.num_batches_tracked.fill_(7)
    return bn


def random_batchnorm(bn: nn.modules.batchnorm._BatchNorm, batches_tracked: int = 7) -> nn.Module:
    """A BatchNorm with running statistics and affine parameters drawn from the global generator, in train mode."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c))
        bn.running_var.copy_(torch.rand(c) * 2 + 0.2)
        bn.weight.copy_(torch.randn(c))
        bn.bias.copy_(torch.randn(c))
        bn.num_batches_tracked.fill_(batches_tracked)
    return bn.train()


def as_seq(module):
    return nn.Sequential(*module) if isinstance(module, tuple) else module


def singular_values(module, shape) -> Tensor:
    """Float64 dense ground truth on a copy of the module (or pair)."""
    return dense_singular_values(copy.deepcopy(as_seq(module)).double(), shape)


def scale_to_(module, shape, sigma: float) -> None:
    """Scale the (first) weight so that σ₁ of the layer is ``sigma``."""
    with torch.no_grad():
        first_weight(module).mul_(sigma / singular_values(module, shape)[0].item())


def state_snapshot(module) -> dict[str, Tensor]:
    seq = as_seq(module)
    return {name: raw_bits(t) for name, t in seq.state_dict().items() if t.is_floating_point()}


def state_unchanged(module, snap: dict[str, Tensor]) -> bool:
    now = state_snapshot(module)
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def conv_bn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), with_stats(nn.BatchNorm2d(4)))


def weight_sigma(weight: Tensor) -> float:
    """Float64 ground truth: the largest singular value of a weight matrix."""
    return torch.linalg.svdvals(weight.detach().double())[0].item()


def first_weight(module) -> nn.Parameter:
    seq = as_seq(module)
    return seq[0].weight if isinstance(seq, nn.Sequential) else seq.weight


def circular_conv(
    c_in: int = 4, c_out: int = 4, k: int = 3, scale: float = 3.0, seed: int = 0, **kw: object
) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, padding_mode="circular", **kw).double()
    with torch.no_grad():
        conv.weight.mul_(scale)
    return conv


def big_conv_bn():
    module = conv_bn()
    scale_to_(module, (4, 8, 8), 3.0 * CLIP_TARGET)
    return module


def big_conv():
    module = seeded(lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    scale_to_(module, (4, 8, 8), 3.0 * CLIP_TARGET)
    return module
