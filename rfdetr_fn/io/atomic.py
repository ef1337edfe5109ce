"""Atomic writes: a reader (or a crash mid-save) sees the old file or directory, or the new one, never half.

Every writer in the package goes through here: weights files, train-state markers, metrics.csv, JSON records.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from rfdetr_fn.errors import UserError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temp file beside `path`, fsync, then os.replace: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(err, path)
        raise
    fsync_dir(path.parent)


class DiskFullError(UserError, OSError):
    """A save ran out of space; its partial temp was removed and the previous file or directory is intact."""


def raise_if_disk_full(err: BaseException, path: Path) -> None:
    """Say "no space left" plainly (torch's own message is an opaque inline_container.cc failure)."""
    text = str(err)
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text
    if not full and ("write failed" in text or "unexpected pos" in text):  # torch's writer keeps no errno
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(path.parent).free < 64 * 2**20
    if full:
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left in {path.parent} while writing {path.name}: the partial file was removed and the "
            "previous one is intact; free some space and run again (with --train.resume auto for training)",
        ) from err


class OutputNotWritable(UserError, OSError):
    """An output directory that cannot take files (read-only, no permission, full): found before the work."""


def check_writable(directory: Path, what: str) -> None:
    """Create `directory` if needed and write (then remove) a probe file, so a read-only or full output
    fails at the start with one message instead of after an hour of work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputNotWritable(
            err.errno, f"{what} {directory}: cannot write there ({err.strerror or err}); pick a writable directory"
        ) from err


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete `new` directory at `target`; the old one is removed only after the swap."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    for stale in [*target.parent.glob(f"{target.name}.old-*"), *target.parent.glob(f"{target.name}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by earlier crashed saves


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
