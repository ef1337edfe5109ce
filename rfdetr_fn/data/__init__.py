"""Datasets, transforms and loaders: Roboflow COCO, raw COCO 2017, YOLO, and built-in synthetic shapes.

ds = build_dataset(data_cfg, "train", model_cfg, train_cfg, train=True)
loader = train_loader(ds, train_cfg, data_cfg, seed=train_cfg.seed)
for epoch in range(n):
    loader.sampler.set_epoch(epoch)
    for step, batch in enumerate(loader):
        batch = resize_batch(batch, per_batch_scale(global_step, scales))  # per-batch multi-scale
"""

from __future__ import annotations

import warnings
from pathlib import Path

from rfdetr_fn.config import DataConfig, ModelConfig, TrainConfig
from rfdetr_fn.data import augment
from rfdetr_fn.data.coco import ROBOFLOW_ANNOTATIONS, coco2017_source, filter_parent_categories, roboflow_source
from rfdetr_fn.data.dataset import DetectionDataset, Pipeline, check_images
from rfdetr_fn.data.loader import (
    TARGET_KEYS,
    collate,
    epoch_indices,
    epoch_length,
    eval_loader,
    num_train_batches,
    target_slots,
    train_loader,
)
from rfdetr_fn.data.source import DatasetError, Source
from rfdetr_fn.data.synthetic import synthetic_source
from rfdetr_fn.data.transforms import multi_scale_scales, per_batch_scale, resize_batch
from rfdetr_fn.data.yolo import find_yaml, yolo_source

__all__ = [
    "check_images",
    "TARGET_KEYS",
    "DatasetError",
    "DetectionDataset",
    "Pipeline",
    "build_dataset",
    "check_class_names",
    "check_keypoint_schema",
    "collate",
    "detect_format",
    "epoch_indices",
    "epoch_length",
    "eval_loader",
    "filter_parent_categories",
    "multi_scale_scales",
    "num_train_batches",
    "per_batch_scale",
    "resize_batch",
    "target_slots",
    "train_loader",
    "train_scales",
]

SPLITS = ("train", "valid", "val", "test")


def detect_format(data_cfg: DataConfig) -> str:
    """'synthetic' without a dataset_dir; else the explicit format, or the first layout found on disk."""
    if data_cfg.dataset_dir is None or data_cfg.dataset_format == "synthetic":
        return "synthetic"
    root = Path(data_cfg.dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset_dir not found")
    if data_cfg.dataset_format != "auto":
        return data_cfg.dataset_format
    if (root / "train" / ROBOFLOW_ANNOTATIONS).is_file():
        return "roboflow"
    if any((root / "annotations" / f"instances_{p}2017.json").is_file() for p in ("train", "val")):
        return "coco"
    if find_yaml(root) is not None:
        return "yolo"
    raise DatasetError(
        f"{root}: no dataset layout recognised (looked for train/{ROBOFLOW_ANNOTATIONS}, "
        "annotations/instances_{train,val}2017.json, data.yaml/data.yml)"
    )


def load_source(data_cfg: DataConfig, split: str) -> Source:
    """The split in COCO form, whatever the layout."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    fmt = detect_format(data_cfg)
    if fmt == "synthetic":
        return synthetic_source(data_cfg, split)
    root = Path(data_cfg.dataset_dir)
    readers = {"roboflow": roboflow_source, "coco": coco2017_source, "yolo": yolo_source}
    return readers[fmt](root, split)


def train_scales(model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[int, ...]:
    """Square sides a training sample may be resized to: the scale list (per-sample), its largest entry
    (per-batch: the batch is resized later), or just the resolution (off)."""
    if train_cfg.multi_scale == "off":
        return (model_cfg.resolution,)
    scales = multi_scale_scales(
        model_cfg.resolution, train_cfg.expanded_scales, model_cfg.patch_size, model_cfg.num_windows
    )
    return tuple(scales) if train_cfg.multi_scale == "per-sample" else (max(scales),)


def check_class_names(explicit: tuple[str, ...] | list[str], found: list[str], where: str) -> list[str]:
    """Explicit names win, but a Roboflow parent-category shift (the dataset's names preceded by extra
    entries) is an error, and any other mismatch a warning."""
    explicit, found = list(explicit), [n for n in found]
    if explicit == found:
        return explicit
    extra = len(explicit) - len(found)
    if extra > 0 and explicit[extra:] == found:
        raise ValueError(
            f"class_names {explicit} hold the names of {where} ({found}) after {extra} extra entr(y/ies) "
            "above them: a parent category was probably kept; drop the extra name(s)"
        )
    if sorted(explicit) == sorted(found):
        warnings.warn(
            f"class_names are a reordering of {where}'s names {found}; labels follow the dataset order",
            stacklevel=3,
        )
    else:
        warnings.warn(f"class_names {explicit} differ from {where}'s names {found}", stacklevel=3)
    return explicit


def build_dataset(
    data_cfg: DataConfig, split: str, model_cfg: ModelConfig, train_cfg: TrainConfig, train: bool
) -> DetectionDataset:
    """A torch Dataset of (image, target) for `split` ('train', 'valid'/'val' or 'test').

    train=True enables augmentation and the multi-scale mode of train_cfg; masks are decoded when the
    model has a segmentation head, keypoints when it is a keypoint model (whose schema must be the
    split's: see `check_keypoint_schema`)."""
    if model_cfg.num_channels != 3:
        raise DatasetError(
            f"model.num_channels={model_cfg.num_channels}: the dataset readers decode RGB images (3 channels); "
            "other channel counts are for batches you build and pass to rfdetr_fn.apply yourself"
        )
    source = load_source(data_cfg, split)
    pipeline = Pipeline(
        train=train,
        resolution=model_cfg.resolution,
        scales=train_scales(model_cfg, train_cfg) if train else (model_cfg.resolution,),
        scale_jitter=train_cfg.scale_jitter,
        augmentations=augment.resolve(train_cfg.aug_preset, train_cfg.aug_config),
    )
    ds = DetectionDataset(
        source,
        pipeline,
        masks=model_cfg.segmentation_head,
        seed=train_cfg.seed,
        block_size=model_cfg.block_size,
        keypoints=model_cfg.keypoints,
    )
    if data_cfg.class_names is not None:
        ds.class_names = check_class_names(data_cfg.class_names, ds.class_names, source.name)
    if train and not any(len(r.labels) for r in ds.records):
        warnings.warn(
            f"{source.name}: the train split has no annotations: the model can learn only background", stacklevel=2
        )
    if model_cfg.keypoints and not train:  # the train split defines the schema (fit aligns the model to it)
        check_keypoint_schema(model_cfg.num_keypoints_per_class, ds.keypoint_schema, source.name)
    return ds


def check_same_categories(train: DetectionDataset, others: list[DetectionDataset | None]) -> None:
    """Every split must name each category id as the train split does: scoring "cat" detections against
    "dog" boxes would report a meaningless mAP."""
    names = {int(c["id"]): str(c.get("name", "")) for c in train.categories}
    problems = [
        f"category id {int(c['id'])} is {names[int(c['id'])]!r} in {train.source_name} but {c.get('name')!r} "
        f"in {ds.source_name}"
        for ds in others
        if ds is not None
        for c in ds.categories
        if int(c["id"]) in names and str(c.get("name", "")) != names[int(c["id"])]
    ]
    if problems:
        raise DatasetError("the splits name the same category differently:\n  " + "\n  ".join(problems[:20]))


def check_keypoint_schema(model: tuple[int, ...], found: tuple[int, ...], where: str) -> None:
    """A keypoint model trains and scores only data with its own schema (keypoints per class)."""
    if tuple(model) != tuple(found):
        raise DatasetError(
            f"{where}: keypoints per class {list(found)} differ from the model's num_keypoints_per_class "
            f"{list(model)} (every split must share the train split's keypoint schema)"
        )
