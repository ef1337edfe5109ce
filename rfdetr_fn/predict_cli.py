"""The predict command: `rfdetr_fn predict --checkpoint output/ --images a.jpg photos/`.

Writes `predictions.json` (and, unless --no-draw, one annotated PNG per image) into --output-dir. The
library function behind it is `rfdetr_fn.predict` (defined in `rfdetr_fn.eval.inference`); this module has its
own name so that importing the command never hides that function.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rfdetr_fn import deploy, tree
from rfdetr_fn.compiler import use_compile
from rfdetr_fn.data.source import IMAGE_SUFFIXES
from rfdetr_fn.deploy import predict
from rfdetr_fn.errors import UserError
from rfdetr_fn.eval.drawing import class_name, draw_detections
from rfdetr_fn.flags import parse
from rfdetr_fn.io import imageio, weights
from rfdetr_fn.io.atomic import atomic_write, check_writable
from rfdetr_fn.io.distributed import World, set_threads
from rfdetr_fn.io.weights import load_weights
from rfdetr_fn.model.precision import compute_kind, resolve_precision


class PredictError(UserError, ValueError):
    """Bad predict arguments (images, output dir, threshold, batch size): printed alone, exit 2."""


@attrs.frozen(kw_only=True)
class PredictArgs:
    """Detect objects in images with a trained checkpoint; write predictions.json and annotated PNGs."""

    checkpoint: str = "output/checkpoint_best_total.pth"
    """Weights file (.pth, .ckpt or .safetensors), a training output directory, or an exported .onnx / .pt2."""
    images: tuple[str, ...] = ()
    """Image files and/or folders (folders: their .jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff files, sorted)."""
    output_dir: str = "predictions"
    """Folder for predictions.json and the drawn images."""
    threshold: float = 0.5
    """Keep detections scoring above this."""
    draw: bool = True
    """Also write <stem>.png per image with boxes, labels and masks drawn on it."""
    device: str | None = None
    """cpu, cuda or cuda:N; None picks CUDA when available."""
    batch_size: int = 4
    """Images per forward pass."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the forward pass (regional, cached on disk); auto follows rfdetr_fn.compiler.use_compile."""
    allow_large_images: bool = False
    """Read images above Pillow's decompression-bomb limit (about 179 megapixels)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Forward autocast: auto = bf16 on a CPU with AMX-BF16/AVX512-BF16 or CUDA compute capability >= 8
    (fp16 on older CUDA), fp32 on other CPUs (rfdetr_fn.model.precision)."""


def check_args(args: PredictArgs) -> None:
    """Values no prediction can use, refused before any work (NaN would silently keep nothing)."""
    if not (0.0 <= args.threshold <= 1.0):  # False for NaN too
        raise PredictError(f"--threshold {args.threshold}: expected a number from 0 to 1")
    if args.batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {args.batch_size}")


def collect_images(items: Sequence[str]) -> list[Path]:
    """Expand files and folders into the image paths to run on, in the order given (folders sorted)."""
    if not items:
        raise PredictError("--images: no images given; pass image files and/or folders")
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if "://" in str(item):
            raise PredictError(f"--images {item}: URLs are not supported (nothing is fetched); download the file first")
        if p.is_dir():
            # a broken symlink is listed too, to be reported like any unreadable file
            found = sorted(
                f for f in p.iterdir() if (f.is_file() or f.is_symlink()) and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise PredictError(f"--images: folder {p} holds no {'/'.join(IMAGE_SUFFIXES)} files")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"--images: image file {p} not found")
    return paths


def detections_to_json(
    det: dict[str, Tensor], names: Sequence[str] | None, schema: Sequence[int] = ()
) -> list[dict[str, Any]]:
    """One image's detections as JSON-ready dicts, best score first; masks as COCO RLE; keypoint models
    add `keypoints`: [x, y, score] in original pixels for each of the label's keypoints."""
    order = torch.argsort(det["scores"], descending=True).cpu()
    boxes = det["boxes"].float().cpu()[order]
    scores = det["scores"].float().cpu()[order]
    labels = det["labels"].cpu()[order]
    masks = det["masks"].cpu()[order] if "masks" in det else None
    keypoints = det["keypoints"].float().cpu()[order] if "keypoints" in det else None
    out = []
    for i in range(len(order)):
        label = int(labels[i])
        entry: dict[str, Any] = {
            "box_xyxy": [round(float(v), 2) for v in boxes[i]],
            "score": round(float(scores[i]), 5),
            "label": label,
            "class_name": class_name(label, names),
        }
        if masks is not None:
            entry["mask_rle"] = encode_mask(masks[i].numpy())
        if keypoints is not None:
            count = schema[label] if label < len(schema) else 0
            entry["keypoints"] = [[round(float(v), 2) for v in point] for point in keypoints[i, :count]]
        out.append(entry)
    return out


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A bool (H, W) mask as COCO RLE {"size": [h, w], "counts": str} (pycocotools' bytes decoded)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _drawing_names(paths: Sequence[Path]) -> list[str]:
    """<stem>.png per image; a name already taken (same stem twice, or `a.png` for `a.jpg` beside `a-2.jpg`)
    gets the first free -2, -3, ... (compared ignoring case, as on macOS and Windows disks)."""
    used: set[str] = set()
    out = []
    for p in paths:
        name, n = f"{p.stem}.png", 1
        while name.lower() in used:
            n += 1
            name = f"{p.stem}-{n}.png"
        used.add(name.lower())
        out.append(name)
    return out


def refuse_overwriting_inputs(
    out_dir: Path, outputs: Sequence[str], inputs: Sequence[Path], folders: Sequence[str]
) -> None:
    """No output may land on an input file, nor drawings in an input folder (`--output-dir` = the image
    folder would replace the photos, or mix drawings into the next run's inputs)."""
    if outputs and out_dir.resolve() in {Path(f).resolve() for f in folders if Path(f).is_dir()}:
        raise PredictError(
            f"--output-dir {out_dir} is an input folder: the drawings would land among (and could overwrite) "
            "the images; pick another --output-dir (or pass --no-draw)"
        )
    sources = {p.resolve() for p in inputs}
    hit = [name for name in outputs if (out_dir / name).resolve() in sources]
    if hit:
        shown = ", ".join(hit[:5]) + (f" and {len(hit) - 5} more" if len(hit) > 5 else "")
        raise PredictError(
            f"--output-dir {out_dir}: the drawings would overwrite input image(s) {shown}; pick another "
            "--output-dir (or pass --no-draw)"
        )


def run(args: PredictArgs) -> list[dict[str, Any]]:
    """Predict on every image in `args.images`; write predictions.json (and drawings); return its records.

    An unreadable file is skipped and reported (a record with an "error" instead of detections, and a line
    on stderr); records also go to predictions.jsonl as they come, so a crash keeps what was done."""
    check_args(args)
    paths = collect_images(args.images)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_threads(World(rank=0, size=1, device=device))
    if deploy.is_exported(args.checkpoint):  # onnxruntime / AOTInductor; config and names from the file
        params = deploy.load(args.checkpoint)
        cfg, names = params.cfg, params.class_names
    else:
        ckpt = weights.resolve_checkpoint(args.checkpoint)
        cfg, params = load_weights(ckpt)
        names = weights.class_names(ckpt)
        params = tree.to(params, device)
    schema = cfg.num_keypoints_per_class if cfg.keypoints else ()
    precision = resolve_precision(args.precision, device)
    compiled = use_compile(args.compile, compute_kind(device, precision), "inference")
    out_dir = Path(args.output_dir)
    drawings = dict(zip(paths, _drawing_names(paths)))
    refuse_overwriting_inputs(out_dir, [*drawings.values()] if args.draw else [], paths, args.images)
    check_writable(out_dir, "--output-dir")
    (out_dir / "predictions.json").unlink(missing_ok=True)  # a kill must not leave the last run's beside ours
    records: list[dict[str, Any]] = []
    with open(out_dir / "predictions.jsonl", "w") as stream:
        for start in range(0, len(paths), args.batch_size):
            chunk = [(p, _read(p, args.allow_large_images)) for p in paths[start : start + args.batch_size]]
            good = [(p, arr) for p, arr in chunk if not isinstance(arr, str)]
            found = iter(
                predict(
                    params,
                    cfg,
                    [arr for _, arr in good],
                    threshold=args.threshold,
                    compile=compiled,
                    precision=precision,
                )
                if good
                else []
            )
            for path, arr in chunk:
                if isinstance(arr, str):
                    record = {"image": str(path), "error": arr}
                    print(f"skipped {path}: {arr}", file=sys.stderr)
                else:
                    det = next(found)
                    h, w = arr.shape[:2]
                    record = {"image": str(path), "width": int(w), "height": int(h)}
                    record["detections"] = detections_to_json(det, names, schema)
                    if args.draw:
                        drawn = draw_detections(arr, det, names, schema, cfg.keypoint_skeleton)
                        drawn.save(out_dir / drawings[path])
                        record["drawing"] = drawings[path]
                records.append(record)
                stream.write(json.dumps(record) + "\n")
                stream.flush()
    atomic_write(out_dir / "predictions.json", lambda tmp: tmp.write_text(json.dumps(records, indent=2)))
    failed = sum("error" in r for r in records)
    found = sum(len(r.get("detections", ())) for r in records)
    print(f"{len(records)} image(s), {found} detection(s) above {args.threshold} -> {out_dir}/predictions.json")
    if failed:
        print(f"{failed} of {len(records)} image(s) could not be read (listed in predictions.json)", file=sys.stderr)
    return records


def _read(path: Path, allow_large: bool = False) -> np.ndarray | str:
    """The image, or why it cannot be used (allow_large: no decompression-bomb guard for this read)."""
    try:
        return imageio.read_rgb(path, allow_large=allow_large)
    except Image.DecompressionBombError as exc:
        return f"larger than Pillow's decompression-bomb limit ({exc}); pass --allow-large-images to read it"
    except imageio.READ_ERRORS as exc:
        return imageio.read_error(path, exc)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """`rfdetr_fn predict --checkpoint FILE_OR_DIR --images a.jpg folder/ [...]`; exits 1 after writing the
    results when some images could not be read."""
    records = run(parse(PredictArgs, argv, prog="rfdetr_fn predict"))
    if any("error" in r for r in records):
        raise SystemExit(1)
    return records


if __name__ == "__main__":
    from rfdetr_fn.flags import run_or_exit

    run_or_exit(main)
