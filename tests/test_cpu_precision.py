"""bf16 autocast on CPU: the `auto` rule from the CPU's flags, explicit bf16 on any CPU, fp16 CUDA-only,
and bf16's numbers against fp32 (train step losses over 20 steps, eval forward)."""

from __future__ import annotations

import pytest
import torch

import rfdetr_fn as rf
from rfdetr_fn.model import detector
from rfdetr_fn.model.precision import (
    cpu_bf16_units,
    cpu_flags,
    describe_cpu,
    explain_precision,
    forward,
    resolve_precision,
)
from rfdetr_fn.step import make_train_step
from tests.test_train import _tiny_setup

CPU = torch.device("cpu")
SAPPHIRE_RAPIDS = ["fpu", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
COOPER_LAKE = ["fpu", "avx512f", "avx512_bf16"]
SKYLAKE = ["fpu", "avx2", "avx512f"]


@pytest.mark.parametrize(
    ("flags", "units", "resolved"),
    [
        (SAPPHIRE_RAPIDS, ["amx_bf16", "avx512_bf16"], "bf16"),
        (COOPER_LAKE, ["avx512_bf16"], "bf16"),
        (SKYLAKE, [], "fp32"),
    ],
)
def test_auto_picks_bf16_on_cpus_with_bf16_matrix_units(flags, units, resolved):
    assert cpu_bf16_units(flags) == units
    assert resolve_precision("auto", CPU, flags) == resolved
    assert resolve_precision("fp32", CPU, flags) == "fp32"
    assert resolve_precision("bf16", CPU, flags) == "bf16"  # explicit bf16 runs on any CPU
    with pytest.raises(ValueError, match="fp16.*needs a CUDA device"):
        resolve_precision("fp16", CPU, flags)


def test_explain_says_why_auto_picked():
    assert explain_precision("auto", CPU, SAPPHIRE_RAPIDS) == "bf16 (auto: CPU has amx_bf16, avx512_bf16)"
    assert explain_precision("auto", CPU, SKYLAKE).startswith("fp32 (auto: CPU has no AMX-BF16 / AVX512-BF16")
    assert explain_precision("bf16", CPU, SKYLAKE) == "bf16"
    with pytest.raises(ValueError, match="expected auto, fp32, bf16 or fp16"):
        resolve_precision("bfloat16", CPU)


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f amx_bf16\n\nflags\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx512f", "amx_bf16"}
    assert isinstance(cpu_flags(tmp_path / "missing"), set)  # falls back to torch.cpu's probes
    described = describe_cpu(info)
    assert described == "X; avx512f yes, avx512_bf16 NO, amx_bf16 yes; bf16 matrix units: amx_bf16"


def test_bf16_train_steps_on_cpu_stay_close_to_fp32():
    """20 steps of the tiny preset. The total loss moves in discrete jumps of 0.4-0.8 (2.5-5 %) when a
    match or a two-stage proposal flips, and bf16 and fp32 flip at different steps. Measured: Xeon without
    bf16 units (2026-12-07, linears as `x @ w.T + b`), within 0.3 % between flips, 2.4 % at a flip; AMD
    EPYC with AVX512-BF16 (2026-12-08, linears as `F.linear`, bf16 outputs like upstream's nn.Linear),
    within 0.05 % over the first 10 steps, then flips at steps 11 and 13 (fp32 at 15): up to 5.1 % per step,
    the 20-step mean 1.6 % apart. Bounds: 10 % per step, the mean total within 3 %, each term's mean
    within 10 %."""
    cfg, tcfg, batch = _tiny_setup()
    runs = {}
    for precision in ("fp32", "bf16"):
        step = make_train_step(cfg, tcfg, steps_per_epoch=20, precision=precision)
        state, rows = step.init(rf.init(cfg, 0)), []
        for _ in range(20):
            state, metrics = step(state, [batch])
            rows.append({k: float(v) for k, v in metrics.items() if k.startswith("loss")})
        runs[precision] = rows
    for i, (a, b) in enumerate(zip(runs["fp32"], runs["bf16"])):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.1), f"step {i}"
    for key in runs["fp32"][0]:
        mean = {p: sum(r[key] for r in rows) / len(rows) for p, rows in runs.items()}
        assert mean["bf16"] == pytest.approx(mean["fp32"], rel=0.03 if key == "loss" else 0.1, abs=1e-3), key
    assert runs["fp32"] != runs["bf16"]  # autocast really ran in bf16


def test_bf16_eval_forward_on_cpu_is_close_to_fp32():
    cfg = rf.presets.tiny(num_classes=3, resolution=64)
    params = detector.init(cfg, 0)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = forward(params, images, None, cfg, "fp32", train=False)
        bf16 = forward(params, images, None, cfg, "bf16", train=False)
    assert bf16["pred_logits"].dtype == torch.float32 and bf16["pred_boxes"].dtype == torch.float32
    assert not torch.equal(bf16["pred_boxes"], fp32["pred_boxes"])
    # a query whose two-stage proposal flips moves far (measured: 1 of 40 queries on a Xeon without bf16
    # units, 2 of 40 on an EPYC with AVX512-BF16); the rest stay close (measured: box median 0, logit median
    # 0.004-0.012, the same queries' logits the only ones off by more than 0.25)
    box = (bf16["pred_boxes"] - fp32["pred_boxes"]).abs()
    assert box.median() < 0.01 and (box > 0.05).any(-1).float().mean() <= 0.15
    logit = (bf16["pred_logits"] - fp32["pred_logits"]).abs()
    assert logit.median() < 0.05 and (logit > 0.25).any(-1).float().mean() <= 0.15


def test_bf16_attention_on_cpu_runs_the_kernel_in_float32():
    """CPU's bf16 flash-attention backward is slower than its float32 one, so bf16 q/k/v (autocast) that
    need gradients are attended in float32 and the result rounded back: bf16 out, equal to float32 attention
    of the same (bf16-rounded) inputs, and gradients flow back in bf16."""
    from rfdetr_fn.model.nn import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 17, 8, generator=gen).bfloat16().requires_grad_() for _ in range(3))
    out = attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    out.sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
    with torch.no_grad():  # inference keeps CPU's bf16 kernel
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert torch.equal(attention(q, k, v), plain)
