"""Command-line flags and experiment files: tyro turns the frozen attrs configs into flags.

`--preset` and `--config` are read first: they pick the defaults that the other flags then override, so
`--preset small --model.resolution 640` is Small at 640. Depends only on the configs and presets, so every
command imports it without importing the others.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import tyro

from rfdetr_fn import presets
from rfdetr_fn.config import ConfigError
from rfdetr_fn.errors import TrainingDiverged, UserError

T = TypeVar("T")


def parse(cls: type[T], argv: list[str] | None = None, *, prog: str | None = None) -> T:
    """Parse `argv` into `cls`, with defaults from --preset and --config applied first. `prog` is the
    command as the user types it (`rfdetr_fn predict`), for --help and error messages."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--config", default=None)
    pre.add_argument("--train.allow-code-import", dest="allow_code", action="store_true")
    known, _ = pre.parse_known_args(argv)
    default = defaults(cls, preset=known.preset, config=known.config, allow_code=known.allow_code)
    return tyro.cli(cls, args=argv, default=default, description=cls.__doc__, prog=prog)


def defaults(cls: type[T], *, preset: str | None = None, config: str | None = None, allow_code: bool = False) -> T:
    """`cls()` with the experiment file's values and the preset's model fields applied.

    File values go through the same types as flags (`coerce_fields`); every error names the file
    and the key."""
    values: dict[str, Any] = load_config_file(config) if config else {}
    where = str(config)
    check_code_import(values, where, allow_code)
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
    """A YAML or JSON experiment file: {preset: ..., model: {...}, train: {...}, data: {...}, eval: {...}}.

    Read with YAML's safe loader (no Python tags); every problem is a ConfigError naming the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--config {path}: file not found")
    if p.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError(
            f"{path}: unknown extension {p.suffix or '(none)'}; experiment files are .yaml, .yml or .json"
        )
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the experiment file ({err})") from err
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:  # a !!python/... tag lands here too: it is never executed
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    else:
        try:
            values = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(values, dict):
        kind = {list: "a list", str: "a string"}.get(type(values), type(values).__name__)
        raise ConfigError(f"{path}: expected a mapping of sections (train:, model:, ...), got {kind}")
    return values


def check_code_import(values: dict[str, Any], where: str, allowed: bool) -> None:
    """An experiment file naming `optimizer: "module:function"` imports and runs that module: it needs
    --train.allow-code-import on the command line, which a file cannot set for itself."""
    train = values.get("train")
    if not isinstance(train, dict):
        return
    if "allow_code_import" in train:
        raise ConfigError(f"{where}: train.allow_code_import can only be given on the command line")
    optimizer = train.get("optimizer")
    if isinstance(optimizer, str) and ":" in optimizer and not allowed:
        raise ConfigError(
            f"{where}: train.optimizer={optimizer!r} would import and run Python code from module "
            f"{optimizer.split(':')[0]!r}; pass --train.allow-code-import to allow it (trusted files only)"
        )


def run_or_exit(command: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Run a command for a person at a terminal: a known error (bad config, data, checkpoint or output dir,
    a full disk or read-only output) prints its message alone and exits 2, a diverged run exits 1, a run
    stopped by a signal 130/143; `--debug` or RFDETR_FN_DEBUG=1 keeps the traceback. Anything else is a bug
    and raises as usual."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("RFDETR_FN_DEBUG", "") not in ("", "0")
    try:
        return command([a for a in argv if a != "--debug"])
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted (nothing more was saved)", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        code, message = _known_error(err)
        if debug or code is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        print("(--debug or RFDETR_FN_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(code) from None


# What the disk says when an output cannot be written: the user's to fix, not a bug.
_UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _known_error(err: Exception) -> tuple[int | None, str]:
    if isinstance(err, UserError | FileNotFoundError):
        return getattr(err, "exit_code", 2), str(err)
    if isinstance(err, TrainingDiverged):
        return 1, str(err)
    if isinstance(err, OSError) and err.errno in _UNWRITABLE:
        where = f"cannot write {err.filename}" if err.filename else "cannot write an output"
        return 2, f"{where}: {err.strerror or err}; free some space or pick a writable output directory"
    return None, str(err)


# ---------------------------------------------------------------- values from experiment files


def coerce_fields(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Experiment-file values for the fields of `cls`, converted like the same values given as flags;
    `where` prefixes each key in messages ("exp.yaml: train.").

    YAML gives typed values where the command line gives strings, so each value is checked against the
    field's type: `use_ema: "no"` or `batch_size: 2.5` are errors naming `where` and the key, `epochs: "3"`
    and `lr: 1e-4` (a string to YAML) are numbers, and unquoted `off`/`on` (booleans to YAML 1.1) are the
    choices of that name."""
    hints = typing.get_type_hints(cls)
    fields = attrs.fields_dict(cls)
    out = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{where}{key}: unknown field{hint}")
        converts = fields[key].converter is not None  # the field takes several forms itself (a dict as JSON)
        out[key] = value if converts else coerce(value, hints[key], f"{where}{key}")
    return out


def coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as type `hint` (bool, int, float, str, None, Literal, tuples, unions of those)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_describe(hint)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            return "on" if value else "off"  # YAML 1.1 reads unquoted on/off as booleans
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise ConfigError(f"{where}: expected {len(items)} values, got {len(value)}")
        return tuple(coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
    if hint is float and not isinstance(value, bool):
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if hint is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    if hint is type(None) and value is None:
        return None
    raise ConfigError(f"{where}: expected {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    return " or ".join(_describe(a) for a in typing.get_args(hint)) or str(hint)
