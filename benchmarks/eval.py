"""Evaluation cost at COCO-val scale: predict / accumulate / COCOeval / F1 per backend, peak memory.

    python benchmarks/eval.py --images 5000
    python benchmarks/eval.py --images 500 --kinds bbox --backends faster_coco_eval

A synthetic COCO-val-sized set (default 5,000 images of 640x480, ~7.2 objects per image over 80 skewed
classes, 1 % crowd regions, object sizes log-uniform from 8 to 400 px) is evaluated the way `validate` does
it, minus the model: synthetic raw outputs (300 queries, jittered copies of the ground truth among random
proposals) go through `postprocess` (100 detections per image: "predict"), `Evaluator.update` per batch
("accumulate": COCO columns, masks to RLE), then `Evaluator.compute` (COCOeval bbox [+ segm] and the F1 sweep).
`segm` runs the same set at reduced resolution (`--mask-scale`, 4 = 160x120 images) with masks.
Each (kind, backend) runs in its own subprocess; peak memory is that process's peak RSS per phase
(VmHWM, reset between phases through /proc/self/clear_refs) and overall.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
from pycocotools import mask as mask_utils
from train_step import peak_rss_gib, reset_peak_rss  # benchmarks/ is on sys.path: the script's folder

NUM_CLASSES = 80
QUERIES = 300
SELECT = 100
BATCH = 8


def synthetic_gt(images: int, height: int, width: int, *, masks: bool, seed: int = 0) -> dict:
    """COCO ground truth in label space: boxes (and ellipse masks as RLE when `masks`)."""
    rng = np.random.default_rng(seed)
    class_p = 1.0 / np.arange(1, NUM_CLASSES + 1) ** 0.8  # a few frequent classes, a long tail (COCO-like)
    class_p /= class_p.sum()
    scale = height / 480.0
    anns, imgs = [], []
    for image_id in range(1, images + 1):
        imgs.append({"id": image_id, "height": height, "width": width})
        n = rng.poisson(7.2)
        side = np.exp(rng.uniform(np.log(8), np.log(400), n)) * scale
        aspect = np.exp(rng.normal(0, 0.4, n))
        w = np.clip(side * aspect, 2, width)
        h = np.clip(side / aspect, 2, height)
        x = rng.uniform(0, width - w)
        y = rng.uniform(0, height - h)
        labels = rng.choice(NUM_CLASSES, n, p=class_p)
        crowd = rng.random(n) < 0.01
        rles = _ellipse_rles(np.stack([x, y, x + w, y + h], 1), height, width) if masks else None
        for k in range(n):
            ann = {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": int(labels[k]),
                "bbox": [float(x[k]), float(y[k]), float(w[k]), float(h[k])],
                "area": float(w[k] * h[k] * (np.pi / 4 if masks else 1.0)),
                "iscrowd": int(crowd[k]),
            }
            if masks:
                ann["segmentation"] = rles[k]
            anns.append(ann)
    categories = [{"id": c, "name": f"class{c}"} for c in range(NUM_CLASSES)]
    return {"images": imgs, "annotations": anns, "categories": categories}


def _ellipse_rles(xyxy: np.ndarray, height: int, width: int) -> list[dict]:
    if len(xyxy) == 0:
        return []
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    cx, cy = (xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2
    rx, ry = (xyxy[:, 2] - xyxy[:, 0]) / 2, (xyxy[:, 3] - xyxy[:, 1]) / 2
    inside = ((xs[None] - cx[:, None, None]) / rx[:, None, None]) ** 2 + (
        (ys[None] - cy[:, None, None]) / ry[:, None, None]
    ) ** 2 <= 1
    rles = mask_utils.encode(np.asfortranarray(inside.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def synthetic_outputs(gt_by_image: list[list[dict]], height: int, width: int, rng, *, masks: bool) -> dict:
    """Raw model outputs for one batch: jittered ground truth (and some duplicates) among random proposals."""
    b = len(gt_by_image)
    logits = rng.normal(-4.5, 1.2, (b, QUERIES, NUM_CLASSES + 1)).astype(np.float32)
    boxes = np.concatenate([rng.uniform(0.1, 0.9, (b, QUERIES, 2)), rng.uniform(0.02, 0.5, (b, QUERIES, 2))], -1)
    for i, anns in enumerate(gt_by_image):
        for q, ann in enumerate(anns[: QUERIES // 2]):
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0, 0.07, 4)
            cx, cy = x + w / 2 + jitter[0] * w, y + h / 2 + jitter[1] * h
            boxes[i, q] = [cx / width, cy / height, w * np.exp(jitter[2]) / width, h * np.exp(jitter[3]) / height]
            label = ann["category_id"] if rng.random() > 0.1 else int(rng.integers(NUM_CLASSES))
            logits[i, q, label] = rng.normal(0.5, 1.5)
            if rng.random() < 0.3:  # a lower-scoring duplicate
                dup = QUERIES // 2 + q
                boxes[i, dup] = boxes[i, q] * np.exp(rng.normal(0, 0.05, 4))
                logits[i, dup, label] = logits[i, q, label] - abs(rng.normal(1.5, 1.0))
    out = {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes.astype(np.float32))}
    if masks:  # ellipse logits at a quarter of the image, like the segmentation head
        hq, wq = height // 4, width // 4
        ys = (torch.arange(hq, dtype=torch.float32) + 0.5) / hq
        xs = (torch.arange(wq, dtype=torch.float32) + 0.5) / wq
        bx = out["pred_boxes"]
        dx = (xs[None, None, None, :] - bx[..., 0, None, None]) / (bx[..., 2, None, None] / 2)
        dy = (ys[None, None, :, None] - bx[..., 1, None, None]) / (bx[..., 3, None, None] / 2)
        out["pred_masks"] = 4.0 * (1.0 - dx**2 - dy**2)
    return out


def run_one(kind: str, backend: str, args: argparse.Namespace) -> dict:
    """One (kind, backend) evaluation in this process -> phase times (s) and peak RSS (MiB)."""
    from rfdetr_fn.eval.coco import Evaluator
    from rfdetr_fn.model.postprocess import postprocess

    torch.set_num_threads(args.threads)
    masks = kind == "segm"
    height, width = (480 // args.mask_scale, 640 // args.mask_scale) if masks else (480, 640)
    gt = synthetic_gt(args.images, height, width, masks=masks, seed=args.seed)
    by_image: list[list[dict]] = [[] for _ in gt["images"]]
    for ann in gt["annotations"]:
        if not ann["iscrowd"]:
            by_image[ann["image_id"] - 1].append(ann)
    rng = np.random.default_rng(args.seed + 1)
    sizes = torch.tensor([[height, width]] * BATCH)
    baseline = peak_rss_gib() * 1024
    times = {"predict": [0.0, 0.0], "accumulate": [0.0, 0.0]}  # wall, CPU seconds
    peaks = {}
    reset_peak_rss()
    evaluator = Evaluator(gt, backend=backend)
    for start in range(0, args.images, BATCH):
        ids = list(range(start + 1, min(start + BATCH, args.images) + 1))
        out = synthetic_outputs([by_image[i - 1] for i in ids], height, width, rng, masks=masks)
        clock = [(time.perf_counter(), time.process_time())]
        preds = postprocess(out, sizes[: len(ids)], SELECT)
        clock.append((time.perf_counter(), time.process_time()))
        evaluator.update(preds, ids)
        clock.append((time.perf_counter(), time.process_time()))
        for name, (a, b) in zip(("predict", "accumulate"), zip(clock, clock[1:])):
            times[name] = [times[name][0] + b[0] - a[0], times[name][1] + b[1] - a[1]]
    peaks["predict+accumulate"] = peak_rss_gib() * 1024
    reset_peak_rss()
    phase: dict[str, tuple[float, float]] = {}
    metrics = evaluator.compute(timings=phase)
    peaks["compute"] = peak_rss_gib() * 1024
    times.update(phase)
    return {
        "kind": kind,
        "backend": backend,
        "images": args.images,
        "gt_boxes": sum(len(b) for b in by_image),
        "detections": evaluator.num_detections,
        "times": times,
        "peak_mib": {"baseline": baseline, **peaks},
        "metrics": {k: metrics[k] for k in ("mAP_50_95", "mAP_50", "F1") + (("segm_mAP_50_95",) if masks else ())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--kinds", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    parser.add_argument("--backends", nargs="+", default=["faster_coco_eval", "pycocotools"])
    parser.add_argument("--mask-scale", type=int, default=4, help="segm images are 640x480 divided by this")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription when shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, backend = args.child.split(":")
        print("RESULT " + json.dumps(run_one(kind, backend, args)))
        return
    rows = []
    load_before = os.getloadavg()
    for kind in args.kinds:
        for backend in args.backends:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", f"{kind}:{backend}"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{kind} {backend} failed")
            rows.append(json.loads(line[0][7:]))
    print(
        f"\nevaluation: {args.images} images, {SELECT} detections per image; {platform.machine()} "
        f"{os.cpu_count()} CPUs, {args.threads} torch thread(s), torch {torch.__version__}, numpy {np.__version__}; "
        f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    phases = ["predict", "accumulate", "coco_bbox", "coco_segm", "f1"]
    head = "| kind | backend | GT boxes | detections | " + " | ".join(f"{p} s" for p in phases)
    head += " | total s | CPU s | vs first (CPU) | peak accumulate MiB | peak compute MiB | mAP 50:95 | F1 |"
    print("each phase: wall seconds (CPU seconds of this process)")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        wall = sum(t[0] for t in r["times"].values())
        cpu = sum(t[1] for t in r["times"].values())
        first = next(x for x in rows if x["kind"] == r["kind"])
        ratio = sum(t[1] for t in first["times"].values()) / cpu
        cells = " | ".join(
            f"{r['times'][p][0]:.1f} ({r['times'][p][1]:.1f})" if p in r["times"] else "-" for p in phases
        )
        m = r["metrics"]
        ap = f"{m['mAP_50_95']:.4f}" + (f" / segm {m['segm_mAP_50_95']:.4f}" if "segm_mAP_50_95" in m else "")
        print(
            f"| {r['kind']} | {r['backend']} | {r['gt_boxes']} | {r['detections']} | {cells} | {wall:.1f} | "
            f"{cpu:.1f} | {ratio:.2f}x | {r['peak_mib']['predict+accumulate']:.0f} | "
            f"{r['peak_mib']['compute']:.0f} | {ap} | {m['F1']:.4f} |"
        )


if __name__ == "__main__":
    main()
