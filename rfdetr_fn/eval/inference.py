"""Inference on raw images: `predict(params, cfg, images)` -> boxes in original pixels, scores, labels.

The command line around it lives in `rfdetr_fn.predict_cli` (`rfdetr_fn predict`).

Preprocessing is upstream's `RFDETR.predict`: uint8 RGB -> float [0, 1] (a true division by 255),
square bilinear resize to `cfg.resolution` without antialiasing, ImageNet normalisation. The
network sees the square image; boxes and masks come back at each image's original size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from rfdetr_fn import compiler
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.io import imageio
from rfdetr_fn.model import precision as precision_lib
from rfdetr_fn.model.postprocess import postprocess, postprocess_kwargs
from rfdetr_fn.tree import Params, leaves


def read_image(path: str | Path, where: str) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB; a missing or undecodable file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file {path} not found")
    try:
        return imageio.read_rgb(path)
    except imageio.READ_ERRORS as e:
        raise ValueError(f"{where}: {imageio.read_error(path, e)}") from e


def _to_array(image: Any, where: str) -> np.ndarray:
    """Path / PIL image / uint8 (H, W, 3) array -> uint8 (H, W, 3) RGB array."""
    if isinstance(image, (str, Path)):
        return read_image(image, where)
    if isinstance(image, Image.Image):
        return np.asarray(imageio.to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{where}: arrays must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        return image
    raise TypeError(f"{where}: expected a path, PIL image or uint8 ndarray, got {type(image).__name__}")


def preprocess(images: Sequence[Any], cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """Images -> normalised float32 batch (B, 3, res, res) and original sizes (B, 2) as (h, w)."""
    from rfdetr_fn.data.transforms import MEAN, STD  # here, not at import: the data package is 0.2 s

    batch, sizes = [], []
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    for i, image in enumerate(images):
        arr = _to_array(image, f"images[{i}]")
        x = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).float() / 255
        x = F.interpolate(
            x[None],
            size=(cfg.resolution, cfg.resolution),
            mode="bilinear",
            align_corners=False,
            antialias=False,
        )[0]
        batch.append((x - mean) / std)
        sizes.append(arr.shape[:2])
    return torch.stack(batch), torch.tensor(sizes, dtype=torch.int64)


Forward = Callable[[Params, Tensor, "Tensor | None"], dict]


def forward_fn(
    cfg: ModelConfig,
    device: torch.device | str = "cpu",
    *,
    compile: bool = False,
    cache_dir: str | Path | None = None,
    backend: str = "inductor",
    mode: str | None = None,
    precision: str = "fp32",
) -> Forward:
    """`detector.apply(params, images, mask, cfg, train=False)` bound to `cfg`; with compile, a regional
    fullgraph compiled function (one per config, device and backend in this process) whose artifacts are
    cached on disk like the train step's (`rfdetr_fn.compiler.CompileCache`). `precision` (resolved, see
    `rfdetr_fn.model.precision`) bf16 (CUDA or CPU) or fp16 (CUDA) runs under autocast, compiled or not."""
    if not compile:
        return functools.partial(_eval_apply, cfg=cfg, precision=precision)
    directory = Path(cache_dir) if cache_dir is not None else compiler.default_cache_dir()
    return _compiled_forward(cfg, torch.device(device).type, str(directory), backend, mode, precision)


def _eval_apply(
    params: Params, images: Tensor, mask: Tensor | None, *, cfg: ModelConfig, precision: str = "fp32"
) -> dict:
    return precision_lib.forward(params, images, mask, cfg, precision, train=False)


@functools.cache
def _compiled_forward(
    cfg: ModelConfig, device_type: str, directory: str, backend: str, mode: str | None, precision: str
) -> Forward:
    device = torch.device(device_type)
    key = compiler.cache_key(cfg, device=device, what="inference", backend=backend, mode=mode, precision=precision)
    cache = compiler.CompileCache(Path(directory), key)
    kind = precision_lib.compute_kind(device, precision)
    compiler.announce("the forward pass", kind, cache, cache.load(), "--eval.compile off", piece="inference")
    compiler.raise_recompile_limit(16)  # a last, shorter batch is one more shape
    forward = functools.partial(_eval_apply, cfg=cfg, precision=precision)
    compiled = compiler.compile_fn(forward, backend=backend, mode=mode)

    def run(params: Params, images: Tensor, mask: Tensor | None) -> dict:
        out = compiled(params, images, mask)
        cache.save_if_new()
        return out

    return run


def predict(
    params: Params,
    cfg: ModelConfig,
    images: Any,
    *,
    threshold: float = 0.5,
    compile: bool = False,
    precision: str = "fp32",
) -> list[dict[str, Tensor]]:
    """Detect objects in one image or a list of them (paths, PIL images, uint8 (H, W, 3) RGB arrays).

    Returns one dict per image with boxes (K, 4) xyxy in original pixels, scores (K,), labels (K,)
    and, for segmentation models, masks (K, H, W) bool, for keypoint models keypoints (K, max keypoints
    per class, 3) as pixel x, y and confidence (zeros past the label's count; scores are fused with the
    keypoint uncertainty, as upstream); only detections scoring above `threshold`.
    Runs on the device and dtype of `params`; `compile=True` uses the compiled forward (`forward_fn`).
    `precision` "auto" is bf16 autocast on a CPU with AMX-BF16/AVX512-BF16 or a CUDA GPU of compute
    capability >= 8, fp32 elsewhere (`rfdetr_fn.model.precision.resolve_precision`); bf16 forces it.
    """
    ref = next(leaves(params))
    resolved = precision_lib.resolve_precision(precision, ref.device)
    forward = forward_fn(cfg, ref.device, compile=compile, precision=resolved)
    return detect(
        lambda x: forward(params, x, None), cfg, images, threshold=threshold, device=ref.device, dtype=ref.dtype
    )


def detect(
    run: Callable[[Tensor], dict],
    cfg: ModelConfig,
    images: Any,
    *,
    threshold: float = 0.5,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, Tensor]]:
    """`predict` around any forward `run(batch) -> outputs` (apply's keys): the model, or an exported file
    (`rfdetr_fn.deploy`); same preprocessing, postprocess and threshold either way."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        images = [images]
    images = list(images)
    if not images:
        return []
    batch, sizes = preprocess(images, cfg)
    with torch.no_grad():
        out = run(batch.to(device, dtype))
        results = postprocess(out, sizes.to(out["pred_logits"].device), cfg.num_select, **postprocess_kwargs(cfg))
    kept = []
    for res in results:
        keep = res["scores"] > threshold
        det = {k: res[k][keep] for k in ("boxes", "scores", "labels")}
        if "masks" in res:
            det["masks"] = res["masks"][keep][:, 0]
        if "keypoints" in res:  # (K, max keypoints per class, 3): pixel x, y and confidence
            det["keypoints"] = res["keypoints"][keep]
        kept.append(det)
    return kept
