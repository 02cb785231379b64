"""Load a script of ``experiments/`` as a module, for the tests that call its ``main`` or its helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_script(filename: str, name: str | None = None) -> ModuleType:
    """Import ``experiments/<filename>`` as the module ``name`` (default: the file's stem), registered in
    ``sys.modules`` so that what it defines (dataclasses, pickled objects) resolves by that name."""
    spec = importlib.util.spec_from_file_location(name or Path(filename).stem, EXPERIMENTS / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
