"""Mixed precision for forward passes: which autocast dtype a run uses, and the forward under it.

Shared by the train step, evaluation, inference and the batch-size probe, so training and evaluation agree
on what "bf16" means and the loss and postprocess always see float32.

The rule (`resolve_precision`): `auto` is bf16 autocast on CUDA with compute capability >= 8 (fp16 below)
and on a CPU with bf16 matrix units (AMX-BF16 or AVX512-BF16, where oneDNN's bf16 GEMMs run several times
faster than fp32), fp32 on any other CPU. bf16 may be asked for on any CPU (slower than fp32 without those
units); fp16 stays CUDA-only (its loss scaling exists for CUDA's fp16 range, CPU fp16 GEMMs are slow).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rfdetr_fn.config import ModelConfig
from rfdetr_fn.model import detector
from rfdetr_fn.tree import Params

BF16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flag names of the CPU's bf16 matrix units


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags: the first `flags` line of /proc/cpuinfo, else torch.cpu's own probes
    (macOS, Windows) under the same names."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return {flag for flag, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()}


def cpu_bf16_units(flags: Iterable[str] | None = None) -> list[str]:
    """The bf16 matrix units among `flags` (default: this CPU's), e.g. ['amx_bf16', 'avx512_bf16']."""
    have = set(cpu_flags() if flags is None else flags)
    return [unit for unit in BF16_UNITS if unit in have]


def describe_cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model and the flags that decide bf16 speed, printed beside every benchmark figure:
    'AMD EPYC; avx512f yes, avx512_bf16 yes, amx_bf16 NO; bf16 matrix units: avx512_bf16'."""
    model = platform.processor() or platform.machine()
    try:
        names = [x for x in Path(cpuinfo).read_text().splitlines() if x.startswith("model name")]
        model = names[0].split(":", 1)[1].strip() if names else model
    except OSError:
        pass
    flags = cpu_flags(cpuinfo)
    shown = ", ".join(f"{f} {'yes' if f in flags else 'NO'}" for f in ("avx512f", "avx512_bf16", "amx_bf16"))
    units = cpu_bf16_units(flags)
    return f"{model}; {shown}; bf16 matrix units: {', '.join(units) if units else 'none'}"


def resolve_precision(precision: str, device: torch.device, flags: Iterable[str] | None = None) -> str:
    """'auto' -> bf16 on CUDA with compute capability >= 8, fp16 on older CUDA, bf16 on a CPU with bf16
    matrix units (`cpu_bf16_units(flags)`), fp32 elsewhere. Explicit bf16 runs on CUDA and CPU; fp16 on
    CUDA only."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r}: expected auto, fp32, bf16 or fp16")
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ValueError(f"precision='fp16' needs a CUDA device; this run is on {device.type} (bf16 runs here)")
        if precision == "bf16" and device.type not in ("cuda", "cpu"):
            raise ValueError(f"precision='bf16' runs on CUDA or CPU; this run is on {device.type}")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    if device.type == "cpu" and cpu_bf16_units(flags):
        return "bf16"
    return "fp32"


def explain_precision(precision: str, device: torch.device, flags: Iterable[str] | None = None) -> str:
    """The resolved precision and why, for start summaries: 'bf16 (auto: CPU has amx_bf16, avx512_bf16)'."""
    resolved = resolve_precision(precision, device, flags)
    if precision != "auto":
        return resolved
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{resolved} (auto: CUDA compute capability {major}.{minor})"
    if device.type != "cpu":
        return f"{resolved} (auto: {device.type})"
    units = cpu_bf16_units(flags)
    if units:
        return f"{resolved} (auto: CPU has {', '.join(units)})"
    return f"{resolved} (auto: CPU has no AMX-BF16 / AVX512-BF16; --train.precision bf16 forces it)"


def compute_kind(device: torch.device, precision: str, flags: Iterable[str] | None = None) -> str:
    """What compiling pays for depends on: the device type, the resolved precision and, for bf16 on a CPU,
    which unit runs its GEMMs (fast bf16 GEMMs leave the small ops inductor fuses as most of the time).
    The key of `rfdetr_fn.compiler.MEASURED`: 'cpu fp32', 'cpu bf16 amx_bf16', 'cpu bf16 avx512_bf16',
    'cpu bf16 emulated', 'cuda bf16'."""
    if device.type != "cpu" or precision != "bf16":
        return f"{device.type} {precision}"
    units = cpu_bf16_units(flags)
    return f"cpu bf16 {units[0] if units else 'emulated'}"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def forward(
    params: Params, images: Tensor, mask: Tensor | None, cfg: ModelConfig, precision: str, **kwargs: Any
) -> dict:
    """`detector.apply` under the resolved precision's autocast on the images' device (bf16 on CUDA or CPU,
    fp16 on CUDA; fp32 runs as is), with the outputs back in float32 for the loss and postprocess. Used by
    the train step, evaluation and inference."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return detector.apply(params, images, mask, cfg, **kwargs)
    with torch.autocast(images.device.type, dtype=dtype):
        return _to_float32(detector.apply(params, images, mask, cfg, **kwargs))


def _to_float32(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    if isinstance(out, list):
        return [_to_float32(v) for v in out]
    return out
