"""Clipping methods: one strategy object per method, one interface (:class:`ClipMethod`).

=============== ================================================================================
name            what it does, and for which layers it is exact
=============== ================================================================================
``fastclip``    the paper's method: exact for every implicitly linear layer (any padding, stride,
                dilation, groups, transposed convs, conv∘BatchNorm)
``gouk``        power iteration through conv/conv-transpose, then divide: exact estimate for zero
                padding only
``miyato``      reshaped-kernel power iteration, then divide: exact for Linear only
``senderovich`` FFT clip per frequency, project back to the kernel: circular padding only, and even
                there the projection misses the target
``gram``        Gram-iteration bound as a regularizer (never clips): certified bound for circular
                and zero padding
``none``        track only
=============== ================================================================================
"""

from lightning_specclip.methods.base import ClipMethod, NoClip
from lightning_specclip.methods.fastclip import FastClip
from lightning_specclip.methods.gouk import Gouk
from lightning_specclip.methods.gram import GramRegularizer
from lightning_specclip.methods.miyato import Miyato
from lightning_specclip.methods.senderovich import Senderovich

#: method name → class, for ``SpectralClipCallback(method="...")``.
METHODS: dict[str, type[ClipMethod]] = {
    cls.name: cls for cls in (FastClip, Gouk, Miyato, Senderovich, GramRegularizer, NoClip)
}

__all__ = ["METHODS", "ClipMethod", "FastClip", "Gouk", "GramRegularizer", "Miyato", "NoClip", "Senderovich"]
