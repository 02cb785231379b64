"""Which op gets which rule: the activations' largest slopes, the functional forms of modules with the arguments
their rules read, and the sets of linear, isometric, summing, scaling, concatenating and splitting ops."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

__all__ = ["ACTIVATION_CONSTANTS"]


def _slope(attribute: str) -> Callable[[Any], float]:
    return lambda m: max(1.0, abs(float(getattr(m, attribute))))


#: element-wise activations → their largest slope ``sup |f′|`` (the ℓ2 Lipschitz constant of the map), rounded up;
#: a rule reads the module's attributes (for a functional call, its arguments of the same names)
ACTIVATION_CONSTANTS: dict[type[nn.Module], float | Callable[[Any], float]] = {
    nn.ReLU: 1.0,
    nn.ReLU6: 1.0,
    nn.LeakyReLU: _slope("negative_slope"),
    nn.ELU: _slope("alpha"),
    nn.CELU: lambda m: 1.0 if float(m.alpha) > 0 else math.inf,  # slope exp(x/α) below 0: unbounded for α < 0
    nn.SELU: 1.7581,
    nn.GELU: 1.1290,  # exact GELU 1.12890, tanh approximation 1.12899
    nn.SiLU: 1.0999,
    nn.Mish: 1.0885,
    nn.Hardswish: 1.5,
    nn.Hardsigmoid: 1 / 6,
    nn.Hardtanh: 1.0,
    nn.Tanh: 1.0,
    nn.Sigmoid: 0.25,
    nn.Softplus: 1.0,
    nn.LogSigmoid: 1.0,
    nn.Softsign: 1.0,
    nn.Tanhshrink: 1.0,
    nn.PReLU: lambda m: max(1.0, float(m.weight.detach().abs().max())),
}
#: the activations above map each element alone (a diagonal Jacobian), which the BatchNorm-after-activation rule
#: needs; fixed here, so that a map added to ACTIVATION_CONSTANTS later (softmax is 1-Lipschitz, not element-wise)
#: is bounded by its constant but never composed through
_ELEMENTWISE = tuple(ACTIVATION_CONSTANTS)
_MAX_POOLS = (_MaxPoolNd, _AdaptiveMaxPoolNd)
_POOL_DIMS: dict[type[nn.Module], int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_POOL_DIMS |= {nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}
#: a function's (or a tensor method's) arguments after the input, in order, up to the last one a rule reads, named
#: as the attributes of the module that does the same, with their defaults
_MAX_POOL_ARGS = {"kernel_size": None, "stride": None, "padding": 0, "dilation": 1}
_ADAPTIVE_ARGS = {"output_size": None}
_DROPOUT_ARGS = {"p": 0.5, "training": True}
_PAD_ARGS = {"pad": None, "mode": "constant"}
_BATCHNORM_ARGS = {"running_mean": None, "running_var": None, "weight": None, "bias": None, "training": False}
#: functional forms of the pooling and activation modules → (that module type, its arguments): one rule bounds both
_FUNCTIONAL_FORMS: dict[Any, tuple[type[nn.Module], dict[str, Any]]] = {
    **{f: (nn.MaxPool1d, _MAX_POOL_ARGS) for f in (F.max_pool1d, F.max_pool1d_with_indices, torch.max_pool1d)},
    **{f: (nn.MaxPool2d, _MAX_POOL_ARGS) for f in (F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d)},
    **{f: (nn.MaxPool3d, _MAX_POOL_ARGS) for f in (F.max_pool3d, F.max_pool3d_with_indices, torch.max_pool3d)},
    **{f: (nn.AdaptiveMaxPool1d, _ADAPTIVE_ARGS) for f in (F.adaptive_max_pool1d, F.adaptive_max_pool1d_with_indices)},
    **{f: (nn.AdaptiveMaxPool2d, _ADAPTIVE_ARGS) for f in (F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices)},
    **{f: (nn.AdaptiveMaxPool3d, _ADAPTIVE_ARGS) for f in (F.adaptive_max_pool3d, F.adaptive_max_pool3d_with_indices)},
    **{f: (nn.ReLU, {}) for f in (F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_")},
    **{f: (nn.LeakyReLU, {"negative_slope": 0.01}) for f in (F.leaky_relu, F.leaky_relu_)},
    **{f: (nn.ELU, {"alpha": 1.0}) for f in (F.elu, F.elu_)},
    **{f: (nn.Hardtanh, {}) for f in (F.hardtanh, F.hardtanh_, torch.clamp, torch.clip, "clamp", "clip", "clamp_")},
    **{f: (nn.Tanh, {}) for f in (torch.tanh, F.tanh, "tanh", "tanh_")},
    **{f: (nn.Sigmoid, {}) for f in (torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_")},
    **{f: (nn.PReLU, {"weight": None}) for f in (F.prelu, torch.prelu)},
    **{f: (nn.SELU, {}) for f in (F.selu, torch.selu)},
    F.relu6: (nn.ReLU6, {}),
    F.celu: (nn.CELU, {"alpha": 1.0}),
    F.gelu: (nn.GELU, {}),
    F.silu: (nn.SiLU, {}),
    F.mish: (nn.Mish, {}),
    F.hardswish: (nn.Hardswish, {}),
    F.hardsigmoid: (nn.Hardsigmoid, {}),
    F.softplus: (nn.Softplus, {}),
    F.logsigmoid: (nn.LogSigmoid, {}),
    F.softsign: (nn.Softsign, {}),
    F.tanhshrink: (nn.Tanhshrink, {}),
}
#: dropout functions → their ``training`` default: the identity when it is off, like the modules in eval mode
_DROPOUTS = {F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True}
_DROPOUTS |= {F.alpha_dropout: False, F.feature_alpha_dropout: False}
#: modules and ops that only move, select or drop values (or are the identity in eval mode): constant 1
_ISOMETRIC_MODULES = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)
_ISOMETRIC_FUNCTIONS = {torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.reshape}
_ISOMETRIC_FUNCTIONS |= {torch.movedim, torch.clone, operator.neg, torch.neg}
_ISOMETRIC_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "movedim", "contiguous"}
_ISOMETRIC_METHODS |= {"squeeze", "unsqueeze", "clone", "float", "double", "to", "type_as", "neg", "detach"}
#: module types measured as the linear maps they are
_LINEAR_MODULES = (
    nn.Linear,
    _ConvNd,
    _AvgPoolNd,
    _AdaptiveAvgPoolNd,
    nn.Upsample,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
)
#: functions (first argument the input, the others constant) and methods measured as the linear maps they are
_LINEAR_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d}
_LINEAR_FUNCTIONS |= {F.conv_transpose3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d}
_LINEAR_FUNCTIONS |= {F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.avg_pool1d, torch.adaptive_avg_pool1d}
_LINEAR_FUNCTIONS |= {F.interpolate, F.pad, F.batch_norm, torch.mean, torch.sum}
_LINEAR_METHODS = {"mean", "sum"}
_SUMS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, "add", "sub", "add_", "sub_"}
_PRODUCTS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_QUOTIENTS = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_CONCATS = {torch.cat, torch.concat, torch.stack}
_SPLITS = {torch.split, torch.chunk, torch.unbind, torch.tensor_split, "split", "chunk", "unbind", "tensor_split"}
