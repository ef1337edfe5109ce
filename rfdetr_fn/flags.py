"""Command-line flags and experiment files: tyro turns the frozen attrs configs into flags.

`--preset` and `--config` are read first: they pick the defaults that the other flags then override, so
`--preset small --model.resolution 640` is Small at 640. Depends only on the configs and presets, so every
command imports it without importing the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import tyro

from rfdetr_fn import presets
from rfdetr_fn.config import ConfigError, coerce_fields
from rfdetr_fn.errors import TrainingDiverged, UserError

T = TypeVar("T")


def parse(cls: type[T], argv: list[str] | None = None) -> T:
    """Parse `argv` into `cls`, with defaults from --preset and --config applied first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    default = defaults(cls, preset=known.preset, config=known.config)
    return tyro.cli(cls, args=argv, default=default, description=cls.__doc__)


def defaults(cls: type[T], *, preset: str | None = None, config: str | None = None) -> T:
    """`cls()` with the experiment file's values and the preset's model fields applied.

    File values go through the same types as flags (`config.coerce_fields`); every error names the file
    and the key."""
    values: dict[str, Any] = load_config_file(config) if config else {}
    where = str(config)
    fields = attrs.fields_dict(cls)
    unknown = sorted(set(values) - set(fields) - {"preset"})
    if unknown:
        raise ConfigError(f"{where}: unknown section {unknown[0]!r}; expected one of {', '.join(fields)}")
    base = cls()
    top = {k: v for k, v in values.items() if k in fields and not attrs.has(type(getattr(base, k)))}
    kwargs: dict[str, Any] = coerce_fields(cls, top, f"{where}: ") if top else {}
    preset = preset or values.get("preset")
    for name, section in values.items():
        current = getattr(base, name, None)
        if name in top or name == "preset" or not attrs.has(type(current)):
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: [{name}] must be a mapping of fields, got {section!r}")
        typed = coerce_fields(type(current), section, f"{where}: {name}.")
        try:
            if name == "model" and preset is not None:
                kwargs[name] = presets.get(preset, **typed)
            else:
                kwargs[name] = attrs.evolve(current, **typed)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: [{name}] {err}") from err
    if preset is not None and "model" in fields:
        kwargs["preset"] = preset
        kwargs.setdefault("model", presets.get(preset))
    if config is not None and "config" in fields:
        kwargs["config"] = config
    return attrs.evolve(base, **kwargs)


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON experiment file: {preset: ..., model: {...}, train: {...}, data: {...}, eval: {...}}."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--config {path}: file not found")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of sections, got {type(values).__name__}")
    return values


def run_or_exit(command: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Run a command for a person at a terminal: a known error (bad config, data, checkpoint or output dir,
    a full disk) prints its message alone and exits 2, a diverged run exits 1; `--debug` or RFDETR_FN_DEBUG=1 keeps
    the traceback. Anything else is a bug and raises as usual."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("RFDETR_FN_DEBUG", "") not in ("", "0")
    try:
        return command([a for a in argv if a != "--debug"])
    except Exception as err:
        code = 2 if isinstance(err, UserError | FileNotFoundError) else 1 if isinstance(err, TrainingDiverged) else None
        if debug or code is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        print("(--debug or RFDETR_FN_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(code) from None
