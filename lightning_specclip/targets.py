"""Former home of the selection, the recorder and the tracked map; every name it had is still importable from here.

The selection is in :mod:`lightning_specclip.selection`, the input-shape recorder in
:mod:`lightning_specclip.recorder`, :class:`TrackedMap` and :func:`called_view` in
:mod:`lightning_specclip.tracked_map`.
"""

from lightning_specclip.recorder import InputShapeRecorder
from lightning_specclip.selection import (
    DEFAULT_TYPES,
    LAYER_TYPES,
    PROJECTIONS,
    Selector,
    attention_projection,
    clean_name,
    conv_bn_nodes,
    find_conv_bn_pairs,
    named_modules,
    select_modules,
)
from lightning_specclip.tracked_map import Call, TrackedMap, called_view

__all__ = [
    "DEFAULT_TYPES",
    "LAYER_TYPES",
    "PROJECTIONS",
    "Call",
    "InputShapeRecorder",
    "Selector",
    "TrackedMap",
    "attention_projection",
    "called_view",
    "clean_name",
    "conv_bn_nodes",
    "find_conv_bn_pairs",
    "named_modules",
    "select_modules",
]
