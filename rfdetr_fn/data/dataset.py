"""The Dataset every layout feeds: checks a `Source` once, then serves (image, target) samples and the
COCO ground truth in label space for evaluation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rfdetr_fn import rng
from rfdetr_fn.data import augment
from rfdetr_fn.data import keypoints as kp
from rfdetr_fn.data import transforms as T
from rfdetr_fn.data.masks import decode_masks
from rfdetr_fn.data.source import DatasetError, Source, check_source
from rfdetr_fn.io import imageio


@dataclass(frozen=True)
class Pipeline:
    """How samples are transformed: `train` enables augmentation; `scales` are the square sides to draw."""

    train: bool
    resolution: int
    scales: tuple[int, ...]
    scale_jitter: bool = True
    augmentations: dict | None = None  # an aug_config; None = the default preset (horizontal flip)


class DetectionDataset(torch.utils.data.Dataset):
    """Serves (image (3,h,w) float32 normalised, target) pairs and COCO ground truth in label space.

    Index with an int (augmentation seeded by the dataset seed and the index) or with an
    `(index, sample seed)` pair from the training sampler, so every epoch and every padded
    repeat of a sample draws fresh, reproducible augmentation even in persistent workers.
    """

    def __init__(
        self,
        source: Source,
        pipeline: Pipeline,
        *,
        masks: bool = False,
        seed: int = 0,
        block_size: int = 32,
        keypoints: bool = False,
    ) -> None:
        images, records, problems, boxes_report = check_source(source)
        if problems:
            shown = "\n  ".join(problems[:200])
            more = f"\n  ... and {len(problems) - 200} more" if len(problems) > 200 else ""
            raise DatasetError(f"{source.name}: {len(problems)} problem(s):\n  {shown}{more}")
        if not images:
            raise DatasetError(f"{source.name}: empty split (no images)")
        if boxes_report:
            warnings.warn(f"{source.name}: {boxes_report}", stacklevel=2)
        self.source_name = source.name
        self.images = images
        self.records = records
        self.categories = source.categories
        self.cat2label = dict(source.cat2label)
        self.label2cat = {label: cat for cat, label in self.cat2label.items()}
        self.class_names = list(source.class_names)
        self.num_classes = source.num_classes
        self.image_dir = source.image_dir
        self.render = source.render
        self.pipeline = pipeline
        self.masks = masks
        self.seed = seed
        self.block_size = block_size
        self.keypoint_schema, self.keypoint_names = kp.label_schema(
            source.categories, source.annotations, self.cat2label
        )
        self.keypoint_skeleton = kp.label_skeleton(source.categories, self.cat2label, self.keypoint_schema)
        self.keypoints = keypoints
        if keypoints and not self.keypoint_schema:
            raise DatasetError(f"{source.name}: a keypoint model needs keypoint annotations; this split has none")
        flip = source.flip_pairs
        self.flip_pairs = flip if flip is not None else kp.merged_flip_pairs(self.keypoint_schema, self.keypoint_names)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path | None:
        return None if self.image_dir is None else self.image_dir / self.images[index]["file_name"]

    def load_image(self, index: int) -> Image.Image:
        """Decode one image as RGB; an unreadable file raises DatasetError naming it."""
        entry = self.images[index]
        if self.render is not None:
            return self.render(entry)
        path = self.image_path(index)
        try:
            with Image.open(path) as im:
                return imageio.to_rgb(im)
        except imageio.READ_ERRORS as exc:
            raise DatasetError(imageio.read_error(path, exc)) from exc

    def raw_target(self, index: int, height: int, width: int) -> dict[str, Tensor]:
        """Non-crowd instances in original pixels (boxes re-clipped to the decoded size)."""
        rec = self.records[index]
        keep = ~rec.iscrowd
        boxes = torch.from_numpy(rec.boxes[keep]).reshape(-1, 4).clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target = {"boxes": boxes, "labels": torch.from_numpy(rec.labels[keep])}
        if self.keypoints:
            target["keypoints"] = kp.clean(torch.from_numpy(rec.keypoints[keep]).clone(), height, width)
        if self.masks:
            segs = [s for s, k in zip(rec.segmentations, keep) if k]
            target["masks"] = decode_masks(segs, height, width)
        return T.drop_degenerate(target)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(key, tuple):
            index, seed = int(key[0]), int(key[1])
        else:
            index = int(key)
            seed = rng.mix(self.seed, 0, index)
        pil = self.load_image(index)
        image = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        h, w = image.shape[-2:]
        target = self.raw_target(index, h, w)
        p = self.pipeline
        if p.train:
            gen = torch.Generator().manual_seed(seed)
            image, target = augment.train_transform(
                image,
                target,
                scales=p.scales,
                scale_jitter=p.scale_jitter,
                gen=gen,
                config=p.augmentations,
                flip_pairs=self.flip_pairs,
            )
        else:
            image, target = T.eval_transform(image, target, p.resolution)
        image, target = T.finalize(image, target)
        target["image_id"] = torch.tensor(self.images[index]["id"], dtype=torch.int64)
        target["orig_size"] = torch.tensor([h, w], dtype=torch.int64)
        return image, target

    def coco_gt(self) -> dict:
        """COCO ground truth in LABEL space: crowd regions included (iscrowd=1), boxes in original pixels."""
        anns = []
        next_id = 1
        for entry, rec in zip(self.images, self.records):
            for k in range(len(rec.labels)):
                x1, y1, x2, y2 = (float(v) for v in rec.boxes[k])
                ann = {
                    "id": next_id,
                    "image_id": entry["id"],
                    "category_id": int(rec.labels[k]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": rec.areas[k],
                    "iscrowd": int(rec.iscrowd[k]),
                }
                if rec.segmentations[k]:
                    ann["segmentation"] = rec.segmentations[k]
                if rec.keypoints is not None:
                    label, schema = ann["category_id"], self.keypoint_schema
                    points = rec.keypoints[k, : schema[label] if label < len(schema) else 0]
                    ann["keypoints"] = [float(v) for v in points.reshape(-1)]
                    ann["num_keypoints"] = int((points[:, 2] > 0).sum())
                anns.append(ann)
                next_id += 1
        categories = [
            {"id": label, "name": self.class_names[label] if label < len(self.class_names) else str(label)}
            for label in sorted(self.label2cat)
        ]
        for cat in categories:  # keypoint datasets: the names give evaluation each category's keypoint count
            if cat["id"] < len(self.keypoint_schema) and self.keypoint_schema[cat["id"]]:
                count, names = self.keypoint_schema[cat["id"]], self.keypoint_names[cat["id"]]
                cat["keypoints"] = names or [f"keypoint_{i}" for i in range(count)]
        return {"images": [dict(im) for im in self.images], "annotations": anns, "categories": categories}


def check_images(datasets: list) -> None:
    """Every image header of every split, all problems in one error (an epoch must not end on a bad file)."""
    items: dict[Path, tuple[Path, int, int]] = {}
    for ds in datasets:
        if ds is not None and ds.render is None and ds.image_dir is not None:
            for i, entry in enumerate(ds.images):
                path = ds.image_path(i)
                items.setdefault(path, (path, entry["width"], entry["height"]))
    bad, odd = imageio.check_headers(list(items.values()))
    if odd:
        shown = "\n  ".join(odd[:10]) + (f"\n  ... and {len(odd) - 10} more" if len(odd) > 10 else "")
        warnings.warn(
            f"{len(odd)} image(s) differ in size from their annotation (boxes may be in another frame):\n  {shown}",
            stacklevel=3,
        )
    if bad:
        shown = "\n  ".join(bad[:200]) + (f"\n  ... and {len(bad) - 200} more" if len(bad) > 200 else "")
        raise DatasetError(f"{len(bad)} unusable image(s) found before training (all splits checked):\n  {shown}")
