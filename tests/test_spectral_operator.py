"""``ImplicitLinear``: the linear part of an affine layer, its adjoint and Gram products, and its contract."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from helpers import random_batchnorm
from torch import Tensor, nn

from lightning_specclip import ImplicitLinear
from lightning_specclip.spectral import eval_mode
from lightning_specclip.spectral.closed_form import linear_adjoint, linear_part
from lightning_specclip.spectral.exact import dense_matrix


def _bn(bn: nn.Module) -> nn.Module:
    return random_batchnorm(bn, batches_tracked=3)


KINDS: dict[str, tuple[Callable[[], nn.Module | Callable[[Tensor], Tensor]], tuple[int, ...]]] = {
    "linear": (lambda: nn.Linear(7, 5), (7,)),
    "conv1d_circular": (lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), (3, 10)),
    "conv2d_reflect_stride2": (lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2, padding_mode="reflect"), (3, 7, 7)),
    "conv2d_replicate_dilation2": (
        lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="replicate"),
        (3, 6, 6),
    ),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 5)),
    "conv3d_zeros": (lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 3, 4, 4)),
    "convT2d_stride2": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (3, 4, 4)),
    "bn1d": (lambda: _bn(nn.BatchNorm1d(6)), (6,)),
    "bn2d": (lambda: _bn(nn.BatchNorm2d(3)), (3, 4, 4)),
    "conv_bn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _bn(nn.BatchNorm2d(4))), (3, 5, 5)),
    "conv2d_stride2_odd": (lambda: nn.Conv2d(3, 4, 4, padding=1, stride=2), (3, 7, 6)),
    "conv1d_dilation_valid": (lambda: nn.Conv1d(2, 3, 3, dilation=2, padding="valid"), (2, 11)),
    "conv2d_same": (lambda: nn.Conv2d(2, 3, 3, padding="same"), (2, 5, 5)),
    "convT1d_dilation_wide_output_padding": (
        lambda: nn.ConvTranspose1d(2, 3, 3, stride=1, dilation=2, output_padding=1),
        (2, 6),
    ),
    "linear_on_sequences": (lambda: nn.Linear(4, 3), (5, 4)),
    "conv_chain": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Identity(), nn.ConvTranspose2d(3, 2, 2, stride=2)
        ),
        (2, 6, 6),
    ),
    "conv_linear_chain": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.Linear(4, 2)), (2, 6)),
    "function": (lambda: lambda x: 3 * x.flip(-1) + 1, (4, 5)),
}


def _build(name: str) -> tuple[nn.Module | Callable[[Tensor], Tensor], tuple[int, ...]]:
    factory, shape = KINDS[name]
    torch.manual_seed(0)
    return factory(), shape


def _eval_copy(op: nn.Module | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The affine map the operator must represent: the module in eval mode (BN with running statistics)."""
    if not isinstance(op, nn.Module):
        return op
    return copy.deepcopy(op).eval()


@pytest.mark.parametrize("name", list(KINDS))
def test_matvec_is_op_minus_op_of_zero(name: str) -> None:
    op, shape = _build(name)
    A = ImplicitLinear(op, shape)
    reference = _eval_copy(op)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        expected = reference(x) - reference(torch.zeros(1, *shape))
    torch.testing.assert_close(A.matvec(x), expected, rtol=1e-5, atol=1e-5)
    assert A.output_shape == tuple(expected.shape[1:])
    assert A.in_features == x[0].numel() and A.out_features == expected[0].numel()


@pytest.mark.parametrize("name", list(KINDS))
def test_rmatvec_is_the_adjoint_and_gram_is_their_product(name: str) -> None:
    op, shape = _build(name)
    A = ImplicitLinear(op, shape, dtype=torch.float64)
    matrix = dense_matrix(A)
    x = torch.randn(4, *shape, dtype=torch.float64)
    y = torch.randn(4, *A.output_shape, dtype=torch.float64)
    ax, aty = A.matvec(x), A.rmatvec(y)
    # ⟨A x, y⟩ = ⟨x, Aᵀ y⟩, and both agree with the dense matrix
    torch.testing.assert_close((ax * y).flatten(1).sum(1), (x * aty).flatten(1).sum(1))
    torch.testing.assert_close(aty.flatten(1), y.flatten(1) @ matrix)
    g, ax2 = A.gram(x)
    torch.testing.assert_close(ax2, ax)
    torch.testing.assert_close(g.flatten(1), x.flatten(1) @ (matrix.T @ matrix))
    assert not g.requires_grad and not ax2.requires_grad and not aty.requires_grad


def test_batchnorm_uses_running_statistics_in_train_mode_and_keeps_it() -> None:
    torch.manual_seed(0)
    bn = _bn(nn.BatchNorm2d(3))
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    A = ImplicitLinear(bn, (3, 4, 4))
    x = torch.randn(5, 3, 4, 4)
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(1, 3, 1, 1)
    torch.testing.assert_close(A.matvec(x), x * scale)
    A.rmatvec(x)
    A.gram(x)
    assert bn.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])


def test_dropout_is_the_identity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.9)).train()
    A = ImplicitLinear(model, (6,))
    torch.testing.assert_close(A.matvec(torch.eye(6)), model[0].weight.detach().T)
    assert model.training and model[1].training


def test_no_side_effects_on_parameters_buffers_grads_and_modes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _bn(nn.BatchNorm2d(4)), nn.Conv2d(4, 2, 1))
    model.train()
    model[2].eval()
    flags = [m.training for m in model.modules()]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    A = ImplicitLinear(model, (3, 5, 5))
    x = torch.randn(2, 3, 5, 5)
    A.matvec(x)
    A.rmatvec(torch.randn(2, *A.output_shape))
    A.gram(x)
    with torch.no_grad():
        A.gram(x)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_compute_dtype() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    assert ImplicitLinear(conv, (2, 4, 4)).dtype == torch.float32
    assert ImplicitLinear(copy.deepcopy(conv).double(), (2, 4, 4)).dtype == torch.float64
    low = copy.deepcopy(conv).to(torch.bfloat16)
    A = ImplicitLinear(low, (2, 4, 4))
    assert A.dtype == torch.float32
    out = A.matvec(torch.randn(2, 2, 4, 4, dtype=torch.float64))  # inputs are cast to the compute dtype
    assert out.dtype == torch.float32
    rounded = copy.deepcopy(low).float()
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(A.matvec(x), rounded(x) - rounded(torch.zeros(1, 2, 4, 4)))
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    assert ImplicitLinear(conv, (2, 4, 4), dtype=torch.float64).matvec(x).dtype == torch.float64
    with pytest.raises(ValueError, match="floating point"):
        ImplicitLinear(conv, (2, 4, 4), dtype=torch.int32)


def test_overrides_replace_named_tensors() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    other = torch.randn(2, 3)
    A = ImplicitLinear(lin, (3,), overrides={"weight": other})
    torch.testing.assert_close(A.matvec(torch.eye(3)), other.T)
    with pytest.raises(ValueError, match="not a parameter or buffer"):
        ImplicitLinear(lin, (3,), overrides={"kernel": other})
    with pytest.raises(ValueError, match="nn.Module"):
        ImplicitLinear(lambda x: x, (3,), overrides={"weight": other})


def test_eval_mode_restores_flags_even_on_error() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(nn.Dropout(), nn.BatchNorm1d(3)))
    model.train()
    model[1][0].eval()
    flags = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == flags


# bad inputs


def test_refuses_non_affine_ops_naming_the_probe() -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"probe op\(x\+y\)"):
        ImplicitLinear(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (4,))
    with pytest.raises(ValueError, match="probe"):
        ImplicitLinear(lambda x: x.abs() + 1, (4,))
    # batch statistics mix the batch: refused as well
    with pytest.raises(ValueError, match="not affine"):
        ImplicitLinear(nn.BatchNorm1d(4, track_running_stats=False), (4, 6))
    # the check can be skipped
    A = ImplicitLinear(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (4,), check_affine=False)
    with pytest.raises(ValueError, match="not affine"):
        A.check_affine()


def test_refuses_bad_shapes_and_ops() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"input_shape=\(2, 8, 8\)"):
        ImplicitLinear(conv, (2, 8, 8))
    with pytest.raises(ValueError, match="non-empty"):
        ImplicitLinear(conv, ())
    with pytest.raises(ValueError, match="positive"):
        ImplicitLinear(conv, (3, 0, 8))
    with pytest.raises(TypeError, match="callable"):
        ImplicitLinear(42, (3,))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="return a tensor"):
        ImplicitLinear(lambda x: (x, x), (3,))
    with pytest.raises(TypeError, match="floating point"):
        ImplicitLinear(lambda x: x.long(), (3,))
    with pytest.raises(ValueError, match="batch"):
        ImplicitLinear(lambda x: x.sum(0), (3,))
    with pytest.raises(ValueError, match="non-finite"):
        ImplicitLinear(lambda x: x / 0.0, (3,))


def test_repr_names_the_op_and_shapes() -> None:
    A = ImplicitLinear(nn.Conv2d(2, 3, 3), (2, 6, 6))
    assert repr(A) == "ImplicitLinear(Conv2d, input_shape=(2, 6, 6), output_shape=(3, 4, 4))"


CLOSED_FORM = [name for name in KINDS if name != "function"]
# the padding modes and forms whose adjoint is left to autograd
AUTOGRAD_ADJOINT = {
    "conv1d_circular",
    "conv2d_reflect_stride2",
    "conv2d_replicate_dilation2",
    "conv2d_same",
    "convT1d_dilation_wide_output_padding",
}


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_closed_form_adjoints_agree_with_autograd(name: str) -> None:
    op, shape = _build(name)
    part, adjoint = linear_part(op), linear_adjoint(op)
    assert part is not None
    assert (adjoint is None) == (name in AUTOGRAD_ADJOINT)
    if adjoint is None:
        return
    tensors = {n: t.detach().double() for n, t in (*op.named_parameters(), *op.named_buffers())}
    x = torch.randn(3, *shape, dtype=torch.float64, requires_grad=True)
    y = part(x, tensors)
    w = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, grad_outputs=w)
    torch.testing.assert_close(adjoint(w, tensors, shape), expected)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_standard_layers_take_the_closed_form_and_agree_with_running_the_module(name: str) -> None:
    op, shape = _build(name)
    part = linear_part(op)
    assert part is not None
    x = torch.randn(3, *shape)
    tensors = {n: t.detach() for n, t in (*op.named_parameters(), *op.named_buffers())}
    reference = _eval_copy(op)
    with torch.no_grad():
        expected = reference(x) - reference(torch.zeros(1, *shape))
        assert torch.allclose(part(x, tensors), expected, atol=1e-5)


def test_closed_form_uses_the_tensors_it_is_given() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")
    part = linear_part(conv)
    assert part is not None
    x = torch.randn(2, 2, 5, 5)
    doubled = {"weight": 2 * conv.weight.detach()}
    with torch.no_grad():
        assert torch.allclose(part(x, doubled), 2 * part(x, {"weight": conv.weight}), atol=1e-5)


class _ScaledConv(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "build",
    [
        lambda: _ScaledConv(2, 3, 3, padding=1),  # a subclass may change forward
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()),  # not every child is known
        lambda: nn.BatchNorm2d(2, track_running_stats=False),  # batch statistics: no affine map
    ],
    ids=["subclass", "unknown_child", "bn_without_running_stats"],
)
def test_other_modules_are_run_as_themselves(build: Callable[[], nn.Module]) -> None:
    assert linear_part(build()) is None


def test_a_forward_hook_is_honoured() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    conv.register_forward_hook(lambda _m, _args, out: 3 * out)
    assert linear_part(conv) is None
    A = ImplicitLinear(conv, (2, 5, 5))
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        expected = conv(x) - conv(torch.zeros(1, 2, 5, 5))  # the hook triples the module's output
        unhooked = conv._conv_forward(x, conv.weight, None)
    assert torch.allclose(A.matvec(x), expected, atol=1e-5)
    assert torch.allclose(expected, 3 * unhooked, atol=1e-5)


def test_closed_form_refuses_a_wrong_input_shape_with_a_clear_error() -> None:
    A = ImplicitLinear(_bn(nn.BatchNorm2d(3)), (3, 4, 4))
    with pytest.raises(ValueError, match=r"input_shape"):
        A.matvec(torch.randn(2, 3, 4))


def test_a_live_operator_sees_in_place_updates_and_knows_when_it_goes_stale() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    A = ImplicitLinear(conv, (2, 5, 5))
    x = torch.randn(1, 2, 5, 5)
    assert A.live
    with torch.no_grad():
        conv.weight.mul_(2.0)  # what an optimizer step or a clip does
        expected = conv._conv_forward(x, conv.weight, None)
    assert A.live
    assert torch.allclose(A.matvec(x), expected, atol=1e-5)
    conv.weight = nn.Parameter(conv.weight.detach().clone())  # a new tensor: the operator holds the old one
    assert not A.live
    assert not ImplicitLinear(nn.Linear(3, 2).double(), (3,), dtype=torch.float32).live  # a converted copy
    assert not ImplicitLinear(lambda t: 2 * t, (3,)).live


def test_products_refuse_batches_of_the_wrong_shape() -> None:
    A = ImplicitLinear(nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5))
    with pytest.raises(ValueError, match=r"AᵀA got a batch of shape \(1, 2, 6, 6\)"):
        A.gram(torch.randn(1, 2, 6, 6))  # a convolution would run on it, for another operator
    with pytest.raises(ValueError, match=r"Aᵀ takes outputs of shape \(batch, 3, 5, 5\)"):
        A.rmatvec(torch.randn(1, 3, 4, 4))
