"""Image files in, one way for training, evaluation and predict, and a fast check of many files at once.

Decoding applies the EXIF orientation (a phone photo tagged "rotate 90°" is stored sideways; annotation
tools and viewers show it upright, so boxes are in the upright frame) and scales 16/32-bit greyscale down
to 8 bit (PIL's `convert("RGB")` clips those to white). The check reads headers only, in threads: a
dataset of thousands of files is checked in seconds, before training spends an epoch on it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # orientations that turn the stored image by 90° (width and height swap)
_HIGH_BIT_DEPTH = {"I;16": 257.0, "I;16B": 257.0, "I;16L": 257.0, "I;16N": 257.0, "I": 257.0}
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as upright 8-bit RGB."""
    im = ImageOps.exif_transpose(im)
    if im.mode in _HIGH_BIT_DEPTH:  # 16-bit PNG greyscale: 0..65535 -> 0..255, not clipped
        grey = np.asarray(im, dtype=np.float64) / _HIGH_BIT_DEPTH[im.mode]
        im = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    elif im.mode == "F":  # float images: [0, 1] is scaled, anything else taken as 0..255
        grey = np.asarray(im, dtype=np.float64)
        grey = grey * 255 if grey.size and np.nanmax(grey) <= 1.0 else grey
        im = Image.fromarray(np.clip(np.nan_to_num(np.rint(grey)), 0, 255).astype(np.uint8))
    return im.convert("RGB")


def read_rgb(path: str | os.PathLike, *, allow_large: bool = False) -> np.ndarray:
    """A file as uint8 (H, W, 3) upright RGB; PIL's errors (READ_ERRORS) pass through for the caller to name.

    allow_large skips Pillow's decompression-bomb guard for this call only (Pillow's limit is a process-wide
    global, `Image.MAX_IMAGE_PIXELS`, which this never changes)."""
    with open_image(path, allow_large=allow_large) as im:
        return np.asarray(to_rgb(im))


def open_image(path: str | os.PathLike, *, allow_large: bool = False) -> Image.Image:
    """`Image.open`, or with allow_large the same format plugins without the size guard (a per-call choice)."""
    if not allow_large:
        return Image.open(path)
    Image.init()
    with open(path, "rb") as f:
        data = f.read()
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        if accept is not None and not accept(data[:16]):
            continue
        try:
            im = factory(io.BytesIO(data), str(path))
        except (SyntaxError, IndexError, TypeError, ValueError):
            continue
        return im
    raise Image.UnidentifiedImageError(f"cannot identify image file {str(path)!r}")


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header alone."""
    w, h = im.size
    return (h, w) if im.getexif().get(EXIF_ORIENTATION, 1) in _SWAPS_SIDES else (w, h)


def header_size(path: str | os.PathLike) -> tuple[int, int]:
    """Upright (width, height) of an image file without decoding its pixels."""
    with Image.open(path) as im:
        return upright_size(im)


def read_error(path: Path, exc: BaseException) -> str:
    """One line saying why a file cannot be used, with the fix where there is one."""
    if isinstance(exc, FileNotFoundError):
        if path.is_symlink():
            return f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)"
        return f"{path}: missing image file"
    if isinstance(exc, Image.DecompressionBombError):
        return f"{path}: image too large for the decompression-bomb guard ({exc})"
    if path.is_file() and path.stat().st_size == 0:
        return f"{path}: empty file (0 bytes)"
    return f"{path}: unreadable image ({type(exc).__name__}: {exc})"


def check_headers(
    items: Sequence[tuple[Path, int | None, int | None]], workers: int | None = None
) -> tuple[list[str], list[str]]:
    """(unreadable files, size disagreements) for (path, annotated width, annotated height) items.

    Only headers are read (in threads), so a truncated pixel stream is found when it is decoded."""

    def one(item: tuple[Path, int | None, int | None]) -> tuple[str | None, str | None]:
        path, width, height = item
        try:
            size = header_size(path)
        except READ_ERRORS as exc:
            return read_error(Path(path), exc), None
        if width is not None and height is not None and size != (width, height):
            return None, f"{path}: decodes as {size[0]}x{size[1]} (upright), annotated {width}x{height}"
        return None, None

    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, items))
    return [bad for bad, _ in results if bad], [odd for _, odd in results if odd]
