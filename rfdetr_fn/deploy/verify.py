"""Export-time verification: the written file, run by its runtime on a fixed input, against `rf.apply`.

fp32 files must agree to `TOLERANCE` on every output; fp16 (--half) files to `HALF_TOLERANCE`, the bound
measured on the test models (see README, Export), relative to each output's largest |value|.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rfdetr_fn.config import ModelConfig
from rfdetr_fn.deploy.graph import OUTPUTS, ExportError, example_input, output_names, reference_kernels
from rfdetr_fn.model import detector
from rfdetr_fn.tree import Params

TOLERANCE = 1e-4  # fp32: absolute, every output element
HALF_TOLERANCE = 5e-2  # fp16: absolute, relative to max(1, largest |reference value|)

Runner = Callable[[Tensor], dict[str, Tensor]]


def differences(run: Runner, params: Params, cfg: ModelConfig, images: Tensor) -> dict[str, float]:
    """Largest |exported - rf.apply| per output name on `images`, scaled by max(1, |reference|) when asked."""
    with reference_kernels(), torch.no_grad():
        ref = detector.apply(params, images, None, cfg, train=False)
        got = run(images)
    out = {}
    for name in output_names(cfg):
        expected, actual = ref[OUTPUTS[name]].float().cpu(), got[name].float().cpu()
        if expected.shape != actual.shape:
            raise ExportError(
                f"exported output {name} has shape {tuple(actual.shape)}, rf.apply {tuple(expected.shape)}"
            )
        out[name] = float((expected - actual).abs().max()) if expected.numel() else 0.0
    return out


def verify(
    run: Runner, params: Params, cfg: ModelConfig, batches: list[int], *, half: bool, where: str
) -> dict[int, dict[str, float]]:
    """Differences at each batch size; an ExportError quoting them when one is beyond the bound."""
    figures = {}
    for batch in batches:
        images = example_input(cfg, batch, seed=batch)
        diffs = differences(run, params, cfg, images)
        if half:
            with torch.no_grad():
                ref = detector.apply(params, images, None, cfg, train=False)
            diffs = {k: v / max(1.0, float(ref[OUTPUTS[k]].abs().max())) for k, v in diffs.items()}
        figures[batch] = diffs
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
