"""The ``specclip`` command: ``specclip inspect SOURCE`` prints a model's spectral norms and Lipschitz bound.

::

    specclip inspect logs/train/runs/2024-05-01_12-00-00            # a run of experiments/train.py
    specclip inspect logs/train/runs/.../checkpoints/last.ckpt      # one checkpoint of a run
    specclip inspect torchvision:resnet18 --input-shape 3,224,224   # random weights
    specclip inspect mypackage.models:build --input-shape 3,32,32 --json

Every number is measured on the model in eval mode (BatchNorm with its running statistics) at the given per-sample
input shape: the exact σ of each ``Linear``/``Conv*d``/``ConvTranspose*d`` and conv∘BatchNorm composition, each
BatchNorm's largest gain ``|γ|/√(running_var+ε)``, and the network's l2 Lipschitz bound from
:func:`lightning_specclip.lipschitz.lipschitz_bound` (certified upper, empirical lower).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_specclip.tracking import batchnorm_gains, composition_norms, input_shapes, spectral_norms

__all__ = ["SourceError", "format_report", "inspect_model", "load_model", "main", "parse_input_shape", "progress_bar"]

#: The forms SOURCE may take, as error messages list them.
SOURCE_FORMS = (
    "a run directory of experiments/train.py, a .ckpt file inside one, "
    "torchvision:NAME, or package.module:function (a factory that returns an nn.Module)"
)
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NET_PREFIX = "net."  # ImageClassifier holds the network as ``self.net``

Progress = Callable[[int, int, str], None]


class SourceError(ValueError):
    """A SOURCE or input shape the command cannot use; :func:`main` prints its message on one line, exit code 2."""


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse a per-sample input shape written ``C,H,W`` (any number of positive integers; ``784`` for an MLP).

    Args:
        text: comma-separated positive integers.

    Returns:
        tuple[int, ...]: the shape.

    Raises:
        SourceError: if an entry is not a positive integer.

    Example:
        >>> parse_input_shape("3,32,32")
        (3, 32, 32)
        >>> parse_input_shape("3,x,32")
        Traceback (most recent call last):
        ...
        lightning_specclip.cli.SourceError: --input-shape '3,x,32' is malformed: use positive integers such as 3,32,32
    """
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SourceError(f"--input-shape {text!r} is malformed: use positive integers such as 3,32,32")
    return tuple(int(p) for p in parts)


def _require(module: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise SourceError(
            f"{purpose} needs {module.split('.')[0]} ({err}): pip install 'lightning_specclip[experiments]'"
        ) from None


def _find_config(path: Path) -> Path:
    """``.hydra/config.yaml`` of the run that holds ``path`` (a run directory or a file inside one)."""
    for folder in [path, *path.parents] if path.is_dir() else path.parents:
        config = folder / ".hydra" / "config.yaml"
        if config.is_file():
            return config
    where = "in it" if path.is_dir() else "in any directory above it"
    raise SourceError(
        f"{path} is not in a run directory of experiments/train.py: no .hydra/config.yaml {where} (SOURCE may be "
        f"{SOURCE_FORMS})"
    )


def _find_checkpoint(run: Path) -> Path:
    """``checkpoints/last.ckpt`` of a run directory, else its one ``*.ckpt`` file."""
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    found = sorted(run.rglob("*.ckpt"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise SourceError(f"run directory {run} holds no checkpoint (no checkpoints/last.ckpt, no *.ckpt file)")
    listed = ", ".join(str(p.relative_to(run)) for p in found)
    raise SourceError(f"run directory {run} holds no checkpoints/last.ckpt but {len(found)} others; pass one: {listed}")


def _load_run(path: Path) -> tuple[nn.Module, tuple[int, ...] | None]:
    """Rebuild a run's network from its Hydra config and load the weights of a checkpoint."""
    omegaconf = _require("omegaconf", "reading a run directory")
    utils = _require("hydra.utils", "reading a run directory")
    config = _find_config(path)
    checkpoint = path if path.is_file() else _find_checkpoint(path)
    cfg = omegaconf.OmegaConf.load(config)
    if omegaconf.OmegaConf.select(cfg, "model") is None:
        raise SourceError(f"{config} has no model node; it is not a config of experiments/train.py")
    model = utils.instantiate(cfg.model)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as err:  # noqa: BLE001 - any unreadable file is bad input, said in one line
        raise SourceError(f"cannot read checkpoint {checkpoint}: {type(err).__name__}: {err}") from None
    weights = {k[len(_NET_PREFIX) :]: v for k, v in state.items() if k.startswith(_NET_PREFIX)}
    if not weights:
        raise SourceError(f"checkpoint {checkpoint} holds no net.* weights (not an ImageClassifier checkpoint)")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise SourceError(
            f"checkpoint {checkpoint} does not fit the model of {config}: {' '.join(first[:3])}"
        ) from None
    shape = omegaconf.OmegaConf.select(cfg, "data.image_shape")
    return model, None if shape is None else tuple(int(s) for s in shape)


def _load_torchvision(name: str) -> nn.Module:
    models = _require("torchvision.models", f"torchvision:{name}")
    known = models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=4)
        hint = f"close matches: {', '.join(close)}" if close else "see torchvision.models.list_models()"
        raise SourceError(f"unknown torchvision model {name!r}; {hint}")
    return models.get_model(name, weights=None)


def _load_factory(source: str) -> nn.Module:
    module_name, attr = source.split(":", 1)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise SourceError(f"cannot import {module_name!r} for factory {source!r}: {err}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise SourceError(f"module {module_name!r} has no attribute {attr!r} (factory {source!r})")
        target = getattr(target, part)
    if not callable(target):
        raise SourceError(f"{source!r} is a {type(target).__name__}, not a function that returns an nn.Module")
    model = target()
    if not isinstance(model, nn.Module):
        raise SourceError(f"factory {source!r} returned an object of type {type(model).__name__}, not an nn.Module")
    return model


def load_model(source: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...] | None]:
    """Build the model a SOURCE names, in eval mode, and the input shape its configuration declares.

    ``torch.manual_seed(seed)`` is called first, so models with random weights are reproducible.

    Args:
        source: a run directory of ``experiments/train.py`` (its ``.hydra/config.yaml`` rebuilds the network and
            ``checkpoints/last.ckpt``, or its one ``*.ckpt``, gives the weights); a ``.ckpt`` file inside a run
            directory; ``torchvision:NAME`` (random weights); or ``package.module:function``, a factory called with
            no arguments.
        seed: the seed set before the model is built.

    Returns:
        tuple[nn.Module, tuple[int, ...] | None]: the model and, for a run, the ``data.image_shape`` of its config
        (``None`` for the other forms).

    Raises:
        SourceError: a missing path, an unknown form or torchvision name, a factory that cannot be imported or
            returns no module, a checkpoint that does not fit its config, hydra-core or torchvision missing.

    Example:
        >>> model, shape = load_model("torch.nn:Identity")
        >>> type(model).__name__, shape
        ('Identity', None)
    """
    torch.manual_seed(seed)
    shape: tuple[int, ...] | None = None
    path = Path(source)
    if source.startswith("torchvision:"):
        model = _load_torchvision(source.split(":", 1)[1])
    elif path.exists():
        if path.is_file() and path.suffix != ".ckpt":
            raise SourceError(f"{source} is a file but not a .ckpt checkpoint; SOURCE may be {SOURCE_FORMS}")
        model, shape = _load_run(path)
    elif _FACTORY.match(source):
        model = _load_factory(source)
    else:
        raise SourceError(
            f"SOURCE {source!r} is no existing file or directory, nor of a known form; SOURCE may be {SOURCE_FORMS}"
        )
    return model.eval(), shape


def inspect_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    samples: int = 8,
    compose_batchnorm: bool = True,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure a model: exact σ per layer and conv∘BatchNorm composition, BatchNorm gains, its Lipschitz bound.

    Everything is in eval semantics (BatchNorm with its running statistics). When the bound cannot be computed
    (the model holds an op :func:`~lightning_specclip.lipschitz.lipschitz_bound` cannot bound), ``"lipschitz"`` is
    ``None``, ``"lipschitz_error"`` says why, and the per-layer numbers come from
    :func:`lightning_specclip.tracking.spectral_norms`.

    Args:
        model: the model (not modified).
        input_shape: the per-sample input shape, e.g. ``(3, 32, 32)``.
        samples: probe inputs for the empirical lower bound.
        compose_batchnorm: bound each conv→BatchNorm pair as one map (tighter); the compositions are listed either
            way.
        seed: seed of the probes and of the random starts.
        progress: called as ``progress(done, total, what)`` as each linear map is measured.

    Returns:
        dict[str, Any]: ``{"layers": {name: σ}, "compositions": {"conv+bn": σ}, "batchnorms": {name: gain},
        "lipschitz": {"upper": float, "lower": float} | None}``, plus ``"lipschitz_error"`` when it is ``None``.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = model[1].weight.copy_(torch.tensor([[3.0, 0, 0, 0], [0, 1, 0, 0]]))
        >>> report = inspect_model(model, (4,))
        >>> round(report["layers"]["1"], 4), round(report["lipschitz"]["upper"], 3)
        (3.0, 3.0)
    """
    from lightning_specclip.lipschitz import UnsupportedNodeError, lipschitz_bound

    shape = tuple(int(s) for s in input_shape)
    try:
        result = lipschitz_bound(
            model, shape, samples=samples, compose_batchnorm=compose_batchnorm, seed=seed, progress=progress
        )
    except UnsupportedNodeError as err:
        norms = spectral_norms(model, torch.zeros(1, *shape))
        return {**norms, "lipschitz": None, "lipschitz_error": str(err)}
    if compose_batchnorm:
        compositions = dict(result.compositions)
    else:
        compositions = composition_norms(model, input_shapes(model, torch.zeros(1, *shape)))
    return {
        "layers": dict(result.layers),
        "compositions": compositions,
        "batchnorms": batchnorm_gains(model),
        "lipschitz": {"upper": float(result.upper), "lower": float(result.lower)},
    }


def _shape(shape: Sequence[int] | None) -> str:
    return "" if shape is None else "x".join(str(s) for s in shape)


def format_report(
    report: dict[str, Any], input_shape: Sequence[int], shapes: dict[str, tuple[int, ...]] | None = None
) -> str:
    """The report of :func:`inspect_model` as a readable table.

    Args:
        report: what :func:`inspect_model` returned.
        input_shape: the model's per-sample input shape.
        shapes: each layer's input shape (a column of the table when given).

    Returns:
        str: the table, one section per kind of map, then the Lipschitz bound (or why there is none) on one line.

    Example:
        >>> report = {"layers": {"fc": 3.0}, "compositions": {}, "batchnorms": {},
        ...           "lipschitz": {"upper": 3.0, "lower": 2.5}}
        >>> print(format_report(report, (4,)))
        layer  sigma
        fc     3
        <BLANKLINE>
        Lipschitz bound at input 4 (l2, eval mode): upper 3, lower 2.5
    """
    shapes = shapes or {}
    sections = []
    for title, value, key in (("layer", "sigma", "layers"), ("conv+bn", "sigma", "compositions")):
        if report[key]:
            with_shapes = key == "layers" and bool(shapes)
            header = [title, "input", value] if with_shapes else [title, value]
            rows = [
                [name, _shape(shapes.get(name)), f"{v:.6g}"] if with_shapes else [name, f"{v:.6g}"]
                for name, v in report[key].items()
            ]
            sections.append(_columns([header, *rows]))
    if report["batchnorms"]:
        rows = [[name, f"{v:.6g}"] for name, v in report["batchnorms"].items()]
        sections.append(_columns([["batchnorm", "max |γ|/√(var+ε)"], *rows]))
    where = f"at input {_shape(input_shape)} (l2, eval mode)"
    bound = report["lipschitz"]
    if bound is None:
        line = f"Lipschitz bound {where}: not computed: {report['lipschitz_error']}"
    else:
        line = f"Lipschitz bound {where}: upper {bound['upper']:.6g}, lower {bound['lower']:.6g}"
    sections.append(line)
    return "\n\n".join(sections)


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


@contextlib.contextmanager
def progress_bar() -> Iterator[Progress]:
    """A tqdm bar on stderr, shown only on a terminal and only once measuring has taken over a second.

    Yields:
        Progress: ``update(done, total, what)``, called as each map is measured (what :func:`inspect_model` takes
        as ``progress``); the bar is closed on exit.

    Example:
        >>> with progress_bar() as update:
        ...     update(1, 2, "fc")
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=0, desc="measuring", unit="map", file=sys.stderr, leave=False, delay=1.0, disable=None)

    def update(done: int, total: int, what: str) -> None:
        bar.total = total
        bar.set_postfix_str(what, refresh=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specclip", description="Measure spectral norms of implicitly linear layers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect",
        help="print a model's per-layer spectral norms and its Lipschitz bound",
        description=(
            "Print, for a model in eval mode at one input shape, the exact spectral norm of each Linear/Conv*/"
            "ConvTranspose* layer and of each conv+BatchNorm composition, each BatchNorm's largest gain "
            "|gamma|/sqrt(running_var+eps), and the network's l2 Lipschitz bound (certified upper, empirical lower)."
        ),
    )
    inspect.add_argument(
        "source",
        metavar="SOURCE",
        help="a run directory of experiments/train.py (its .hydra/config.yaml and checkpoints/last.ckpt), a .ckpt "
        "file inside one, torchvision:NAME (random weights), or package.module:function (a factory called with no "
        "arguments that returns an nn.Module)",
    )
    inspect.add_argument(
        "--input-shape",
        metavar="C,H,W",
        help="per-sample input shape, e.g. 3,32,32 (a run's default: data.image_shape of its config; required "
        "otherwise)",
    )
    inspect.add_argument("--json", action="store_true", help="print JSON on stdout instead of a table")
    inspect.add_argument(
        "--compose-batchnorm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bound each conv->BatchNorm pair as one map, which is tighter (default: on); the compositions' norms "
        "are listed either way",
    )
    inspect.add_argument("--samples", type=int, default=8, metavar="N", help="probe inputs for the lower bound")
    inspect.add_argument("--seed", type=int, default=0, help="seed for random weights and probes (default: 0)")
    return parser


def _inspect(args: argparse.Namespace) -> int:
    if args.samples < 1:
        raise SourceError(f"--samples must be a positive integer, got {args.samples}")
    explicit = None if args.input_shape is None else parse_input_shape(args.input_shape)
    model, declared = load_model(args.source, seed=args.seed)
    shape = explicit or declared
    if shape is None:
        raise SourceError(f"--input-shape C,H,W is required for {args.source} (only a run directory declares one)")
    example = torch.zeros(1, *shape)
    try:
        shapes = input_shapes(model, example)
    except Exception as err:  # noqa: BLE001 - a model that does not run at this shape is bad input
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SourceError(f"the model does not run on inputs of shape {_shape(shape)}: {message}") from None
    with progress_bar() as progress:
        report = inspect_model(
            model,
            shape,
            samples=args.samples,
            compose_batchnorm=args.compose_batchnorm,
            seed=args.seed,
            progress=progress,
        )
    print(json.dumps(report, indent=2) if args.json else format_report(report, shape, shapes))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``specclip`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        int: the exit code: 0, or 2 for bad input (a one-line message on stderr, no traceback).

    Example:
        >>> main(["inspect", "torch.nn:Identity", "--input-shape", "3,x,32"])
        2
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return int(exit_.code or 0)
    try:
        return _inspect(args)
    except SourceError as err:
        print(f"specclip {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
