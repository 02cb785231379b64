"""Nothing the core reports is taken on trust: every number is checked against a float64 ground truth.

Regression tests for the trust issue, core part: the dense SVD clip on repeated singular values, ``after``
measured (and ``changed`` reported) on every path and baseline, 1-feature inputs and ``k = n``, the affinity
probe on tiny weights with an ordinary bias, clipping through weight-norm parametrizations (and refusing
spectral-norm ones), and refusing layers that are not linear in their weight.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

import lightning_specclip.spectral.clip as clip_module
from lightning_specclip.methods import Gouk, Miyato, Senderovich
from lightning_specclip.spectral.clip import NotLinearInWeightError, check_clippable, clip_spectral_norm_, parametrized
from lightning_specclip.spectral.exact import dense_singular_values
from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.spectral.spectrum import spectrum
from lightning_specclip.targets import TrackedMap

pytestmark = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")

FIXTURE = Path(__file__).parent / "fixtures" / "convnext_linear_svd_breakdown.pt"
TOL = 1e-2


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Pin one intra-op thread (the setting under which float32 LAPACK broke on the fixture), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bits(t: Tensor) -> Tensor:
    return t.detach().clone().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    tensors = (*module.named_parameters(), *module.named_buffers())
    return {name: _bits(t) for name, t in tensors if t.is_floating_point()}


def _unchanged(module: nn.Module, snap: dict[str, Tensor]) -> bool:
    now = _snapshot(module)
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def _sigma64(weight: Tensor) -> float:
    """Float64 ground truth: the largest singular value of a weight matrix."""
    return torch.linalg.svdvals(weight.detach().double())[0].item()


def _truth(module: nn.Module, shape) -> float:
    """Float64 ground truth of a map's spectral norm: dense matrix from float64 forward passes, then its SVD."""
    return dense_singular_values(module, shape)[0].item()


def _fixture_linear() -> nn.Linear:
    weight = torch.load(FIXTURE)
    lin = nn.Linear(384, 1536)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


# ---------------------------------------------------------------- 1. dense clip: verified before writing


def _broken_float32_svd(monkeypatch, how: str) -> list[torch.dtype]:
    """Make float32 ``torch.linalg.svd`` fail as LAPACK did on the fixture: raise, or return a non-orthogonal U
    (the columns of the repeated cluster all equal, so max|UᵀU − I| ≈ 1). Float64 calls are left alone."""
    real = torch.linalg.svd
    calls: list[torch.dtype] = []

    def svd(matrix, *args, **kwargs):
        calls.append(matrix.dtype)
        if matrix.dtype != torch.float32:
            return real(matrix, *args, **kwargs)
        if how == "raise":
            raise torch.linalg.LinAlgError(
                "linalg.svd: The algorithm failed to converge because the input matrix is ill-conditioned or has "
                "too many repeated singular values (error code: 191)."
            )
        U, S, Vh = real(matrix, *args, **kwargs)
        cluster = ((S - S[0]).abs() <= 1e-5 * S[0]).nonzero().flatten()
        U = U.clone()
        U[:, cluster] = U[:, cluster[:1]]
        return U, S, Vh

    monkeypatch.setattr(torch.linalg, "svd", svd)
    return calls


@pytest.mark.parametrize("how", ["non_orthogonal", "raise"])
def test_fixture_broken_float32_svd_is_retried_in_float64(monkeypatch, one_thread, how: str) -> None:
    lin = _fixture_linear()
    assert _sigma64(lin.weight) == pytest.approx(1.0, abs=1e-5)
    calls = _broken_float32_svd(monkeypatch, how)
    result = clip_spectral_norm_(lin, 0.9)
    truth = _sigma64(lin.weight)
    assert truth <= 0.9 * (1 + TOL) and truth == pytest.approx(0.9, rel=1e-5), truth
    assert result.after == pytest.approx(truth, rel=1e-6) and result.converged
    assert torch.float64 in calls  # the broken float32 decomposition was not trusted
    assert result.changed


def test_fixture_when_every_svd_fails_nothing_is_written(monkeypatch, one_thread) -> None:
    lin = _fixture_linear()
    snap = _snapshot(lin)

    def svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", svd)
    with pytest.raises(RuntimeError, match=r"float32 SVD raised.*float64 SVD raised.*left unchanged"):
        clip_spectral_norm_(lin, 0.9)
    assert _unchanged(lin, snap)


def test_fixture_clip_is_exact_and_already_clipped_is_a_no_op(one_thread) -> None:
    lin = _fixture_linear()
    snap = _snapshot(lin)
    before = _sigma64(lin.weight)  # 1.0000036: within tol of 1.0
    result = clip_spectral_norm_(lin, 1.0)
    assert _unchanged(lin, snap) and result.converged
    assert result.before == pytest.approx(before, rel=1e-6) and result.after == result.before
    assert not result.changed
    result = clip_spectral_norm_(lin, 0.5)
    truth = torch.linalg.svdvals(lin.weight.detach().double())
    assert truth[0].item() == pytest.approx(0.5, rel=1e-5)
    assert result.after == pytest.approx(truth[0].item(), rel=1e-6) and result.changed


def _repeated(m: int, n: int, repeats: int, value: float, seed: int = 0) -> Tensor:
    """A float32 (m, n) matrix with ``repeats`` singular values equal to ``value`` and the rest in (0, value/2)."""
    gen = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    s = value * torch.rand(n, generator=gen, dtype=torch.float64) / 2
    s[:repeats] = value
    return ((Q1 * s) @ Q2.T).float()


def test_synthetic_repeated_singular_values_at_the_target(monkeypatch, one_thread) -> None:
    lin = nn.Linear(256, 768)
    with torch.no_grad():
        lin.weight.copy_(_repeated(768, 256, 200, 1.000014))
    snap = _snapshot(lin)
    result = clip_spectral_norm_(lin, 1.0)  # σ = 1.000014 ≤ 1·(1 + tol/4): nothing to do
    assert _unchanged(lin, snap) and not result.changed
    assert result.after == pytest.approx(_sigma64(lin.weight), rel=1e-5)  # a verified float32 SVD
    # clipping the whole cluster, with real LAPACK and with one that breaks down on it
    for broken in (False, True):
        copy_ = copy.deepcopy(lin)
        if broken:
            _broken_float32_svd(monkeypatch, "non_orthogonal")
        result = clip_spectral_norm_(copy_, 0.8)
        truth = _sigma64(copy_.weight)
        assert truth == pytest.approx(0.8, rel=1e-5) and result.after == pytest.approx(truth, rel=1e-6)
        # the singular values below the target are untouched
        below = torch.linalg.svdvals(lin.weight.detach().double())[200:]
        torch.testing.assert_close(torch.linalg.svdvals(copy_.weight.detach().double())[200:], below, atol=1e-5, rtol=0)


def test_linear_within_tolerance_is_a_no_op() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    with torch.no_grad():
        lin.weight.mul_(1.000014 / _sigma64(lin.weight))
    snap = _snapshot(lin)
    result = clip_spectral_norm_(lin, 1.0, tol=1e-2)
    assert _unchanged(lin, snap) and not result.changed
    lin_bn = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).eval()
    snap = _snapshot(lin_bn)
    result = clip_spectral_norm_(lin_bn, 10.0)
    assert _unchanged(lin_bn, snap) and not result.changed


def test_iterative_and_batchnorm_paths_report_changed_and_measured_after() -> None:
    torch.manual_seed(0)
    shape = (3, 8, 8)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    snap = _snapshot(conv)
    big = 10 * _truth(conv, shape)
    result = clip_spectral_norm_(conv, big, shape)
    assert _unchanged(conv, snap) and not result.changed
    result = clip_spectral_norm_(conv, 0.3, shape)
    truth = _truth(conv, shape)
    assert abs(result.after - truth) <= 1e-3 * truth and truth <= 0.3 * (1 + TOL) and result.changed
    result = clip_spectral_norm_(conv, 0.3, shape, max_rounds=0)  # already on the target: nothing to do
    assert not result.changed
    conv = nn.Conv2d(3, 4, 3, padding=1)
    result = clip_spectral_norm_(conv, 0.2, shape, max_rounds=0)  # the exact rescale: measured after it
    truth = _truth(conv, shape)
    assert result.rescaled and result.after == pytest.approx(truth, rel=1e-4) and result.changed
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -3.0, 1.0]))
    snap = _snapshot(bn)
    result = clip_spectral_norm_(bn, 4.0)
    assert _unchanged(bn, snap) and not result.changed
    result = clip_spectral_norm_(bn, 1.5)
    truth = (bn.weight.double().abs() / (bn.running_var.double() + bn.eps).sqrt()).max().item()
    assert result.after == pytest.approx(truth, rel=1e-6) and truth <= 1.5 * (1 + 1e-6) and result.changed


def _target(module: nn.Module, shape) -> TrackedMap:
    return TrackedMap("layer", "layer", module, module, input_shape=tuple(shape))


@pytest.mark.parametrize(
    ("method", "factory", "shape"),
    [
        (Gouk, lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 8, 8)),
        (Gouk, lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8)),
        (Miyato, lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8)),
        (Miyato, lambda: nn.Linear(7, 5), (7,)),
        (Senderovich, lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 8, 8)),
        (Senderovich, lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 8, 8)),
    ],
)
def test_baselines_report_the_measured_norm_of_what_they_wrote(method, factory, shape) -> None:
    torch.manual_seed(0)
    module = factory()
    with torch.no_grad():
        module.weight.mul_(3.0 / _truth(module, shape))
    clipper = method()
    target = _target(module, shape)
    state: dict[str, Tensor] = {}
    result = clipper.clip_(target, 1.0, state, None)
    truth = _truth(module, shape)
    assert result.after == pytest.approx(truth, rel=1e-4), (result.after, truth)
    assert result.spectrum is not None and result.spectrum.sigma == result.after
    assert result.changed and result.estimate is not None
    assert result.converged == (truth <= 1.0 * (1 + TOL))
    # warm-started from tracked vectors: that many are measured (the callback can reuse them)
    tracked = spectrum(module, shape, k=2).right
    again = clipper.clip_(target, 10.0, state, tracked)
    assert not again.changed and again.spectrum.right.shape[0] == 2
    assert again.after == pytest.approx(truth, rel=1e-4)


def test_baselines_that_do_not_write_say_so_and_leave_the_bits() -> None:
    torch.manual_seed(0)
    shape = (3, 8, 8)
    for clipper in (Gouk(), Miyato(), Senderovich()):
        conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
        snap = _snapshot(conv)
        result = clipper.clip_(_target(conv, shape), 100.0, {}, None)
        assert _unchanged(conv, snap), type(clipper).__name__
        assert result.after == pytest.approx(_truth(conv, shape), rel=1e-4)
        assert not result.changed


def test_gouk_on_circular_padding_reports_its_miss() -> None:
    torch.manual_seed(0)
    shape = (3, 8, 8)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    with torch.no_grad():
        conv.weight.mul_(3.0 / _truth(conv, shape))
    result = Gouk(n_iter_clip=200).clip_(_target(conv, shape), 1.0, {}, None)
    truth = _truth(conv, shape)
    assert truth > 1.0 * (1 + TOL) and result.after == pytest.approx(truth, rel=1e-4)  # the measurement ...
    assert not result.converged
    assert result.estimate == pytest.approx(1.0, rel=1e-4)  # ... next to its own estimate, which says "done"


# ---------------------------------------------------------------- 2. one-feature inputs, k = n


@pytest.mark.parametrize("solver", ["krylov", "power_qr", "subspace"])
@pytest.mark.parametrize(("features", "outputs", "k"), [(1, 5, 1), (3, 4, 3)])
def test_k_up_to_the_input_dimension(solver: str, features: int, outputs: int, k: int) -> None:
    torch.manual_seed(0)  # the weights are made here, not at collection time: the same in every test ordering
    module, shape = nn.Linear(features, outputs), (features,)
    truth = torch.linalg.svdvals(module.weight.detach().double())
    s = spectrum(module, shape, k=k, solver=solver, tol=1e-7)
    assert s.values.shape == (k,) and s.right.shape == (k, *shape)
    # PowerQR stops when the values change by less than tol in one iteration, not on a residual: looser
    rtol, atol = (1e-4, 1e-5) if solver == "power_qr" else (1e-5, 1e-6)
    torch.testing.assert_close(s.values.double(), truth[:k], rtol=rtol, atol=atol)


def test_k_equal_to_n_for_a_convolution() -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3, padding=1)
    truth = dense_singular_values(conv, (2, 3))
    for solver in ("krylov", "power_qr", "subspace"):
        s = spectrum(conv, (2, 3), k=6, solver=solver, tol=1e-7)
        torch.testing.assert_close(s.values.double(), truth, rtol=1e-4, atol=1e-5)


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
    truth = _truth(conv, (1, 1, 1))
    assert truth == pytest.approx(0.5, rel=TOL) and result.after == pytest.approx(truth, rel=1e-5) and result.changed
    conv1d = nn.Conv1d(1, 3, 1)
    with torch.no_grad():
        conv1d.weight.fill_(2.0)
    clip_spectral_norm_(conv1d, 0.5, (1, 1))
    assert _truth(conv1d, (1, 1)) == pytest.approx(0.5, rel=TOL)
    lin = nn.Linear(1, 5)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    result = clip_spectral_norm_(lin, 0.5)
    assert _sigma64(lin.weight) == pytest.approx(0.5, rel=1e-6) and result.changed
    own = _OwnLinear(1, 5)  # not a plain Linear: the iterative path, on a 1-feature input
    with torch.no_grad():
        own.weight.fill_(3.0)
    clip_spectral_norm_(own, 0.5)
    assert _sigma64(own.weight) == pytest.approx(0.5, rel=TOL)


# ---------------------------------------------------------------- 3. the affinity probe and rounding of the bias


def _tiny_conv(cls: type[nn.Conv2d] = nn.Conv2d) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = cls(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(1e-7 / _truth(conv, (3, 8, 8)))
        conv.bias.fill_(0.06)
    return conv


def test_tiny_weights_with_an_ordinary_bias_are_affine() -> None:
    shape = (3, 8, 8)
    conv = _tiny_conv()
    truth = _truth(conv, shape)
    assert truth == pytest.approx(1e-7, rel=1e-9)
    s = spectrum(conv, shape)
    assert s.sigma == pytest.approx(truth, rel=1e-4)
    snap = _snapshot(conv)
    result = clip_spectral_norm_(conv, 1.0, shape)  # a frozen layer: nothing to clip
    assert _unchanged(conv, snap) and not result.changed


class _OwnConv(nn.Conv2d):
    """A subclass: no closed form, so the probe runs on its raw outputs (where the bias dominates)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


def test_the_probe_allows_for_rounding_of_the_bias_but_not_for_a_nonlinearity() -> None:
    shape = (3, 8, 8)
    conv = _tiny_conv(_OwnConv)
    A = ImplicitLinear(conv, shape)  # the probe passes
    assert not A.closed_form
    s = spectrum(conv, shape)
    assert math.isfinite(s.sigma) and s.sigma < 1e-6  # float32 resolves 1e-7 under a 0.06 bias only roughly
    snap = _snapshot(conv)
    result = clip_spectral_norm_(conv, 1.0, shape)
    assert _unchanged(conv, snap) and not result.changed
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="not affine"):
        ImplicitLinear(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (4,))
    relu_tiny = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="not affine"):
        spectrum(relu_tiny, (4,))


# ---------------------------------------------------------------- 4. parametrized weights


def _weight_norm_new(module: nn.Module) -> nn.Module:
    return parametrizations.weight_norm(module)


def _weight_norm_legacy(module: nn.Module) -> nn.Module:
    return torch.nn.utils.weight_norm(module)


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (6,)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("wrap", [_weight_norm_new, _weight_norm_legacy], ids=["parametrizations", "legacy"])
def test_clip_through_weight_norm(kind: str, wrap) -> None:
    factory, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = wrap(factory())
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(("original0", "weight_g")):
                p.mul_(3.0)  # σ well above the target
    params = {name: p for name, p in layer.named_parameters()}
    assert _truth(layer, shape) > 1.0
    result = clip_spectral_norm_(layer, 0.5, shape)
    truth = _truth(layer, shape)
    assert truth <= 0.5 * (1 + TOL) and truth == pytest.approx(0.5, rel=TOL)
    assert result.after == pytest.approx(truth, rel=1e-4) and result.changed
    assert {name: p for name, p in layer.named_parameters()} == params  # same Parameter objects (optimizers)
    assert all(a is b for a, b in zip(layer.parameters(), params.values(), strict=True))
    out = layer(torch.randn(2, *shape))  # the layer still runs
    assert torch.isfinite(out).all()
    # already clipped: nothing to do, bit for bit
    snap = _snapshot(layer)
    result = clip_spectral_norm_(layer, 0.5, shape)
    assert _unchanged(layer, snap) and not result.changed


@pytest.mark.parametrize("wrap", [_weight_norm_new, _weight_norm_legacy], ids=["parametrizations", "legacy"])
def test_clip_through_weight_norm_before_batchnorm(wrap) -> None:
    torch.manual_seed(0)
    conv = wrap(nn.Conv2d(3, 4, 3, padding=1))
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.5, 1.0, 2.0, 0.25]))
        bn.weight.copy_(torch.tensor([1.5, 0.5, 1.0, 2.0]))
    pair = nn.Sequential(conv, bn)
    shape = (3, 6, 6)
    bn_snap = _snapshot(bn)
    result = clip_spectral_norm_(pair, 0.5, shape)
    truth = _truth(pair, shape)
    assert truth <= 0.5 * (1 + TOL) and result.after == pytest.approx(truth, rel=1e-4) and result.changed
    assert _unchanged(bn, bn_snap)
    lin = wrap(nn.Linear(6, 5))
    bn1 = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn1.weight.fill_(3.0)
    result = clip_spectral_norm_((lin, bn1), 0.5)
    truth = _truth(nn.Sequential(lin, bn1), (6,))
    assert truth == pytest.approx(0.5, rel=1e-5) and result.after == pytest.approx(truth, rel=1e-6) and result.changed


SPECTRAL = {
    "parametrizations": (parametrizations.spectral_norm, "_SpectralNorm"),
    "legacy": (torch.nn.utils.spectral_norm, "SpectralNorm"),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("which", list(SPECTRAL))
def test_spectral_norm_parametrization_is_refused_and_nothing_moves(kind: str, which: str) -> None:
    factory, shape = LAYERS[kind]
    wrap, name = SPECTRAL[which]
    torch.manual_seed(0)
    layer = wrap(factory()).train()  # training mode: a forward would run the power iteration on _u/_v
    snap = _snapshot(layer)
    with pytest.raises(ValueError, match=rf"{name}.*(remove|Remove).*track"):
        clip_spectral_norm_(layer, 0.1, shape)
    assert _unchanged(layer, snap) and layer.training
    with pytest.raises(ValueError, match=name):
        check_clippable(layer)
    assert _unchanged(layer, snap) and all(m.training for m in layer.modules())


def test_check_clippable_passes_weight_norm_and_plain_layers() -> None:
    assert "check_clippable" in clip_module.__all__ and "NotLinearInWeightError" in clip_module.__all__
    for layer in (nn.Linear(4, 3), _weight_norm_new(nn.Conv2d(2, 3, 3)), _weight_norm_legacy(nn.Linear(4, 3))):
        snap = _snapshot(layer)
        check_clippable(layer)
        assert _unchanged(layer, snap)
    check_clippable(_weight_norm_new(nn.Conv2d(2, 3, 3)), (2, 6, 6))
    check_clippable((_weight_norm_new(nn.Conv2d(2, 3, 3)), nn.BatchNorm2d(3)), (2, 6, 6))


@pytest.mark.parametrize("wrap", [_weight_norm_new, _weight_norm_legacy], ids=["parametrizations", "legacy"])
def test_write_back_that_does_not_read_back_restores_the_originals(monkeypatch, wrap) -> None:
    torch.manual_seed(0)
    layer = wrap(nn.Conv2d(3, 4, 3, padding=1))
    shape = (3, 6, 6)
    snap = _snapshot(layer)
    before = _truth(layer, shape)
    monkeypatch.setattr(parametrized, "_computed_weight", lambda layer: torch.zeros_like(layer.weight))
    with pytest.raises(RuntimeError, match="did not give it back"):
        clip_spectral_norm_(layer, 0.1 * before, shape)
    assert _unchanged(layer, snap)
    assert _truth(layer, shape) == before


# ---------------------------------------------------------------- 5. not linear in the weight


class StdConv2d(nn.Conv2d):
    """Weight standardization per output channel, as timm's StdConv2d: linear in x, not in the weight."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (w - mean) / torch.sqrt(var + 1e-6), self.bias)


class StdLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        return nn.functional.linear(x, (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True), self.bias)


def test_layer_not_linear_in_its_weight_is_refused_before_writing() -> None:
    torch.manual_seed(0)
    shape = (3, 8, 8)
    conv = StdConv2d(3, 4, 3, padding=1)
    truth = _truth(conv, shape)
    assert spectrum(conv, shape).sigma == pytest.approx(truth, rel=1e-4)  # linear in x: spectrum is fine
    snap = _snapshot(conv)
    with pytest.raises(NotLinearInWeightError, match=r"StdConv2d.*not linear in its weight.*track"):
        clip_spectral_norm_(conv, 0.1 * truth, shape)
    assert _unchanged(conv, snap)
    check_clippable(conv)  # without an input shape the probe cannot run
    with pytest.raises(NotLinearInWeightError, match="StdConv2d"):
        check_clippable(conv, shape)
    assert _unchanged(conv, snap)
    lin = StdLinear(5, 4)
    with pytest.raises(NotLinearInWeightError, match="StdLinear"):
        clip_spectral_norm_(lin, 0.01)
    assert issubclass(NotLinearInWeightError, ValueError)


def test_a_subclass_that_is_linear_in_its_weight_is_clipped() -> None:
    torch.manual_seed(0)
    shape = (3, 8, 8)
    conv = _OwnConv(3, 4, 3, padding=1)
    check_clippable(conv, shape)
    result = clip_spectral_norm_(conv, 0.3, shape)
    truth = _truth(conv, shape)
    assert truth <= 0.3 * (1 + TOL) and result.after == pytest.approx(truth, rel=1e-3) and result.changed
