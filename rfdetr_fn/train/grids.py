"""`--train.save-dataset-grids`: PNG grids of what the model is fed, boxes and masks drawn, written at the start
of `fit` (upstream's `save_dataset_grids`, 3x3 images per batch, the first 3 batches of train and valid)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rfdetr_fn.data.transforms import MEAN, STD

GRID_SIDE = 3
GRID_BATCHES = 3


def batch_pictures(batch: dict[str, Tensor]) -> list[tuple[np.ndarray, dict[str, Tensor]]]:
    """Each image of a collated batch as uint8 HWC (padding cut off) with its targets as pixel xyxy."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    out = []
    for b in range(len(batch["images"])):
        h, w = (int(v) for v in batch["size"][b])
        image = batch["images"][b, :3, :h, :w].float().cpu() * std + mean
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        keep = batch["labels"][b] >= 0
        cx, cy, bw, bh = batch["boxes"][b][keep].float().cpu().unbind(-1)
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1) * torch.tensor([w, h, w, h])
        det = {"boxes": boxes, "labels": batch["labels"][b][keep].cpu()}
        if "masks" in batch:
            det["masks"] = batch["masks"][b][keep][:, :h, :w].cpu()
        out.append((pixels, det))
    return out


def grid_image(pictures: Sequence[Image.Image], side: int = GRID_SIDE, cell: int = 320) -> Image.Image:
    """Up to side x side pictures, each fitted into a cell of `cell` pixels, on a grey canvas."""
    canvas = Image.new("RGB", (side * cell, side * cell), (40, 40, 40))
    for k, picture in enumerate(pictures[: side * side]):
        scale = cell / max(picture.size)
        fitted = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
        canvas.paste(fitted, ((k % side) * cell, (k // side) * cell))
    return canvas


def save_grids(
    batches: Iterable[dict[str, Tensor]], out_dir: Path, split: str, class_names: Sequence[str] | None
) -> list[Path]:
    """Write `{split}_batch{k}.png` for the first GRID_BATCHES batches; returns the paths."""
    from rfdetr_fn.eval.drawing import draw_detections

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for k, batch in enumerate(batches):
        if k >= GRID_BATCHES:
            break
        pictures = [draw_detections(pixels, det, class_names) for pixels, det in batch_pictures(batch)]
        path = out_dir / f"{split}_batch{k}.png"
        grid_image(pictures).save(path)
        written.append(path)
    return written


def write_dataset_grids(train_ds, val_ds, cfg, tcfg, dcfg, class_names, out_dir: Path) -> list[Path]:
    """Grids of the first training batches of epoch 0 as the step sees them (per-batch multi-scale applied)
    and of the first validation batches, under out_dir/dataset_grids/. The run's own loaders are untouched."""
    import attrs

    from rfdetr_fn.data import eval_loader, multi_scale_scales, per_batch_scale, resize_batch, train_loader

    quiet = attrs.evolve(dcfg, num_workers=0)
    loader = train_loader(train_ds, tcfg, quiet, seed=tcfg.seed)
    loader.sampler.set_epoch(0)
    scales = multi_scale_scales(cfg.resolution, tcfg.expanded_scales, cfg.patch_size, cfg.num_windows)
    if tcfg.multi_scale == "per-batch":
        train_batches = (resize_batch(b, per_batch_scale(k, scales)) for k, b in enumerate(loader))
    else:
        train_batches = iter(loader)
    directory = out_dir / "dataset_grids"
    written = save_grids(train_batches, directory, "train", class_names)
    written += save_grids(eval_loader(val_ds, tcfg, quiet), directory, "valid", class_names)
    return written
