"""Command-line flags and experiment files: tyro turns the frozen attrs configs into flags.

`--preset` and `--config` are read first: they pick the defaults that the other flags then override, so
`--preset small --model.resolution 640` is Small at 640. Depends only on the configs and presets, so every
command imports it without importing the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TypeVar

import attrs
import tyro

from rfdetr_fn import presets

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
    """`cls()` with the experiment file's values and the preset's model fields applied."""
    values: dict[str, Any] = load_config_file(config) if config else {}
    preset = preset or values.pop("preset", None)
    fields = attrs.fields_dict(cls)
    kwargs: dict[str, Any] = {}
    if preset is not None and "model" in fields:
        kwargs["preset"] = preset
        kwargs["model"] = presets.get(preset, **_tuples(values.pop("model", {})))
    if config is not None and "config" in fields:
        kwargs["config"] = config
    base = cls()
    for name, value in values.items():
        if name not in fields:
            raise ValueError(f"{config}: unknown section {name!r}; expected one of {', '.join(fields)}")
        current = kwargs.get(name, getattr(base, name))
        if attrs.has(type(current)) and isinstance(value, dict):
            _check_keys(config, name, value, type(current))
            kwargs[name] = attrs.evolve(current, **_tuples(value))
        else:
            kwargs[name] = value
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


def _check_keys(path: str | None, section: str, values: dict, cls: type) -> None:
    unknown = set(values) - set(attrs.fields_dict(cls))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) in [{section}]: {', '.join(sorted(unknown))}")


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    """YAML/JSON lists become tuples, the type the frozen configs use."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
