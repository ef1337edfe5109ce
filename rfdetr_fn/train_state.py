"""Train-state checkpoints: the whole train state through torch.distributed.checkpoint, saved atomically.

A state directory (`last/`, `checkpoint_NNNN/`) is written by every rank together and loads on any world
size. It is complete only once its JSON marker is written; an interrupted save leaves the previous
directory (or a complete sibling copy that `load_state` restores from) in place.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rfdetr_fn.atomic import atomic_write, raise_if_disk_full, replace_dir
from rfdetr_fn.weights import CheckpointError

STATE_MARKER = "rfdetr_fn_state.json"  # written last: a state directory without it is incomplete


def _dist() -> tuple[bool, int]:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return on, dist.get_rank() if on else 0


def _barrier(on: bool) -> None:
    if on:
        import torch.distributed as dist

        dist.barrier()


def _shared_tag(on: bool) -> int:
    """Rank 0's pid, agreed by every rank, names the temp directory they all write into."""
    tag = [os.getpid()]
    if on:
        import torch.distributed as dist

        dist.broadcast_object_list(tag, src=0)
    return int(tag[0])


def _flat_state(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}; "/" and "%" in keys are escaped so any key survives."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"train state keys must be strings, got {key!r} at {prefix or '<root>'}")
        path = prefix + key.replace("%", "%25").replace("/", "%2F")
        if isinstance(value, Mapping):
            out.update(_flat_state(value, path + "/"))
        else:
            out[path] = value
    return out


def save_state(directory: str | os.PathLike, state: dict, *, keep: str | None = None) -> Path:
    """Save a train state (nested dict of tensors and JSON values) atomically; returns the directory.

    Tensors go through `torch.distributed.checkpoint` (every rank of a process group must call this);
    other leaves (ints, floats, strings, None, lists) go into a JSON marker written last. The new state is
    written to `<directory>.tmp-<pid>` and swapped in only when complete, so a crash keeps the old one.
    `keep`: also keep a copy of the finished checkpoint under this sibling name (hard links; e.g. `last`
    plus a numbered snapshot from one save).
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    on, rank = _dist()
    tmp = directory.with_name(f"{directory.name}.tmp-{_shared_tag(on)}")
    flat = _flat_state(state)
    tensors = {k: v for k, v in flat.items() if isinstance(v, Tensor)}
    values = {k: _json_leaf(k, v) for k, v in flat.items() if not isinstance(v, Tensor)}
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(on)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
            dcp.save(tensors, checkpoint_id=tmp, no_dist=not on)
    except Exception as err:  # a kill (KeyboardInterrupt) leaves the debris for the next save to clean
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(err, directory)
        raise
    _barrier(on)
    if rank == 0:
        marker = {"format": 1, "tensors": sorted(tensors), "values": values}
        atomic_write(tmp / STATE_MARKER, lambda p: p.write_text(json.dumps(marker)))
        replace_dir(tmp, directory)
        if keep is not None:
            kept = directory.with_name(keep)
            kept_tmp = kept.with_name(f"{kept.name}.tmp-{os.getpid()}")
            shutil.rmtree(kept_tmp, ignore_errors=True)
            shutil.copytree(directory, kept_tmp, copy_function=_link_or_copy)
            replace_dir(kept_tmp, kept)
    _barrier(on)
    return directory


def update_values(directory: str | os.PathLike, values: dict) -> None:
    """Replace non-tensor leaves (loop position, tracker records) of a saved state in place, atomically: a
    small JSON rewrite instead of a full save. Only rank 0 writes; hard-linked copies keep their own."""
    on, rank = _dist()
    if rank != 0:
        return
    path = Path(directory) / STATE_MARKER
    marker = json.loads(path.read_text())
    flat = _flat_state(values)
    unknown = sorted(set(flat) - set(marker["values"]))
    if unknown:
        raise KeyError(f"{directory}: not saved as values, so they cannot be updated: {unknown[:5]}")
    marker["values"].update({k: _json_leaf(k, v) for k, v in flat.items()})
    atomic_write(path, lambda p: p.write_text(json.dumps(marker)))


def _json_leaf(key: str, value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"train state leaf {key!r} is a {type(value).__name__}: store tensors, numbers, strings, None "
            f"or lists of them (bytes as uint8 tensors)"
        ) from err
    return value


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # finished checkpoints are never modified, so sharing inodes is safe
    except OSError:
        shutil.copy2(src, dst)


def _complete(directory: Path) -> bool:
    return (directory / STATE_MARKER).is_file() and (directory / ".metadata").is_file()


def newest_state_dir(directory: str | os.PathLike) -> Path | None:
    """The newest complete copy of a train state: `directory` itself, or the temp or set-aside copy that a
    save killed between its two renames left beside it (newest marker wins); None when there is none."""
    directory = Path(directory)
    copies = [directory, *directory.parent.glob(f"{directory.name}.tmp-*")]
    copies += directory.parent.glob(f"{directory.name}.old-*")
    complete = [p for p in copies if _complete(p)]
    return max(complete, key=lambda p: (p / STATE_MARKER).stat().st_mtime_ns, default=None)


def _resolve_state_dir(directory: Path) -> Path:
    """`directory`, or the newest complete copy left by a save interrupted mid-swap."""
    found = newest_state_dir(directory)
    if found is not None:
        if found != directory:
            warnings.warn(f"{directory}: incomplete; restoring from {found.name}", stacklevel=3)
        return found
    if directory.exists():
        raise CheckpointError(f"{directory}: not a complete train-state checkpoint (no {STATE_MARKER})")
    raise CheckpointError(f"{directory}: no such train-state checkpoint directory")


def load_state(directory: str | os.PathLike, template: dict) -> dict:
    """Restore a train state saved by `save_state` into the structure (and tensor devices) of `template`.

    Every template leaf must be in the checkpoint; tensors must have the saved shape and dtype. The
    template is not modified: tensors are restored into fresh buffers like the template's.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    path = _resolve_state_dir(Path(directory))
    try:
        marker = json.loads((path / STATE_MARKER).read_text())
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except (OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"{path}: unreadable train-state checkpoint: {err}") from err
    values = marker["values"]
    flat = _flat_state(template)
    buffers: dict[str, Tensor] = {}
    problems = []
    for key, leaf in flat.items():
        if key in values:
            continue
        meta = stored.get(key)
        if meta is None or not hasattr(meta, "size"):
            problems.append(f"missing {key}")
            continue
        shape, dtype = tuple(meta.size), meta.properties.dtype
        if isinstance(leaf, Tensor):
            if tuple(leaf.shape) != shape or leaf.dtype != dtype:
                problems.append(f"{key}: saved {shape} {dtype}, template {tuple(leaf.shape)} {leaf.dtype}")
                continue
            buffers[key] = torch.empty_like(leaf)
        else:
            buffers[key] = torch.empty(shape, dtype=dtype)
    if problems:
        raise CheckpointError(f"{path}: train state does not match the template: " + "; ".join(problems[:20]))
    on, _ = _dist()
    if buffers:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(buffers, checkpoint_id=path, no_dist=not on)
    restored = {**{k: values[k] for k in flat if k in values}, **buffers}
    return _rebuild(template, restored)


def _rebuild(template: Mapping[str, Any], flat: Mapping[str, Any], prefix: str = "") -> dict:
    out: dict[str, Any] = {}
    for key, value in template.items():
        path = prefix + key.replace("%", "%25").replace("/", "%2F")
        if isinstance(value, Mapping):
            out[key] = _rebuild(value, flat, path + "/")
        else:
            leaf = flat[path]
            out[key] = tuple(leaf) if isinstance(value, tuple) and isinstance(leaf, list) else leaf
    return out


def resume_dir(resume: str | None, out_dir: Path) -> Path | None:
    """The state directory `--train.resume` names: "auto" is the newest complete copy of `out_dir/last`
    (also one a save killed between its renames left), else a fresh run."""
    if resume is None:
        return None
    path = newest_state_dir(out_dir / "last" if resume == "auto" else resume)
    if path is None and resume != "auto":
        raise FileNotFoundError(f"train.resume={resume}: no complete train-state checkpoint there")
    return path
