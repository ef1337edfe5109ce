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

NEAR_TIE = 1e-4  # top-k scores closer than this may trade ranks between runtimes
TRIES = 8  # fixed inputs tried before a near-tied difference counts as a failure
SKIPPED = "near-tied inputs skipped"  # reported with the figures, not held to the bound

Runner = Callable[[Tensor], dict[str, Tensor]]


def differences(
    run: Runner, params: Params, cfg: ModelConfig, images: Tensor, *, relative: bool = False
) -> tuple[dict[str, float], float]:
    """Largest |exported - rf.apply| per output name on `images` (over max(1, |reference|) when `relative`),
    and the smallest gap between adjacent two-stage top-k scores of the reference (see `verify`)."""
    with reference_kernels(), torch.no_grad():
        ref = detector.apply(params, images, None, cfg, train=False)
        got = run(images)
    out = {}
    for name in output_names(cfg):
        expected, actual = ref[OUTPUTS[name]].float().cpu(), got[name].float().cpu()
        if expected.shape != actual.shape:
            shapes = f"{tuple(actual.shape)}, rf.apply {tuple(expected.shape)}"
            raise ExportError(f"exported output {name} has shape {shapes}")
        worst = float((expected - actual).abs().max()) if expected.numel() else 0.0
        out[name] = worst / max(1.0, float(expected.abs().max())) if relative and expected.numel() else worst
    scores = ref["enc_outputs"]["pred_logits"].float().amax(-1)  # the top-k's scores, in rank order
    gap = float((scores[:, :-1] - scores[:, 1:]).abs().min()) if scores.shape[1] > 1 else float("inf")
    return out, gap


def verify(
    run: Runner, params: Params, cfg: ModelConfig, batches: list[int], *, half: bool, where: str
) -> dict[int, dict[str, float]]:
    """Differences at each batch size; an ExportError quoting them when one is beyond the bound.

    The two-stage top-k ranks proposals by score and each rank has its own query embedding, so two proposals
    whose scores differ by float rounding (about 1e-6; common on untrained weights) may trade ranks between
    runtimes and change every output (self-attention mixes the queries). Such an input cannot tell a good
    export from a bad one: when the reference's closest top-k scores are within NEAR_TIE and the outputs
    differ, the next fixed input is tried (up to TRIES), and the figures say how many were skipped.

    An fp16 file is compared with `rf.apply` on the same fp16 parameters (what the export must preserve),
    relative to each output's largest |value|: fp16 against fp32 is the model's precision, not the export's."""
    if half:
        params = tree.map_(lambda t: t.half(), params)
    bound = HALF_TOLERANCE if half else TOLERANCE
    figures = {}
    for batch in batches:
        for attempt in range(TRIES):
            images = example_input(cfg, batch, seed=batch + 1000 * attempt)
            diffs, gap = differences(run, params, cfg, images, relative=half)
            if all(v <= bound for v in diffs.values()) or gap >= NEAR_TIE:
                break
        figures[batch] = {**diffs, SKIPPED: float(attempt)} if attempt else diffs
    bad = {b: d for b, d in figures.items() if any(v > bound or v != v for k, v in d.items() if k != SKIPPED)}
    if bad:
        raise ExportError(f"{where}: exported outputs differ from rf.apply beyond {bound:g}: {describe(bad)}")
    return figures


def describe(figures: dict[int, dict[str, float]]) -> str:
    """'batch 1: dets 2.4e-07, labels 1.9e-06; batch 2: ...'"""
    return "; ".join(
        f"batch {b}: " + ", ".join(f"{k} {v:.2g}" if k != SKIPPED else f"{k} {v:.0f}" for k, v in diffs.items())
        for b, diffs in figures.items()
    )
