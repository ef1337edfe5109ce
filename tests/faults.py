"""Fault injection the reliability tests share: a kill at a named point, a full disk, a read-only directory.

Every fault is installed with pytest's `monkeypatch`, so it is undone when the test ends. Tests run as
root in some containers, where `chmod` cannot make a directory read-only and mounting a tiny filesystem
is not allowed: the faults are injected as the `OSError` the kernel would raise (ENOSPC, EROFS) at every
way the package writes a file (`open` for writing, `os.open`, `os.mkdir`, `os.replace`, `torch.save`,
`Image.save`, DCP's writer), limited to paths under the directory given.
"""

from __future__ import annotations

import builtins
import errno
import importlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Named points where a run can be killed: "module:attribute" of a function the package calls.
KILL_POINTS = {
    "dcp-save": "torch.distributed.checkpoint:save",  # while the train-state tensors are written
    "state-marker": "rfdetr_fn.io.checkpoint:atomic_write",  # after the tensors, before the marker
    "state-swap": "rfdetr_fn.io.checkpoint:replace_dir",  # between the temp copy and its rename
    "weights-save": "rfdetr_fn.io.weights:write_upstream_best",  # while writing a best-weights file
    "train-step": "rfdetr_fn.fit:make_train_step",  # anywhere in the loop (wrapped per call)
}


class Killed(BaseException):
    """Stands for kill -9: a BaseException, so no `except Exception` in the package catches it."""


def kill_at(monkeypatch: pytest.MonkeyPatch, point: str, *, after: int = 0) -> Callable[[], None]:
    """Raise `Killed` at the named point's call number `after` + 1 (the earlier calls run normally);
    returns a function that revives the point (for the restarted run)."""
    module_name, attr = KILL_POINTS[point].split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, attr)
    calls = [0]

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > after:
            raise Killed(f"killed at {point} (call {calls[0]})")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attr, dying)
    return lambda: monkeypatch.setattr(module, attr, real)


def _under(path: Any, root: Path) -> bool:
    if isinstance(path, int) or path is None:
        return False
    try:
        return Path(os.path.abspath(os.fspath(path))).is_relative_to(root)
    except TypeError:  # a file object, e.g. torch.save into a buffer
        return False


def fail_writes(monkeypatch: pytest.MonkeyPatch, root: str | os.PathLike, code: int) -> None:
    """Every write under `root` raises OSError(`code`) as the kernel would; reads still work."""
    import torch
    import torch.distributed.checkpoint as dcp
    from PIL import Image

    root = Path(os.path.abspath(root))
    message = os.strerror(code)

    def refuse(path: Any) -> None:
        if _under(path, root):
            raise OSError(code, message, os.fspath(path))

    real_open, real_os_open = builtins.open, os.open

    def open_(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def os_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def wrap(real: Any, *, arg: int = 0, kw: str | None = None) -> Any:
        def guarded(*a: Any, **k: Any) -> Any:
            refuse(k.get(kw) if kw and kw in k else a[arg] if len(a) > arg else None)
            return real(*a, **k)

        return guarded

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # pathlib's write_text / open go through io.open
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", wrap(os.mkdir))
    monkeypatch.setattr(os, "replace", wrap(os.replace, arg=1))
    monkeypatch.setattr(torch, "save", wrap(torch.save, arg=1))
    monkeypatch.setattr(dcp, "save", wrap(dcp.save, kw="checkpoint_id"))
    real_image_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", lambda im, fp, *a, **k: (refuse(fp), real_image_save(im, fp, *a, **k))[1])
    import tempfile

    monkeypatch.setattr(tempfile, "mkstemp", wrap(tempfile.mkstemp, kw="dir"))


def disk_full(monkeypatch: pytest.MonkeyPatch, root: str | os.PathLike) -> None:
    """No space left under `root`: every write there raises ENOSPC."""
    fail_writes(monkeypatch, root, errno.ENOSPC)


def read_only(monkeypatch: pytest.MonkeyPatch, root: str | os.PathLike) -> None:
    """`root` is on a read-only filesystem: every write there raises EROFS (chmod does not stop root)."""
    fail_writes(monkeypatch, root, errno.EROFS)
