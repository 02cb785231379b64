"""docs/architecture.md is the map of the code: every module it names exists, and every module is named in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lightning_specclip"
MAP = (ROOT / "docs" / "architecture.md").read_text()


def modules() -> list[Path]:
    return sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_every_module_of_the_package_is_on_the_map():
    def named(path: Path) -> bool:
        spellings = {str(path), "/".join(path.parts[-2:]), path.name}
        return any(f"`{s}`" in MAP for s in spellings)

    missing = [str(p) for p in modules() if not named(p)]
    assert not missing, f"modules not in docs/architecture.md: {missing}"


def test_every_module_on_the_map_exists():
    files = {str(p) for p in modules()} | {p.name for p in modules()} | {"/".join(p.parts[-2:]) for p in modules()}
    named = set(re.findall(r"`([\w/]+\.py)`", MAP))
    gone = sorted(n for n in named if n not in files and not (ROOT / n).exists())
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"
