"""The layer as it really runs: a transposed convolution called with ``output_size=``, clips triggered inside an
autocast region, selected layers the clipper cannot bound, and target patterns that an earlier pattern shadows.

Every spectral norm a test asserts on is a float64 ground truth of the layer *as it is called* (the dense Jacobian of
the call, then an SVD), not a value the library reports.
"""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from test_callback import trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_specclip import (
    ImplicitLinear,
    SpectralClipCallback,
    SpectralClipper,
    clip_spectral_norm_,
    gap_free_spectra,
    spectrum,
)
from lightning_specclip.targets import InputShapeRecorder
from lightning_specclip.tracking import spectral_norms


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


def train_plain(net: nn.Module, clipper_kwargs: dict, steps: int = 4, shape=(1, 8, 8)) -> SpectralClipper:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    clipper = SpectralClipper(net, optimizer=opt, warmup_iters=30, **clipper_kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        net(torch.randn((4, *shape), generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    clipper.clip()
    return clipper


def test_transposed_conv_called_with_output_size_is_clipped_as_it_runs():
    net = unet()
    clipper = train_plain(net, dict(target=1.0, modules=["up"], every_n_steps=2))
    as_run = sigma_as_called(net.up, (4, 4, 4), output_size=(8, 8))
    as_defined = sigma_as_called(net.up, (4, 4, 4))  # the map without output_size: one row and column fewer
    assert as_run > as_defined * 1.005  # the two maps differ on these weights, so the test tells them apart
    assert as_run <= 1.0 * 1.01
    assert clipper.sigmas["up"] == pytest.approx(as_run, rel=5e-3)
    (up,) = clipper.maps
    assert up.name == "up" and up.call == (("output_padding", (1, 1)),)


def test_transposed_conv_called_two_ways_is_two_maps():
    up = nn.ConvTranspose1d(2, 2, 3, stride=2, padding=1)
    with torch.no_grad():
        up.weight.mul_(5)
    clipper = SpectralClipper(nn.Sequential(up), 1.0, warmup_iters=30)
    up(torch.randn(2, 2, 6), output_size=[12])
    up(torch.randn(2, 2, 6))
    clipper.clip()
    assert [(m.name, m.call) for m in clipper.maps] == [("0", (("output_padding", (1,)),)), ("0@2x6", ())]
    assert sigma_as_called(up, (2, 6), output_size=[12]) <= 1.01
    assert sigma_as_called(up, (2, 6)) <= 1.01


def test_unet_in_a_trainer_reports_the_map_as_it_runs():
    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = unet(1)

        def training_step(self, batch, batch_idx):
            return self.net(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Module()
    callback = SpectralClipCallback(1.0, modules=["net.up"], every_n_steps=2, warmup_iters=30)
    trainer(max_steps=4, callbacks=[callback]).fit(module, DataLoader(torch.randn(16, 1, 8, 8), batch_size=4))
    as_run = sigma_as_called(module.net.up, (4, 4, 4), output_size=(8, 8))
    assert as_run <= 1.01
    assert callback.sigmas["net.up"] == pytest.approx(as_run, rel=5e-3)


def test_a_call_whose_map_cannot_be_rebuilt_is_reported_not_clipped():
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return super().forward(x) * scale

    net = nn.Sequential(Scaled(4, 4))
    clipper = SpectralClipper(net, 1.0)
    net[0](torch.randn(2, 4), scale=3.0)
    with pytest.warns(UserWarning, match=r"neither tracked nor clipped, called with arguments besides its input"):
        clipper.step()
    assert clipper.maps == [] and "cannot be rebuilt" in clipper.not_clipped["0"]
    assert "cannot be rebuilt" in clipper.summary()


def test_recorder_reads_output_size_given_positionally_and_with_batch_and_channels():
    up = nn.ConvTranspose2d(3, 2, 3, stride=2)
    with InputShapeRecorder([("up", up)]) as recorder:
        up(torch.zeros(1, 3, 4, 4), (10, 10))
        up(torch.zeros(1, 3, 4, 4), output_size=torch.Size([1, 2, 9, 10]))
        up(torch.zeros(1, 3, 4, 4), output_size=(9, 9))  # the size without output_size: the plain map
    assert recorder.all_calls["up"] == [
        ((3, 4, 4), (("output_padding", (1, 1)),)),
        ((3, 4, 4), (("output_padding", (0, 1)),)),
        ((3, 4, 4), ()),
    ]


class ConvDiscriminatorGAN(pl.LightningModule):
    """The README's GAN recipe with a convolutional discriminator."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(8, 64), nn.Unflatten(1, (1, 8, 8)))
        self.discriminator = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(64, 1),
        )
        with torch.no_grad():
            for p in self.discriminator.parameters():
                p.mul_(4)

    def training_step(self, batch, batch_idx):
        opt_d, opt_g = self.optimizers()
        fake = self.generator(torch.randn(len(batch), 8))
        d_loss = nn.functional.softplus(-self.discriminator(batch)).mean()
        d_loss = d_loss + nn.functional.softplus(self.discriminator(fake.detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = nn.functional.softplus(-self.discriminator(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.discriminator.parameters()), torch.optim.Adam(self.generator.parameters())]


def test_gan_recipe_with_a_conv_discriminator_under_bf16_mixed():
    torch.manual_seed(0)
    gan = ConvDiscriminatorGAN()
    callback = SpectralClipCallback(1.0, optimizer=0, modules=["discriminator"], every_n_steps=1, warmup_iters=30)
    trainer(max_steps=6, precision="bf16-mixed", callbacks=[callback]).fit(
        gan, DataLoader(torch.randn(12, 1, 8, 8), batch_size=4)
    )
    d = gan.discriminator
    sigmas = [sigma_as_called(d[0], (1, 8, 8)), sigma_as_called(d[2], (4, 8, 8)), sigma_as_called(d[5], (64,))]
    assert max(sigmas) <= 1.0 * 1.01
    assert [m.name for m in callback.maps] == ["discriminator.0", "discriminator.2", "discriminator.5"]


def test_plain_loop_stepping_inside_autocast():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Flatten())
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(4)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    clipper = SpectralClipper(net, 0.5, optimizer=opt, every_n_steps=2, warmup_iters=30)
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(torch.randn(4, 1, 8, 8)).square().mean().backward()
            opt.step()  # the clipper steps (and clips) here, inside the autocast region
            opt.zero_grad()
            clipper.clip()
    assert sigma_as_called(net[0], (1, 8, 8)) <= 0.5 * 1.01
    assert sigma_as_called(net[2], (4, 8, 8)) <= 0.5 * 1.01
    assert all(0.45 < s <= 0.5 * 1.01 for s in clipper.sigmas.values())


def test_an_error_in_a_clip_names_the_layer(monkeypatch):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2))
    clipper = SpectralClipper(net, 0.01, every_n_steps=1, warmup_iters=20)
    net(torch.randn(2, 1, 8, 8))
    method = clipper.method
    original = method.clip_all_

    def failing(items):
        if any(m.name == "2" for m, *_ in items):
            raise RuntimeError("expected scalar type Float but found BFloat16")
        return original(items)

    monkeypatch.setattr(method, "clip_all_", failing)
    with pytest.raises(
        RuntimeError, match=r"clipping 2 \(Linear, input shape \(72,\)\) failed: RuntimeError: expected"
    ):
        clipper.step()


def test_a_layer_that_never_ran_is_listed_as_not_clipped():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main = nn.Conv2d(1, 2, 3)
            self.rare = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor, rare: bool = False) -> torch.Tensor:
            return (self.rare if rare else self.main)(x)

    net = Branchy()
    clipper = SpectralClipper(net, 1.0)
    net(torch.randn(2, 1, 8, 8))
    with pytest.warns(UserWarning, match=r"neither tracked nor clipped, never ran in training.*rare"):
        clipper.step()
    assert [m.name for m in clipper.maps] == ["main"]
    assert "never ran in training" in clipper.not_clipped["rare"]
    row = next(line for line in clipper.summary().splitlines() if line.startswith("rare"))
    assert "never ran in training" in row


def test_a_target_pattern_shadowed_by_an_earlier_one_is_said():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.warns(UserWarning, match=r"target pattern '0' sets no layer's target.*earlier pattern \('\*'\)"):
        clipper = SpectralClipper(net, {"*": 1.0, "0": 0.5})
    assert [clipper.target_of(m) for m in clipper.map_set.layers] == [1.0, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SpectralClipper(net, {"0": 0.5, "*": 1.0})  # specific first: no warning


def test_ground_truth_of_a_model_measures_the_transposed_conv_as_called():
    net = unet(2)
    layers = spectral_norms(net, torch.zeros(1, 1, 8, 8))["layers"]
    assert layers["up"] == pytest.approx(sigma_as_called(net.up, (4, 4, 4), output_size=(8, 8)), rel=1e-9)
    assert layers["up"] != pytest.approx(sigma_as_called(net.up, (4, 4, 4)), rel=1e-3)


def test_core_functions_run_outside_the_callers_autocast():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(5)
    A = ImplicitLinear(conv, (2, 8, 8))
    x = torch.randn(2, 2, 8, 8)
    exact = sigma_as_called(conv, (2, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert A.matvec(x).dtype == A.rmatvec(A.matvec(x)).dtype == A.gram(x)[0].dtype == torch.float32
        assert float(spectrum(conv, (2, 8, 8), tol=1e-6).values[0]) == pytest.approx(exact, rel=1e-5)
        assert float(gap_free_spectra([A], 1e-3)[0].values[0]) == pytest.approx(exact, rel=2e-3)
        result = clip_spectral_norm_(conv, 1.0, (2, 8, 8))
    assert result.after == pytest.approx(sigma_as_called(conv, (2, 8, 8)), rel=1e-4)
    assert sigma_as_called(conv, (2, 8, 8)) <= 1.01
