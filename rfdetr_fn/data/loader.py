"""Batching and sampling: fixed-shape collate, tiny-dataset replacement sampling, accumulation-aligned epochs.

The sampler yields `(index, sample seed)` pairs, the seed being `rng.mix(run seed, epoch, position)`, so
augmentation is a pure function of (run seed, epoch, position) and stays reproducible with persistent
DataLoader workers, any worker count and any rank.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from rfdetr_fn import rng
from rfdetr_fn.config import DataConfig, TrainConfig
from rfdetr_fn.losses import TARGET_KEYS  # noqa: F401  (re-exported: rfdetr_fn.data.TARGET_KEYS)

MIN_TRAIN_BATCHES = 5  # below this many effective batches a single process samples with replacement
PAD_SEED = 0  # fixed generator for the padding indices of an aligned epoch (as upstream)


# ------------------------------------------------------------------------------------------------ collate
def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _slots_for(count: int, pad: int) -> int:
    """Target slots for `count` targets: a multiple of `pad`, at least one multiple."""
    return max(pad, _round_up(count, pad))


def collate(
    samples: Sequence[tuple[Tensor, dict]], block_size: int, target_pad: int = 8, slots: int | None = None
) -> dict[str, Tensor]:
    """Stack samples into fixed-layout tensors.

    images (B,3,H,W) zero-padded bottom/right to the batch max rounded up to block_size; mask (B,H,W)
    True on padding; labels (B,T) with -1 in empty slots; boxes (B,T,4) zeros there; masks (B,T,H,W)
    when the targets have masks; image_id (B,), orig_size (B,2), size (B,2). T = `slots` when given (one
    shape for a whole run, for compiled steps), else the largest target count rounded up to a multiple of
    target_pad (at least target_pad).
    """
    if not samples:
        raise ValueError("collate: empty batch")
    B = len(samples)
    H = _round_up(max(img.shape[-2] for img, _ in samples), block_size)
    W = _round_up(max(img.shape[-1] for img, _ in samples), block_size)
    most = max(len(t["labels"]) for _, t in samples)
    T = _slots_for(most, target_pad) if slots is None else slots
    if most > T:
        crowded = next(t for _, t in samples if len(t["labels"]) == most)
        raise ValueError(
            f"collate: image_id {int(crowded['image_id'])} has {most} targets but the batch has {T} target slots"
        )
    with_masks = "masks" in samples[0][1]
    kp_shape = samples[0][1]["keypoints"].shape[1:] if "keypoints" in samples[0][1] else None
    images = torch.zeros((B, samples[0][0].shape[0], H, W), dtype=torch.float32)
    mask = torch.ones((B, H, W), dtype=torch.bool)
    labels = torch.full((B, T), -1, dtype=torch.int64)
    boxes = torch.zeros((B, T, 4), dtype=torch.float32)
    masks = torch.zeros((B, T, H, W), dtype=torch.bool) if with_masks else None
    keypoints = torch.zeros((B, T, *kp_shape), dtype=torch.float32) if kp_shape is not None else None
    for b, (img, t) in enumerate(samples):
        h, w = img.shape[-2:]
        n = len(t["labels"])
        images[b, :, :h, :w] = img
        mask[b, :h, :w] = False
        labels[b, :n] = t["labels"]
        boxes[b, :n] = t["boxes"]
        if masks is not None:
            masks[b, :n, :h, :w] = t["masks"]
        if keypoints is not None:
            keypoints[b, :n] = t["keypoints"]
    batch = {
        "images": images,
        "mask": mask,
        "labels": labels,
        "boxes": boxes,
        "image_id": torch.stack([torch.as_tensor(t["image_id"], dtype=torch.int64) for _, t in samples]),
        "orig_size": torch.stack([torch.as_tensor(t["orig_size"], dtype=torch.int64) for _, t in samples]),
        "size": torch.stack([torch.as_tensor(t["size"], dtype=torch.int64) for _, t in samples]),
    }
    if masks is not None:
        batch["masks"] = masks
    if keypoints is not None:
        batch["keypoints"] = keypoints
    return batch


# ------------------------------------------------------------------------------------------------ sampling
def uses_replacement(n: int, effective: int, world_size: int) -> bool:
    """Tiny datasets (fewer than 5 effective batches) in a single process sample with replacement."""
    return world_size == 1 and n < effective * MIN_TRAIN_BATCHES


def epoch_length(n: int, effective: int, world_size: int) -> int:
    """Samples in one epoch over all ranks.

    Replacement: effective*5. Otherwise n padded up to a multiple of effective*world_size, and under
    several ranks first raised to at least 5*effective*world_size (upstream's GradAccumAlignedDataset)."""
    if n <= 0:
        raise ValueError("cannot sample from an empty dataset")
    if uses_replacement(n, effective, world_size):
        return effective * MIN_TRAIN_BATCHES
    floor = effective * world_size * MIN_TRAIN_BATCHES if world_size > 1 else 0
    return _round_up(max(n, floor), effective * world_size)


def epoch_indices(
    n: int, effective: int, *, world_size: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0
) -> list[tuple[int, int]]:
    """This rank's (dataset index, sample seed) pairs for one epoch, in order.

    Every rank computes the same global list (padding from a fixed-seed generator, then a shuffle seeded
    by (seed, epoch)) and takes the positions rank, rank+world, ...; so shards are disjoint and cover it.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    length = epoch_length(n, effective, world_size)
    gen = torch.Generator().manual_seed(rng.mix(seed, epoch, 0))
    if uses_replacement(n, effective, world_size):
        order = torch.randint(n, (length,), generator=gen).tolist()
    else:
        pad = torch.randint(n, (length - n,), generator=torch.Generator().manual_seed(PAD_SEED)).tolist()
        pool = list(range(n)) + pad
        order = [pool[i] for i in torch.randperm(length, generator=gen).tolist()]
    return [(order[p], rng.mix(seed, epoch, p + 1)) for p in range(rank, length, world_size)]


class EpochSampler(Sampler):
    """Training sampler over `epoch_indices`; call `set_epoch(e)` before each epoch (and `skip` to resume)."""

    def __init__(
        self, n: int, effective: int, *, world_size: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0
    ) -> None:
        self.n, self.effective, self.world_size, self.rank, self.seed = n, effective, world_size, rank, seed
        self.epoch = epoch
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch; `skip` drops that many of this rank's first samples (exact resume)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pairs = epoch_indices(
            self.n,
            self.effective,
            world_size=self.world_size,
            rank=self.rank,
            seed=self.seed,
            epoch=self.epoch,
        )
        return iter(pairs[self.skip :])

    def __len__(self) -> int:
        return epoch_length(self.n, self.effective, self.world_size) // self.world_size - self.skip


class ShardSampler(Sampler):
    """Evaluation: positions rank, rank+world, ... in order, with no padding, so every image counts once."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ------------------------------------------------------------------------------------------------ loaders
WORKER_NICE = 10  # data-loader workers yield the CPU to the step's threads when both want it


def _worker_init(worker_id: int) -> None:
    """Lower the worker's priority (it already runs one torch thread): decoding and augmenting fill the
    cores the step leaves idle instead of taking the step's intra-op threads' time."""
    with contextlib.suppress(AttributeError, OSError):  # no nice (Windows) or not permitted
        os.nice(WORKER_NICE)


def _loader_kwargs(dataset: Dataset, workers: int, slots: int | None = None) -> dict:
    block = getattr(dataset, "block_size", 32)
    return dict(
        num_workers=workers,
        worker_init_fn=_worker_init if workers > 0 else None,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        collate_fn=functools.partial(collate, block_size=block, slots=slots),
    )


def target_slots(dataset: Dataset, pad: int = 8) -> int | None:
    """Target slots that fit every training sample of `dataset`: its most annotations on one image (the
    augmentations only ever drop boxes), rounded up to `pad`. None when the dataset does not say."""
    records = getattr(dataset, "records", None)
    if records is None:
        return None
    return _slots_for(max((len(r.labels) for r in records), default=0), pad)


def train_loader(
    dataset: Dataset,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    *,
    world_size: int = 1,
    rank: int = 0,
    seed: int,
    epoch: int = 0,
    slots: int | None = None,
) -> DataLoader:
    """Training batches of `train_cfg.batch_size` (drop_last) over this rank's shard of each epoch.

    Advance epochs with `loader.sampler.set_epoch(e)`; the batch order and augmentation then depend
    only on (seed, epoch), not on the number of workers. `slots` fixes the target axis (see `collate`)."""
    effective = train_cfg.batch_size * train_cfg.grad_accum_steps
    sampler = EpochSampler(len(dataset), effective, world_size=world_size, rank=rank, seed=seed, epoch=epoch)
    return DataLoader(
        dataset,
        batch_size=train_cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        **_loader_kwargs(dataset, data_cfg.num_workers, slots),
    )


def eval_loader(
    dataset: Dataset,
    train_cfg: TrainConfig | None = None,
    data_cfg: DataConfig | None = None,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    world_size: int = 1,
    rank: int = 0,
) -> DataLoader:
    """Sequential batches, last batch kept; strided shard per rank.

    batch_size / num_workers override the configs (train_cfg.eval_batch; data_cfg.num_workers)."""
    if batch_size is None:
        if train_cfg is None:
            raise ValueError("eval_loader needs batch_size or train_cfg")
        batch_size = train_cfg.eval_batch
    if num_workers is None:
        num_workers = data_cfg.num_workers if data_cfg is not None else 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), world_size, rank),
        drop_last=False,
        **_loader_kwargs(dataset, num_workers),
    )


def num_train_batches(n: int, train_cfg: TrainConfig, world_size: int = 1) -> int:
    """Micro-batches per epoch on each rank (what the LR schedule and epoch bookkeeping need)."""
    effective = train_cfg.batch_size * train_cfg.grad_accum_steps
    return epoch_length(n, effective, world_size) // world_size // train_cfg.batch_size
