"""A network's Lipschitz bound composed from the exact norms of its layers, and the accuracy it certifies.

:func:`lipschitz_bound` traces a model with ``torch.fx`` and walks its graph once, giving every node a bound on
the ℓ2 Lipschitz constant of *model input → node output* (in eval semantics: BatchNorm with its running
statistics, dropout off):

* a linear map (``Linear``, ``Conv*d``, ``ConvTranspose*d``, average pooling, interpolation, reflect/replicate/
  circular padding, a mean, a BatchNorm called as ``F.batch_norm``, a functional conv or linear with constant
  weights, and a conv whose output feeds only a BatchNorm composed with it as one map): its input's bound times its
  *exact* spectral norm at the input shape it runs at in the traced forward;
* an element-wise activation: times its largest slope (ReLU 1, GELU 1.1290, SiLU 1.0999, Sigmoid 1/4 …);
* a linear map, an element-wise activation and a BatchNorm in a row (below): times the activation's largest slope
  and the exact spectral norm of the composed linear map ``BatchNorm∘linear``;
* a sum ``a + b`` (a residual connection): the sum of the branches' bounds; a concatenation: ``√Σ Lᵢ²``;
* a product or quotient by a constant (a per-channel scale, the input normalization): times its largest
  ``|c|`` (``1/min |c|`` for a divisor); max pooling: ``√(windows that share an input)``;
* reshapes, permutations, slicing, constant (zero) padding, identity, dropout: 1; values that do not depend on
  the input: 0. An operand that broadcasting repeats ``r`` times counts ``√r`` times its bound.

Functional forms go through the rule of their module: ``F.max_pool*d`` (with or without ``return_indices``),
``F.adaptive_max_pool*d``, ``F.avg_pool*d``, ``F.adaptive_avg_pool*d``, ``F.interpolate`` (``F.upsample``),
``F.pad`` (constant mode: 1; the other modes measured), ``F.relu``, ``F.leaky_relu``, ``F.elu`` and the other
activations (with their arguments: ``F.elu(x, alpha=2.0)`` has slope 2), ``torch.clamp``, ``torch.flatten`` and the
tensor methods ``flatten``/``view``/``reshape``, ``F.dropout`` with ``training=False``. Arguments the rules cannot
read (a tensor as a kernel size) and dropout that runs at inference are refused with the node named.

**A BatchNorm after an activation.** When a linear module (or a conv∘BatchNorm composition) feeds only an
element-wise activation ``σ`` and that activation feeds only a BatchNorm in eval mode, the three are bounded by
``c·σ₁(D·W)``, where ``W`` is the linear map, ``D`` the BatchNorm's per-channel scale ``γ/√(var+ε)`` and ``c`` the
activation's largest slope — instead of ``σ₁(W)·c·max|D|``. It is sound: for two inputs the activation's outputs
differ by ``Λ·W·δ``, ``Λ`` diagonal with the difference quotients ``(σ(uᵢ) − σ(u′ᵢ))/(uᵢ − u′ᵢ)``, each in
``[−c, c]``; ``D`` is diagonal in the same coordinates (every element of a channel scaled alike), and diagonal
matrices commute, so the BatchNorm's outputs differ by ``D·Λ·W·δ = Λ·D·W·δ``, of norm at most
``c·σ₁(D·W)·‖δ‖``. The sign of ``γ`` and of the slopes does not matter (GELU's negative slopes, LeakyReLU's
slope above 1 keep their ``c``); what matters is that the activation maps each element alone, so it applies to the
built-in activations above (``ReLU``, ``ReLU6``, ``LeakyReLU``, ``PReLU``, ``ELU``, ``GELU``, ``SiLU``, ``Tanh``,
``Sigmoid`` …, modules or functions, and ``torch.clamp``), not to a map added to :data:`ACTIVATION_CONSTANTS`
nor to a user constant, and not when a reshape, a pooling or a broadcast sits in between. As
``σ₁(D·W) ≤ max|D|·σ₁(W)``, it is never looser than the separate factors. The composition is listed in
:attr:`LipschitzBound.compositions` as ``"linear+activation+batchnorm"`` (module names; a function by its node's
name), next to the ``"conv+bn"`` compositions.

**Layers as they are called.** A layer is measured as its call runs it: a ``ConvTranspose*d`` called with
``output_size=`` (``self.up(h, output_size=skip.size())``) as the map with the ``output_padding`` its forward
computes; a linear layer called with other arguments besides its input is refused with the node named. A write
in place that another reference could read (``out = self.conv(x); out.mul_(100); return out``) is invisible to
the graph and is refused: every in-place tensor method (``mul_``, ``add_``, ``relu_`` …), and an ``inplace=True``
function or module (or ``F.relu_``, ``a += b``) unless its result replaces its input (a value no other node reads
and no view), as ``nn.ReLU(inplace=True)`` after a BatchNorm does.

Anything else — a product of two input-dependent values (squeeze-and-excitation), attention, LayerNorm, a
comparison — is refused with the node and its op named; ``constants=`` supplies a module type's (or a module
name glob's) constant. The bound is layer-wise: exact per layer, but the product over a deep residual network
is usually far above the network's true Lipschitz constant. ``lower`` is an empirical lower bound: the largest
difference quotient found at probe inputs along the top singular direction of the model's Jacobian.

:class:`CertifiedAccuracy` turns the bound into certificates: a sample whose logit margin exceeds ``√2·L·ε`` is
classified the same way for every perturbation of ℓ2 norm ``ε`` or less.

The package, one job a module: :mod:`.bound` (:func:`lipschitz_bound`, the composition of the node bounds),
:mod:`.graph` (tracing, the one recorded run, naming nodes), :mod:`.rules` (each node's rule), :mod:`.tables`
(which op gets which rule, the activations' slopes), :mod:`.lower` (the empirical lower bound), :mod:`.certified`
(:func:`certified`, :class:`CertifiedAccuracy`).
"""

from lightning_specclip.lipschitz.bound import LipschitzBound, NodeBound, lipschitz_bound
from lightning_specclip.lipschitz.certified import CertifiedAccuracy, certified
from lightning_specclip.lipschitz.graph import UnsupportedNodeError
from lightning_specclip.lipschitz.tables import ACTIVATION_CONSTANTS

__all__ = [
    "ACTIVATION_CONSTANTS",
    "CertifiedAccuracy",
    "LipschitzBound",
    "NodeBound",
    "UnsupportedNodeError",
    "certified",
    "lipschitz_bound",
]
