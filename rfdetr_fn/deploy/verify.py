"""Export-time verification: the written file, run by its runtime on a fixed input, against `rf.apply`.

fp32 files must agree to `TOLERANCE` on every output; fp16 (--half) files to `HALF_TOLERANCE`, the bound
relative to each output's largest |value|, against rf.apply on the same fp16 weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rfdetr_fn import tree
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.deploy.graph import OUTPUTS, ExportError, example_input, output_names, reference_kernels
from rfdetr_fn.model import detector
from rfdetr_fn.tree import Params

TOLERANCE = 1e-4  # fp32: absolute, every output element
HALF_TOLERANCE = 1e-2  # fp16: |difference| / max(1, largest |reference value|); measured 6e-4 (tiny, onnxruntime CPU)

Runner = Callable[[Tensor], dict[str, Tensor]]


def differences(
    run: Runner, params: Params, cfg: ModelConfig, images: Tensor, *, relative: bool = False
) -> dict[str, float]:
    """Largest |exported - rf.apply| per output name on `images` (over max(1, |reference|) when `relative`),
    queries matched first (see `match_queries`)."""
    with reference_kernels(), torch.no_grad():
        ref = detector.apply(params, images, None, cfg, train=False)
        got = run(images)
    names = output_names(cfg)
    expected = {n: ref[OUTPUTS[n]].float().cpu() for n in names}
    actual = {n: got[n].float().cpu() for n in names}
    for n in names:
        if expected[n].shape != actual[n].shape:
            shapes = f"{tuple(actual[n].shape)}, rf.apply {tuple(expected[n].shape)}"
            raise ExportError(f"exported output {n} has shape {shapes}")
    order = match_queries(expected["dets"], expected["labels"], actual["dets"], actual["labels"])
    out = {}
    for n in names:
        e = torch.stack([expected[n][b, order[b]] for b in range(len(order))]) if len(order) else expected[n]
        worst = float((e - actual[n]).abs().max()) if e.numel() else 0.0
        out[n] = worst / max(1.0, float(e.abs().max())) if relative and e.numel() else worst
    return out


def match_queries(boxes: Tensor, logits: Tensor, boxes2: Tensor, logits2: Tensor) -> list[Tensor]:
    """Per image, the reference query behind each exported query.

    Queries come in the two-stage top-k's order; proposals whose scores differ by float rounding (about 1e-6
    on untrained weights) may swap places between runtimes, which reorders whole queries without changing a
    detection. Each exported query takes its nearest reference query (boxes and logits); when that is not
    a one-to-one matching the order is kept as it is, so a real difference still shows."""
    ref, got = torch.cat([boxes, logits], -1), torch.cat([boxes2, logits2], -1)
    out = []
    for b in range(ref.shape[0]):
        nearest = torch.cdist(got[b], ref[b]).argmin(-1)
        one_to_one = nearest.unique().numel() == nearest.numel()
        out.append(nearest if one_to_one else torch.arange(ref.shape[1]))
    return out


def verify(
    run: Runner, params: Params, cfg: ModelConfig, batches: list[int], *, half: bool, where: str
) -> dict[int, dict[str, float]]:
    """Differences at each batch size; an ExportError quoting them when one is beyond the bound.

    An fp16 file is compared with `rf.apply` on the same fp16 parameters (what the export must preserve),
    relative to each output's largest |value|: fp16 against fp32 is the model's precision, not the export's
    (on the test models it flips the two-stage top-k, so whole queries differ)."""
    if half:
        params = tree.map_(lambda t: t.half(), params)
    figures = {}
    for batch in batches:
        images = example_input(cfg, batch, seed=batch)
        figures[batch] = differences(run, params, cfg, images, relative=half)
    bound = HALF_TOLERANCE if half else TOLERANCE
    bad = {b: d for b, d in figures.items() if any(v > bound or v != v for v in d.values())}
    if bad:
        raise ExportError(f"{where}: exported outputs differ from rf.apply beyond {bound:g}: {describe(bad)}")
    return figures


def describe(figures: dict[int, dict[str, float]]) -> str:
    """'batch 1: dets 2.4e-07, labels 1.9e-06; batch 2: ...'"""
    return "; ".join(
        f"batch {b}: " + ", ".join(f"{name} {v:.2g}" for name, v in diffs.items()) for b, diffs in figures.items()
    )
