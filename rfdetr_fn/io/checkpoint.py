"""Train-state checkpoints: the whole train state through torch.distributed.checkpoint, saved atomically.

A state directory (`last/`, `checkpoint_NNNN/`) is written by every rank together and loads on any world
size. It is complete only once its JSON marker is written; an interrupted save leaves the previous
directory (or a complete sibling copy that `load_state` restores from) in place.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rfdetr_fn import tree
from rfdetr_fn.io import distributed
from rfdetr_fn.io.atomic import atomic_write, raise_if_disk_full, replace_dir
from rfdetr_fn.io.formats import CheckpointError

STATE_MARKER = "rfdetr_fn_state.json"  # written last: a state directory without it is incomplete


def _flat_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}; "%" and "/" inside keys are escaped so any string key survives."""
    return {"/".join(_escape(key, path) for key in path): leaf for path, leaf in tree.paths(state).items()}


def _escape(key: Any, path: tuple) -> str:
    if not isinstance(key, str):
        raise TypeError(f"train state keys must be strings, got {key!r} in {path}")
    return key.replace("%", "%25").replace("/", "%2F")


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
    world = distributed.current()
    tag = distributed.broadcast_object(os.getpid(), world)  # rank 0's pid names the directory all ranks write
    tmp = directory.with_name(f"{directory.name}.tmp-{tag}")
    flat = _flat_state(state)
    tensors = {k: v for k, v in flat.items() if isinstance(v, Tensor)}
    values = {k: _json_leaf(k, v) for k, v in flat.items() if not isinstance(v, Tensor)}
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier(world)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
            dcp.save(tensors, checkpoint_id=tmp, no_dist=world.size == 1)
    except Exception as err:  # a kill (KeyboardInterrupt) leaves the debris for the next save to clean
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(err, directory)
        raise
    distributed.barrier(world)
    if world.main:
        marker = {"format": 1, "tensors": sorted(tensors), "values": values}
        try:
            atomic_write(tmp / STATE_MARKER, lambda p: p.write_text(json.dumps(marker)))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # an unfinished copy only keeps the disk full
            raise
        replace_dir(tmp, directory)
        if keep is not None:
            _keep_copy(directory, keep)
    distributed.barrier(world)
    return directory


def _keep_copy(directory: Path, keep: str) -> None:
    """A hard-linked sibling copy of a finished state directory (a numbered snapshot)."""
    kept = directory.with_name(keep)
    kept_tmp = kept.with_name(f"{kept.name}.tmp-{os.getpid()}")
    shutil.rmtree(kept_tmp, ignore_errors=True)
    try:
        shutil.copytree(directory, kept_tmp, copy_function=_link_or_copy)
    except BaseException as err:
        shutil.rmtree(kept_tmp, ignore_errors=True)
        raise_if_disk_full(err, kept)
        raise
    replace_dir(kept_tmp, kept)


def update_values(directory: str | os.PathLike, values: dict) -> None:
    """Replace non-tensor leaves (loop position, tracker records) of a saved state in place, atomically: a
    small JSON rewrite instead of a full save. Only rank 0 writes; hard-linked copies keep their own."""
    if not distributed.current().main:
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


# The classes a DCP `.metadata` pickle is built from (torch 2.x); anything else is refused, so a crafted
# file cannot run code on resume (torch's own reader uses a plain pickle.load).
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_GLOBALS.get(module, ()) or (module == "torch" and _is_dtype(name)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to unpickle {module}.{name}: a train-state .metadata holds only checkpoint metadata, and "
            "building anything else could run code"
        )


def _is_dtype(name: str) -> bool:
    return isinstance(getattr(torch, name, None), torch.dtype)


def read_metadata(path: Path) -> Any:
    """A state directory's DCP `.metadata`, rebuilt by a restricted unpickler; a clear error otherwise."""
    file = path / ".metadata"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(file.read_bytes())).load()
    except pickle.UnpicklingError as err:
        if str(err).startswith("refused"):
            raise CheckpointError(f"{file}: {err}") from err
        raise CheckpointError(f"{file}: unreadable train-state metadata (truncated or corrupt?): {err}") from err
    except (OSError, ValueError, EOFError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise CheckpointError(f"{file}: unreadable train-state metadata (truncated or corrupt?): {err}") from err
    if not hasattr(metadata, "state_dict_metadata"):
        raise CheckpointError(f"{file}: not train-state metadata (a {type(metadata).__name__})")
    return metadata


def _safe_reader(path: Path) -> Any:
    """torch's FileSystemReader with `read_metadata` going through the restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def load_state(directory: str | os.PathLike, template: dict) -> dict:
    """Restore a train state saved by `save_state` into the structure (and tensor devices) of `template`.

    Every template leaf must be in the checkpoint; tensors must have the saved shape and dtype. The
    template is not modified: tensors are restored into fresh buffers like the template's.
    """
    import torch.distributed.checkpoint as dcp

    path = _resolve_state_dir(Path(directory))
    try:
        marker = json.loads((path / STATE_MARKER).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / STATE_MARKER}: unreadable train-state marker: {err}") from err
    stored = read_metadata(path).state_dict_metadata
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
    if buffers:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(buffers, storage_reader=_safe_reader(path), no_dist=distributed.current().size == 1)
    restored = iter([values[k] if k in values else buffers[k] for k in flat])
    # map_ visits the template's leaves in the order paths() listed them; empty dicts stay as they are
    return tree.map_(lambda leaf: _like(leaf, next(restored)), template)


def _like(template_leaf: Any, value: Any) -> Any:
    """JSON turns tuples into lists: give them back their template's type."""
    return tuple(value) if isinstance(template_leaf, tuple) and isinstance(value, list) else value


def resume_dir(resume: str | None, out_dir: Path) -> Path | None:
    """The state directory `--train.resume` names: "auto" is the newest complete copy of `out_dir/last`
    (also one a save killed between its renames left), else a fresh run."""
    if resume is None:
        return None
    path = newest_state_dir(out_dir / "last" if resume == "auto" else resume)
    if path is None and resume != "auto":
        raise FileNotFoundError(f"train.resume={resume}: no complete train-state checkpoint there")
    return path
