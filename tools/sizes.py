"""Room sizes: the modules of a package over a line limit, and the functions over a code-line limit.

``python tools/sizes.py [PACKAGE_DIR] [--module-lines N] [--function-lines N]`` prints every module with more
lines than ``--module-lines`` (450) and every function or method with more lines of code than
``--function-lines`` (60), then the totals. A function's lines of code are the lines its body spans, less its
docstring, blank lines and comment-only lines (nested functions count toward the function that holds them, and
on their own). Exits 1 when anything is over a limit and not named in ``docs/architecture.md``'s list of numerical
kernels (a line ``- `module.function` ...`` under the heading "Numerical kernels").
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_lines(source_lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of code of a function: its span less docstring, blank and comment-only lines."""
    first, last = node.lineno, node.end_lineno or node.lineno
    skip: set[int] = set()
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        if isinstance(body[0].value.value, str):
            skip.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    count = 0
    for number in range(first, last + 1):
        text = source_lines[number - 1].strip()
        if number in skip or not text or text.startswith("#"):
            continue
        count += 1
    return count


def functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method with its qualified name."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(tree, "")


def kernels(architecture: Path) -> set[str]:
    """The ``module.function`` names listed under the "Numerical kernels" heading of docs/architecture.md."""
    if not architecture.exists():
        return set()
    text = architecture.read_text()
    match = re.search(r"^#+ Numerical kernels\n(.*?)(?=^#|\Z)", text, flags=re.S | re.M)
    return set(re.findall(r"^- `([\w.]+)`", match.group(1), flags=re.M)) if match else set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default=str(ROOT / "lightning_specclip"))
    parser.add_argument("--module-lines", type=int, default=450)
    parser.add_argument("--function-lines", type=int, default=60)
    args = parser.parse_args(argv)
    package = Path(args.package)
    allowed = kernels(ROOT / "docs" / "architecture.md")
    over = 0
    modules = sorted(package.rglob("*.py"))
    for path in modules:
        text = path.read_text()
        lines = text.splitlines()
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        if len(lines) > args.module_lines:
            print(f"module   {len(lines):5d}  {name}")
            over += 1
        for qualified, node in functions(ast.parse(text)):
            n = code_lines(lines, node)
            if n > args.function_lines:
                listed = f"{name.split('.')[-1]}.{qualified}" in allowed
                print(f"function {n:5d}  {name}.{qualified}{'  (numerical kernel, listed)' if listed else ''}")
                over += 0 if listed else 1
    print(
        f"{len(modules)} modules; {over} over the limits ({args.module_lines} lines a module, "
        f"{args.function_lines} lines of code a function) and not listed as numerical kernels"
    )
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
