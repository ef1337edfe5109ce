"""One run per output directory: an exclusive lock file naming its holder (pid, host, start time).

Two runs writing into one directory corrupt each other (the second one's clean-up of stale temp saves
deletes the first one's save in progress). The lock is a file created with O_EXCL, removed on exit; a
lock whose process is gone (same host, pid not alive) is stale and taken over with a note. A lock from
another host cannot be checked, so it is refused with the path to delete if that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from rfdetr_fn.errors import UserError

LOCK_NAME = ".rfdetr_fn.lock"


class OutputDirError(UserError, ValueError):
    """The output directory cannot be used for this run (another run's files, another run's lock)."""


@contextlib.contextmanager
def exclusive(directory: Path) -> Iterator[Path]:
    """Hold `directory`'s lock for the duration of the block."""
    path = directory / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if not _stale(holder):
                raise OutputDirError(
                    f"{directory} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"since {holder.get('started')}): wait for it or pick another --train.output-dir; if that run "
                    f"is gone, delete {path}"
                ) from None
            print(f"{directory}: taking over the stale lock of pid {holder.get('pid')} (that process is gone)")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        if _holder(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # half-written by a process killed between creating and filling it


def _stale(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return not holder  # unreadable: stale; another host: cannot tell, so not stale
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by someone else
    return False
