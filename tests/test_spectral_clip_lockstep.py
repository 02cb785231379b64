"""The entry points (``spectral/clip/lockstep.py``): ``clip_spectral_norm_`` lands σ₁ on the target for every layer
kind in one call, safely (issue 3, done-when), ``after`` measured and ``changed`` reported on every path, one-feature
inputs; and many layers in lock-step (``gap_free_spectra``, ``clip_spectral_norms_``) give what one at a time gives,
checked against float64 dense ground truth."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import (
    CLIP_TARGET,
    as_seq,
    big_conv,
    big_conv_bn,
    conv_bn,
    first_weight,
    scale_to_,
    seeded,
    singular_values,
    snapshot,
    state_snapshot,
    state_unchanged,
    unchanged,
    weight_sigma,
    with_stats,
)
from torch import Tensor, nn

from lightning_specclip import ImplicitLinear, SpectralClipper, clip_spectral_norm_, spectrum
from lightning_specclip.spectral.clip import (
    batchnorm_scale,
    clip_spectral_norms_,
    iterative,
    lockstep,
)
from lightning_specclip.spectral.exact import dense_singular_values, dense_spectral_norm
from lightning_specclip.spectral.spectrum import GAP_FREE_DENSE_MAX, gap_free_spectra
from lightning_specclip.tracking import ground_truth_sigma


def _conv_bn_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    seq = conv_bn(seed)
    return seq[0], seq[1]


# Every layer kind of the spectral engine: small, so that a dense float64 SVD is the ground truth.
KINDS = {
    **{
        f"conv1d_{mode}": (lambda m=mode: nn.Conv1d(3, 4, 3, padding=1, padding_mode=m), (3, 12))
        for mode in ("zeros", "circular", "reflect", "replicate")
    },
    **{
        f"conv2d_{mode}": (lambda m=mode: nn.Conv2d(4, 4, 3, padding=1, padding_mode=m), (4, 8, 8))
        for mode in ("zeros", "circular", "reflect", "replicate")
    },
    **{
        f"conv3d_{mode}": (lambda m=mode: nn.Conv3d(2, 2, 3, padding=1, padding_mode=m), (2, 4, 4, 4))
        for mode in ("zeros", "circular", "reflect", "replicate")
    },
    "conv2d_stride2": (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1), (4, 8, 8)),
    "conv2d_stride2_reflect": (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="reflect"), (4, 8, 8)),
    "conv1d_stride2": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 12)),
    "conv2d_dilation2": (lambda: nn.Conv2d(4, 4, 3, dilation=2, padding=2), (4, 8, 8)),
    "conv2d_groups2": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 8, 8)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 8, 8)),
    "conv2d_no_padding": (lambda: nn.Conv2d(4, 4, 3), (4, 8, 8)),
    "conv2d_kernel1": (lambda: nn.Conv2d(4, 3, 1), (4, 8, 8)),
    "conv2d_kernel5": (lambda: nn.Conv2d(4, 4, 5, padding=2), (4, 8, 8)),
    "conv2d_3to5_no_bias": (lambda: nn.Conv2d(3, 5, 3, padding=1, bias=False), (3, 6, 6)),
    "convT1d_stride2": (lambda: nn.ConvTranspose1d(4, 3, 4, stride=2, padding=1), (4, 8)),
    "convT2d_stride2": (lambda: nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1), (4, 4, 4)),
    "convT2d_output_padding": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (3, 4, 4)),
    "conv2d_bn_sequential": (conv_bn, (4, 8, 8)),
    "conv2d_bn_pair": (_conv_bn_pair, (4, 8, 8)),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_one_call_lands_within_one_percent_keeping_parameters_and_optimizer_state(name: str) -> None:
    factory, shape = KINDS[name]
    module = seeded(factory)
    seq = as_seq(module)
    params = dict(seq.named_parameters())
    optimizer = torch.optim.SGD(seq.parameters(), lr=0.01, momentum=0.9)
    seq(torch.randn(2, *shape)).square().sum().backward()
    optimizer.step()
    scale_to_(module, shape, 3.0 * CLIP_TARGET)
    buffers = {name: optimizer.state[p]["momentum_buffer"] for name, p in params.items()}
    result = clip_spectral_norm_(module, CLIP_TARGET, shape)
    sigma = singular_values(module, shape)[0].item()
    assert abs(sigma / CLIP_TARGET - 1) <= 1e-2, (sigma, result)
    assert result.converged
    assert result.before == pytest.approx(3.0 * CLIP_TARGET, rel=1e-3)
    assert abs(result.after - sigma) <= 1e-2 * CLIP_TARGET  # ``after`` describes the written weights
    for pname, p in seq.named_parameters():  # same Parameter objects, optimizer state untouched
        assert p is params[pname]
        assert optimizer.state[p]["momentum_buffer"] is buffers[pname]
    optimizer.step()  # the optimizer still steps the clipped parameters


@pytest.mark.parametrize("name", ["conv2d_reflect", "conv2d_bn_sequential"])
def test_returned_spectrum_describes_the_written_weights_after_a_rescale(name: str) -> None:
    factory, shape = KINDS[name]
    module = seeded(factory)
    scale_to_(module, shape, 3.0 * CLIP_TARGET)
    result = clip_spectral_norm_(module, CLIP_TARGET, shape, max_rounds=0)  # no rounds: the rescale does it all
    assert result.rescaled and result.spectrum is not None
    truth = singular_values(module, shape)[0].item()
    assert result.spectrum.sigma == pytest.approx(truth, rel=1e-3)
    v = result.spectrum.right[:1]
    A = ImplicitLinear(as_seq(module), shape)
    assert A.matvec(v).norm().item() == pytest.approx(truth, rel=1e-3)  # the vector still goes with σ₁


@pytest.mark.parametrize(
    "name, seed, factor",
    [
        pytest.param("conv1d_zeros", 3, 3.0, id="conv1d_zeros-seed3-3x"),
        pytest.param("conv1d_replicate", 3, 1.1, id="conv1d_replicate-seed3-1.1x"),
        pytest.param("conv2d_circular", 2, 3.0, id="conv2d_circular-seed2-3x"),
        pytest.param("conv3d_circular", 2, 3.0, id="conv3d_circular-seed2-3x"),
    ],
)
def test_lands_within_one_percent_on_more_seeds(name: str, seed: int, factor: float) -> None:
    """Regressions from a sweep over seeds 0-4 and σ₁ ∈ {3, 1.1}·target of every kind above.

    At b8ff288 the first two were clipped far below the target (0.15 and 0.20 × target: a round built on a
    spurious Ritz value from a basis that had lost orthogonality) and the last two were left above it (1.07 and
    1.45 × target) while ``after`` said ``≈ target`` (warm-started measurements missed a new top).
    """
    factory, shape = KINDS[name]
    module = seeded(factory, seed)
    scale_to_(module, shape, factor * CLIP_TARGET)
    result = clip_spectral_norm_(module, CLIP_TARGET, shape)
    sigma = singular_values(module, shape)[0].item()
    assert abs(result.after - sigma) <= 1e-2 * CLIP_TARGET, (sigma, result.after)
    assert abs(sigma / CLIP_TARGET - 1) <= 1e-2, (sigma, result.after)


def test_conv_bn_keeps_running_statistics_and_modes() -> None:
    module = conv_bn()
    scale_to_(module, (4, 8, 8), 2.5 * CLIP_TARGET)
    module.train()
    stats = {k: v.clone() for k, v in module[1].state_dict().items() if k != "weight"}
    clip_spectral_norm_(module, CLIP_TARGET, (4, 8, 8))
    assert module.training and module[0].training and module[1].training
    for key, value in stats.items():
        assert torch.equal(module[1].state_dict()[key], value), key  # running stats, bias, counter unchanged


SET_CASES = {
    "conv2d_reflect": (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (4, 8, 8), 1e-2),
    "conv2d_stride2": (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1), (4, 8, 8), 1e-2),
    "conv2d_bn": (conv_bn, (4, 8, 8), 1e-2),
    "linear": (lambda: nn.Linear(8, 6), (8,), 1e-4),
    "linear_bn": (lambda: nn.Sequential(nn.Linear(8, 6), with_stats(nn.BatchNorm1d(6))), (8,), 1e-4),
    "batchnorm2d": (lambda: with_stats(nn.BatchNorm2d(3)), (3, 2, 2), 1e-6),
}


@pytest.mark.parametrize("name", list(SET_CASES))
def test_set_mode_raises_a_small_norm_to_target(name: str) -> None:
    factory, shape, tol = SET_CASES[name]
    module = seeded(factory)
    if isinstance(module, nn.BatchNorm2d):
        with torch.no_grad():
            module.weight.mul_(0.1 * CLIP_TARGET / batchnorm_scale(module).abs().max())
    else:
        scale_to_(module, shape, 0.2 * CLIP_TARGET)
    result = clip_spectral_norm_(module, CLIP_TARGET, shape, mode="set")
    sigma = singular_values(module, shape)[0].item()
    assert abs(sigma / CLIP_TARGET - 1) <= tol, (sigma, result)
    assert result.converged and result.before < 0.25 * CLIP_TARGET


def test_set_mode_also_lowers_a_large_norm() -> None:
    module = seeded(lambda: nn.Conv2d(4, 4, 3, padding=1))
    scale_to_(module, (4, 8, 8), 2.0 * CLIP_TARGET)
    clip_spectral_norm_(module, CLIP_TARGET, (4, 8, 8), mode="set")
    assert abs(singular_values(module, (4, 8, 8))[0].item() / CLIP_TARGET - 1) <= 1e-2


BELOW_CASES = [
    pytest.param(lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate"), (4, 8, 8), id="conv2d"),
    pytest.param(conv_bn, (4, 8, 8), id="conv2d_bn"),
    pytest.param(lambda: nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1), (4, 4, 4), id="convT2d"),
    pytest.param(lambda: with_stats(nn.BatchNorm2d(3)), (3, 2, 2), id="batchnorm"),
    pytest.param(lambda: nn.Conv2d(4, 4, 3, padding=1).to(torch.bfloat16), (4, 8, 8), id="conv2d_bf16"),
    pytest.param(lambda: nn.Linear(8, 6), (8,), id="linear"),
]


@pytest.mark.parametrize("factory, shape", BELOW_CASES)
def test_clip_mode_below_target_leaves_weights_bit_for_bit(factory, shape) -> None:
    module = seeded(factory)
    if isinstance(module, nn.BatchNorm2d):
        with torch.no_grad():
            module.weight.mul_(0.5 * CLIP_TARGET / batchnorm_scale(module).abs().max())
    else:
        scale_to_(module, shape, 0.5 * CLIP_TARGET)
    snap = state_snapshot(module)
    result = clip_spectral_norm_(module, CLIP_TARGET, shape)
    assert state_unchanged(module, snap)
    assert result.converged and result.after == pytest.approx(0.5 * CLIP_TARGET, rel=1e-2)


def test_final_measurement_converges_for_float32_conv_bn() -> None:
    """The final measurement's tolerance must be reachable in float32 (it used to run 1000 Krylov blocks here)."""
    module = conv_bn()
    scale_to_(module, (4, 8, 8), 0.5 * CLIP_TARGET)
    result = clip_spectral_norm_(module, CLIP_TARGET, (4, 8, 8))
    assert result.spectrum is not None and result.spectrum.converged


# Bad input


@pytest.mark.parametrize("target", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, "big", None])
def test_bad_target_is_refused(target) -> None:
    conv = seeded(lambda: nn.Conv2d(2, 2, 3, padding=1))
    snap = state_snapshot(conv)
    with pytest.raises(ValueError, match="target must be a positive finite number"):
        clip_spectral_norm_(conv, target, (2, 4, 4))
    with pytest.raises(ValueError, match="target must be a positive finite number"):
        clip_spectral_norm_(nn.Linear(3, 3), target)
    assert state_unchanged(conv, snap)


def test_unknown_mode_and_bad_tol_are_refused() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    with pytest.raises(ValueError, match=r"unknown mode 'exact'; allowed: clip, set"):
        clip_spectral_norm_(conv, 1.0, (2, 4, 4), mode="exact")
    for tol in (0.0, -1e-2, math.nan):
        with pytest.raises(ValueError, match="tol must be"):
            clip_spectral_norm_(conv, 1.0, (2, 4, 4), tol=tol)


def test_conv_without_input_shape_is_refused() -> None:
    conv = seeded(lambda: nn.Conv2d(2, 2, 3, padding=1))
    snap = state_snapshot(conv)
    with pytest.raises(ValueError, match="input_shape is required"):
        clip_spectral_norm_(conv, 0.1)
    with pytest.raises(ValueError, match="input_shape is required"):
        clip_spectral_norm_(conv_bn(), 0.1)
    assert state_unchanged(conv, snap)


def test_unsupported_module_needs_param() -> None:
    with pytest.raises(TypeError, match="param="):
        clip_spectral_norm_(nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)), 1.0, (2, 8, 8))
    with pytest.raises(ValueError, match="is not a parameter"):
        clip_spectral_norm_(nn.Conv2d(2, 2, 3), 1.0, (2, 8, 8), param="nope")


NONFINITE = {
    "conv_weight_nan": (lambda: nn.Conv2d(2, 2, 3, padding=1), (2, 4, 4), "weight", math.nan),
    "conv_weight_inf": (lambda: nn.Conv2d(2, 2, 3, padding=1), (2, 4, 4), "weight", math.inf),
    "conv_bias_nan": (lambda: nn.Conv2d(2, 2, 3, padding=1), (2, 4, 4), "bias", math.nan),
    "linear_weight_inf": (lambda: nn.Linear(3, 3), (3,), "weight", -math.inf),
    "bn_running_var_inf": (lambda: with_stats(nn.BatchNorm2d(2)), (2, 2, 2), "running_var", math.inf),
    "conv_bn_bn_weight_nan": (conv_bn, (4, 8, 8), "1.weight", math.nan),
}


@pytest.mark.parametrize("name", list(NONFINITE))
def test_non_finite_weights_are_refused_and_left_bit_for_bit(name: str) -> None:
    factory, shape, tensor_name, value = NONFINITE[name]
    module = seeded(factory)
    with torch.no_grad():
        dict(module.state_dict(keep_vars=True))[tensor_name].view(-1)[0] = value
    snap = state_snapshot(module)
    with pytest.raises(ValueError, match="non-finite"):
        clip_spectral_norm_(module, 0.01, shape)
    assert state_unchanged(module, snap)


# Rollback: a failure anywhere leaves the module exactly as it was


def _raise_at_every_spectrum_call(monkeypatch, make, shape) -> list[int]:
    """Make the measurements (``spectrum``, and ``gap_free_spectra`` for the checks) raise at call 1, 2, …, n in
    turn; return the calls after which weights had changed."""
    counter = {"calls": 0, "raise_at": 0}

    def counting(real):
        def counted(*args, **kwargs):
            counter["calls"] += 1
            if counter["calls"] == counter["raise_at"]:
                raise RuntimeError("spectrum failed")
            return real(*args, **kwargs)

        return counted

    monkeypatch.setattr(iterative, "spectrum", counting(iterative.spectrum))
    monkeypatch.setattr(lockstep, "gap_free_spectra", counting(lockstep.gap_free_spectra))
    clip_spectral_norm_(make(), CLIP_TARGET, shape, max_rounds=2)  # 2 rounds: fewer calls, still a mid-way failure
    total = counter["calls"]
    assert total >= 3
    changed = []
    for at in range(1, total + 1):
        module = make()
        snap = state_snapshot(module)
        counter.update(calls=0, raise_at=at)
        with pytest.raises(RuntimeError, match="spectrum failed"):
            clip_spectral_norm_(module, CLIP_TARGET, shape, max_rounds=2)
        if not state_unchanged(module, snap):
            changed.append(at)
    return changed


@pytest.mark.parametrize("make", [big_conv, big_conv_bn], ids=["conv", "conv_bn"])
def test_spectrum_raising_at_any_point_rolls_back(monkeypatch, make) -> None:
    assert _raise_at_every_spectrum_call(monkeypatch, make, (4, 8, 8)) == []


def test_spectrum_raising_at_any_point_rolls_back_bf16(monkeypatch) -> None:
    def make():
        module = big_conv()
        return module.to(torch.bfloat16)

    assert _raise_at_every_spectrum_call(monkeypatch, make, (4, 8, 8)) == []


# Contexts and dtypes


def test_works_under_no_grad_and_keeps_autograd_usable() -> None:
    module = big_conv()
    with torch.no_grad():
        result = clip_spectral_norm_(module, CLIP_TARGET, (4, 8, 8))
    assert abs(singular_values(module, (4, 8, 8))[0].item() / CLIP_TARGET - 1) <= 1e-2 and result.converged
    assert module.weight.requires_grad and module.weight.grad is None
    module(torch.randn(1, 4, 8, 8)).sum().backward()
    assert module.weight.grad is not None


BF16 = {
    "conv2d": (lambda: nn.Conv2d(4, 4, 3, padding=1), (4, 8, 8)),
    "conv2d_circular": (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), (4, 8, 8)),
    "conv2d_bn": (conv_bn, (4, 8, 8)),
    "linear": (lambda: nn.Linear(8, 6), (8,)),
}


@pytest.mark.parametrize("name", list(BF16))
def test_bf16_weights(name: str) -> None:
    factory, shape = BF16[name]
    module = seeded(factory)
    scale_to_(module, shape, 3.0 * CLIP_TARGET)
    module = module.to(torch.bfloat16)
    weight = first_weight(module)
    result = clip_spectral_norm_(module, CLIP_TARGET, shape)
    assert first_weight(module) is weight and weight.dtype == torch.bfloat16
    assert all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())
    sigma = singular_values(module, shape)[0].item()
    assert abs(sigma / CLIP_TARGET - 1) <= 1.5e-2, (sigma, result)


def test_float64_layer_is_clipped_in_float64() -> None:
    module = seeded(lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate")).double()
    scale_to_(module, (4, 8, 8), 3.0 * CLIP_TARGET)
    result = clip_spectral_norm_(module, CLIP_TARGET, (4, 8, 8), tol=1e-3)
    assert module.weight.dtype == torch.float64
    assert abs(singular_values(module, (4, 8, 8))[0].item() / CLIP_TARGET - 1) <= 1e-3 and result.converged


# Warm starts, determinism, tolerance


def test_warm_start_from_spectrum_and_from_a_previous_result() -> None:
    module = big_conv()
    warm = spectrum(module, (4, 8, 8), k=4)
    result = clip_spectral_norm_(module, CLIP_TARGET, (4, 8, 8), spectrum=warm)
    assert abs(singular_values(module, (4, 8, 8))[0].item() / CLIP_TARGET - 1) <= 1e-2
    with torch.no_grad():
        module.weight.mul_(1.1)  # a training step later: slightly above the target again
    again = clip_spectral_norm_(module, CLIP_TARGET, (4, 8, 8), spectrum=result.spectrum)
    assert abs(singular_values(module, (4, 8, 8))[0].item() / CLIP_TARGET - 1) <= 1e-2
    assert again.before == pytest.approx(1.1 * result.after, rel=1e-2)
    right_only = clip_spectral_norm_(module, CLIP_TARGET, (4, 8, 8), spectrum=again.spectrum.right)
    assert right_only.rounds == 0


def test_same_seed_gives_bit_identical_weights() -> None:
    a, b = big_conv(), big_conv()
    clip_spectral_norm_(a, CLIP_TARGET, (4, 8, 8), seed=3)
    clip_spectral_norm_(b, CLIP_TARGET, (4, 8, 8), seed=3)
    assert torch.equal(a.weight, b.weight)


def test_tighter_tol_lands_closer() -> None:
    module = big_conv()
    result = clip_spectral_norm_(module, CLIP_TARGET, (4, 8, 8), tol=1e-4)
    assert abs(singular_values(module, (4, 8, 8))[0].item() / CLIP_TARGET - 1) <= 1e-4
    assert result.converged


def test_one_dimensional_operator() -> None:
    conv = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(3.0)
    clip_spectral_norm_(conv, CLIP_TARGET, (1, 1, 1))
    assert conv.weight.abs().item() == pytest.approx(CLIP_TARGET, rel=1e-2)


def test_misleading_warm_start_is_checked_cold() -> None:
    """A warm start that is an exact bottom singular vector says "below the target"; it must not be believed."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    shape = (2, 6, 6)
    with torch.no_grad():
        conv.weight.mul_(3.0 / float(dense_singular_values(conv, shape)[0]))
    matrix = torch.func.jacrev(lambda x: conv(x.view(1, *shape)).flatten())(torch.zeros(math.prod(shape)))
    bottom = torch.linalg.svd(matrix.detach().double())[2][-1].float().view(1, *shape)
    result = clip_spectral_norm_(conv, 1.0, shape, spectrum=bottom, block_size=1)
    assert result.before == pytest.approx(3.0, rel=1e-3)
    assert float(dense_singular_values(conv, shape)[0]) <= 1.0 * 1.01


def test_clip_is_decided_on_sigma_even_when_many_values_crowd_below_it() -> None:
    """The diagonal map of a depthwise conv on 1×1 inputs (EfficientNet's last stages on small images), warm-started
    from a direction that is not the top (a training loop's tracked vector can lag): what is written is decided by
    a measurement that finds σ₁ whatever the spectrum, so the layer ends within tol by its exact norm."""
    n = 1152
    values = torch.randn(n, generator=torch.Generator().manual_seed(5)).abs() * 3.0
    third = int(values.argsort(descending=True)[2])
    warm = torch.zeros(1, n, 1, 1)
    warm[0, third] = 1.0
    for seed in range(8):
        conv = nn.Conv2d(n, n, 5, padding=2, groups=n, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, 0, 2, 2] = values
        result = clip_spectral_norm_(conv, CLIP_TARGET, (n, 1, 1), spectrum=warm, max_rounds=1, block_size=1, seed=seed)
        true = float(conv.weight[:, 0, 2, 2].abs().max())  # the exact norm of a diagonal map
        assert true <= CLIP_TARGET * 1.01, seed
        assert true * (1 - 0.0075) <= result.after <= true * (1 + 1e-5), seed


TOL = 1e-2


def test_iterative_and_batchnorm_paths_report_changed_and_measured_after() -> None:
    torch.manual_seed(0)
    shape = (3, 8, 8)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    snap = snapshot(conv)
    big = 10 * ground_truth_sigma(conv, shape)
    result = clip_spectral_norm_(conv, big, shape)
    assert unchanged(conv, snap) and not result.changed
    result = clip_spectral_norm_(conv, 0.3, shape)
    truth = ground_truth_sigma(conv, shape)
    assert abs(result.after - truth) <= 1e-3 * truth and truth <= 0.3 * (1 + TOL) and result.changed
    result = clip_spectral_norm_(conv, 0.3, shape, max_rounds=0)  # already on the target: nothing to do
    assert not result.changed
    conv = nn.Conv2d(3, 4, 3, padding=1)
    result = clip_spectral_norm_(conv, 0.2, shape, max_rounds=0)  # the exact rescale: measured after it
    truth = ground_truth_sigma(conv, shape)
    assert result.rescaled and result.after == pytest.approx(truth, rel=1e-4) and result.changed
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -3.0, 1.0]))
    snap = snapshot(bn)
    result = clip_spectral_norm_(bn, 4.0)
    assert unchanged(bn, snap) and not result.changed
    result = clip_spectral_norm_(bn, 1.5)
    truth = (bn.weight.double().abs() / (bn.running_var.double() + bn.eps).sqrt()).max().item()
    assert result.after == pytest.approx(truth, rel=1e-6) and truth <= 1.5 * (1 + 1e-6) and result.changed


class _OwnLinear(nn.Linear):
    """A subclass of Linear that is linear in its weight (no closed form: clipped by the iterative path)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


def test_clip_with_one_feature_inputs() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, padding=1)  # a 1×1 input with one channel: one input feature
    with torch.no_grad():
        conv.weight.mul_(10.0)
    result = clip_spectral_norm_(conv, 0.5, (1, 1, 1))
    truth = ground_truth_sigma(conv, (1, 1, 1))
    assert truth == pytest.approx(0.5, rel=TOL) and result.after == pytest.approx(truth, rel=1e-5) and result.changed
    conv1d = nn.Conv1d(1, 3, 1)
    with torch.no_grad():
        conv1d.weight.fill_(2.0)
    clip_spectral_norm_(conv1d, 0.5, (1, 1))
    assert ground_truth_sigma(conv1d, (1, 1)) == pytest.approx(0.5, rel=TOL)
    lin = nn.Linear(1, 5)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    result = clip_spectral_norm_(lin, 0.5)
    assert weight_sigma(lin.weight) == pytest.approx(0.5, rel=1e-6) and result.changed
    own = _OwnLinear(1, 5)  # not a plain Linear: the iterative path, on a 1-feature input
    with torch.no_grad():
        own.weight.fill_(3.0)
    clip_spectral_norm_(own, 0.5)
    assert weight_sigma(own.weight) == pytest.approx(0.5, rel=TOL)


CLIP_TOL = 0.0075


def _layers() -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Three convolutions of one geometry (one grouped convolution on a CPU), one of another input size, a
    reflect-padded one (no closed form), a strided one, a conv→BN, and a small Linear (measured densely)."""
    torch.manual_seed(0)
    layers: list[tuple[nn.Module, tuple[int, ...]]] = [(nn.Conv2d(3, 3, 3, padding=1), (3, 10, 10)) for _ in range(3)]
    bn = nn.BatchNorm2d(4)
    bn.running_var.uniform_(0.5, 2.0)
    layers += [
        (nn.Conv2d(3, 3, 3, padding=1), (3, 12, 12)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 10, 10)),
        (nn.Conv2d(3, 5, 3, stride=2, padding=1), (3, 10, 10)),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn.eval()), (3, 9, 9)),
        (nn.Linear(20, 7), (20,)),
    ]
    for module, _ in layers:
        with torch.no_grad():
            next(module.parameters()).mul_(4)
    return layers


def test_lockstep_measurements_match_one_at_a_time_and_the_ground_truth() -> None:
    layers = _layers()
    operators = [ImplicitLinear(m, shape) for m, shape in layers]
    seeds = list(range(len(operators)))
    together = gap_free_spectra(operators, CLIP_TOL, seeds=seeds, left=[True, False] * 4)
    assert any(A.in_features <= GAP_FREE_DENSE_MAX for A in operators)
    for (module, shape), A, seed, got in zip(layers, operators, seeds, together, strict=True):
        alone = spectrum(A, solver="gap_free", tol=CLIP_TOL, seed=seed, left=False)
        assert got.solver == "gap_free" and got.matvecs == alone.matvecs
        assert got.sigma == pytest.approx(alone.sigma, rel=1e-5)
        torch.testing.assert_close(got.right.abs(), alone.right.abs(), rtol=0, atol=1e-3)
        truth = dense_spectral_norm(module, shape)
        assert truth * (1 - CLIP_TOL) <= got.sigma <= truth * (1 + 1e-5)
    for i, got in enumerate(together):
        assert (got.left is not None) == (i % 2 == 0)
        if got.left is not None:  # A v = σ u
            image = operators[i].matvec(got.right)
            torch.testing.assert_close(image, got.values[0] * got.left, rtol=0, atol=1e-4 * got.sigma)


def test_lockstep_measurements_refuse_mismatched_arguments() -> None:
    A = ImplicitLinear(nn.Linear(3, 3), (3,))
    with pytest.raises(ValueError, match="one seed and one left flag per operator"):
        gap_free_spectra([A, A], CLIP_TOL, seeds=[0])
    with pytest.raises(ValueError, match="tol"):
        gap_free_spectra([A], 1.5)
    assert gap_free_spectra([], CLIP_TOL) == []


@pytest.mark.parametrize("warm", [False, True])
def test_clipping_many_writes_what_clipping_each_writes(warm: bool) -> None:
    layers = _layers()
    twins = copy.deepcopy(layers)
    targets = [0.5 + 0.1 * i for i in range(len(layers))]
    targets[0] = 100.0  # already below: nothing to write
    inits = [spectrum(m, shape, left=False).right if warm else None for m, shape in layers]
    results = clip_spectral_norms_(
        [m for m, _ in layers], targets, [shape for _, shape in layers], spectra=inits, max_rounds=1, block_size=1
    )
    for (module, shape), (twin, _), target, init, got in zip(layers, twins, targets, inits, results, strict=True):
        alone = clip_spectral_norm_(twin, target, shape, spectrum=init, max_rounds=1, block_size=1)
        assert (got.changed, got.rounds, got.rescaled) == (alone.changed, alone.rounds, alone.rescaled)
        assert got.after == pytest.approx(alone.after, rel=1e-4)
        for p, q in zip(module.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        truth = dense_spectral_norm(module, shape)
        assert truth <= target * 1.01 and got.after == pytest.approx(truth, rel=0.01)
        if target < 100:
            assert truth >= target * 0.99
    assert not results[0].changed


def test_clipping_many_refuses_shared_parameters_and_mismatched_lists() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    bn = nn.BatchNorm2d(2).eval()
    with pytest.raises(ValueError, match="share a parameter"):
        clip_spectral_norms_([conv, nn.Sequential(conv, bn)], 1.0, [(2, 6, 6), (2, 6, 6)])
    with pytest.raises(ValueError, match="one target, input shape and spectrum per module"):
        clip_spectral_norms_([conv], [1.0, 2.0], [(2, 6, 6)])


def test_one_bad_layer_leaves_every_layer_unchanged() -> None:
    layers = _layers()
    with torch.no_grad():
        layers[4][0].weight[0, 0, 0, 0] = float("nan")
    before = [[p.detach().clone() for p in m.parameters()] for m, _ in layers]
    with pytest.raises(ValueError, match="non-finite"):
        clip_spectral_norms_([m for m, _ in layers], 0.5, [shape for _, shape in layers])
    for (module, _), saved in zip(layers, before, strict=True):
        for p, q in zip(module.parameters(), saved, strict=True):
            assert torch.equal(p.detach().nan_to_num(7.0), q.nan_to_num(7.0))


def test_a_layer_run_at_two_sizes_is_clipped_in_order_and_holds_both_bounds() -> None:
    """The clipper clips maps that share parameters one after the other (the second sees the first's clip)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)
    clipper = SpectralClipper(model, 1.0)
    model(torch.randn(2, 3, 6, 6))
    model(torch.randn(2, 3, 11, 11))
    clipper.clip()
    assert len(clipper.maps) == 4
    for m in clipper.maps:
        truth = dense_spectral_norm(m.module, m.input_shape)
        assert truth <= 1.01
        assert clipper.sigmas[m.name] == pytest.approx(truth, rel=0.01)


def test_clipping_many_of_mixed_dtypes_lands_each_on_its_target() -> None:
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)]
    convs[1] = convs[1].double()
    convs[2] = convs[2].to(torch.bfloat16)
    for conv in convs:
        with torch.no_grad():
            conv.weight.mul_(6)
    results = clip_spectral_norms_(convs, [0.5, 0.7, 0.9], [(3, 9, 9)] * 3)
    for conv, target, result in zip(convs, [0.5, 0.7, 0.9], results, strict=True):
        assert result.changed and conv.weight.dtype in (torch.float32, torch.float64, torch.bfloat16)
        truth = dense_spectral_norm(conv.double(), (3, 9, 9))
        assert truth == pytest.approx(target, rel=0.01) and result.after == pytest.approx(truth, rel=0.01)
