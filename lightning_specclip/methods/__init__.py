"""Clipping methods: one strategy object per method, one interface (:class:`ClipMethod`)."""

from lightning_specclip.methods.base import ClipMethod, NoClip
from lightning_specclip.methods.fastclip import FastClip

#: method name → class, for ``SpectralClipCallback(method="...")``.
METHODS: dict[str, type[ClipMethod]] = {cls.name: cls for cls in (FastClip, NoClip)}

__all__ = ["METHODS", "ClipMethod", "FastClip", "NoClip"]
