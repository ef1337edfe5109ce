"""`--train.batch-size auto`: the largest micro-batch that fits, then the accumulation that reaches a target.

Both devices use one measurement: the peak memory of a real train step (AdamW and EMA state included) on a
synthetic worst-case batch (the largest multi-scale side, `auto_batch_max_targets_per_image` targets per
image) at micro-batches 1 and 2 (more when the peak does not move). Peak memory is close to linear in the
batch, `peak(b) = fixed + b * per_image`, so the micro-batch that fits in a fraction of the device's memory
follows from the two points:

- CUDA: `torch.cuda.max_memory_allocated` after a reset, against 90% of the device's total memory; the
  chosen size is then run once and halved until it does not run out of memory.
- CPU: the process's peak resident set (`ru_maxrss`, which only grows, so each probe is run from small to
  large), against 80% of `MemAvailable` plus what the process already holds. On a CPU a bigger micro-batch
  is no faster (the step is compute-bound), so the CPU choice is also capped at the per-rank target.

Upstream's EMA headroom (x0.7 when `use_ema`) is applied on top, then `grad_accum_steps =
ceil(per-rank target / micro-batch)` with the per-rank target `ceil(auto_batch_target_effective / ranks)`.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable

import attrs
import torch

from rfdetr_fn.config import ModelConfig, TrainConfig

MAX_MICRO_BATCH = 128
CUDA_MEMORY_FRACTION = 0.9
CPU_MEMORY_FRACTION = 0.8


@attrs.frozen
class AutoBatch:
    micro_batch: int
    grad_accum_steps: int
    world_size: int
    reason: str

    @property
    def effective(self) -> int:
        """Images per optimizer step over all ranks."""
        return self.micro_batch * self.grad_accum_steps * self.world_size

    def describe(self) -> str:
        return (
            f"batch_size auto: micro-batch {self.micro_batch} x grad_accum_steps {self.grad_accum_steps} x "
            f"{self.world_size} rank(s) = effective batch {self.effective} ({self.reason})"
        )


# ------------------------------------------------------------------------------------------------ pure rules
def grad_accum_steps_for(micro_batch: int, target_effective: int, world_size: int) -> int:
    """Accumulation that reaches the global target: a floor, never a cap (as upstream)."""
    per_rank = max(1, math.ceil(target_effective / world_size))
    return max(1, math.ceil(per_rank / micro_batch))


def fit_linear(peaks: dict[int, float]) -> tuple[float, float]:
    """(fixed, per_image) bytes from peaks measured at two or more batch sizes (least squares)."""
    sizes = sorted(peaks)
    if len(sizes) < 2:
        raise ValueError("need peaks at two batch sizes")
    mean_b = sum(sizes) / len(sizes)
    mean_p = sum(peaks[b] for b in sizes) / len(sizes)
    var = sum((b - mean_b) ** 2 for b in sizes)
    slope = sum((b - mean_b) * (peaks[b] - mean_p) for b in sizes) / var
    return mean_p - slope * mean_b, slope


def micro_batch_for(fixed: float, per_image: float, budget: float, cap: int = MAX_MICRO_BATCH) -> int:
    """The largest b with fixed + b * per_image <= budget (at least 1, at most cap)."""
    if per_image <= 0:
        return cap
    return int(max(1, min(cap, math.floor((budget - fixed) / per_image))))


def choose(
    peaks: dict[int, float],
    budget: float,
    tcfg: TrainConfig,
    world_size: int,
    *,
    cap: int = MAX_MICRO_BATCH,
    cap_reason: str = "the probe's limit",
    device: str = "cuda",
) -> AutoBatch:
    """The decision from measured peaks: micro-batch within the budget, EMA headroom, accumulation."""
    fixed, per_image = fit_linear(peaks)
    fits = micro_batch_for(fixed, per_image, budget, MAX_MICRO_BATCH)
    most = f">= {fits}" if fits >= MAX_MICRO_BATCH else str(fits)
    memory = f"{fixed / 2**20:.0f} MiB + {per_image / 2**20:.1f} MiB/image"
    notes = [f"{device}: {memory} fits {most} in {budget / 2**30:.1f} GiB"]
    micro = fits
    if tcfg.use_ema:
        micro = max(1, math.floor(micro * tcfg.auto_batch_ema_headroom))
        notes.append(f"x{tcfg.auto_batch_ema_headroom} EMA headroom = {micro}")
    if micro > cap:
        micro = cap
        notes.append(f"capped at {cap} ({cap_reason})")
    accum = grad_accum_steps_for(micro, tcfg.auto_batch_target_effective, world_size)
    notes.append(f"accumulation to reach auto_batch_target_effective={tcfg.auto_batch_target_effective}")
    return AutoBatch(micro, accum, world_size, "; ".join(notes))


# ------------------------------------------------------------------------------------------------ measuring
def probe_batch(cfg: ModelConfig, tcfg: TrainConfig, size: int, batch: int, device: torch.device) -> dict:
    """A worst-case synthetic batch in the loader's layout: every target slot filled."""
    slots = tcfg.auto_batch_max_targets_per_image
    out = {
        "images": torch.randn(batch, cfg.num_channels, size, size, device=device),
        "mask": torch.zeros(batch, size, size, dtype=torch.bool, device=device),
        "labels": torch.full((batch, slots), min(1, cfg.num_classes - 1), dtype=torch.int64, device=device),
        "boxes": torch.tensor([0.5, 0.5, 0.2, 0.2], device=device).expand(batch, slots, 4).contiguous(),
    }
    if cfg.segmentation_head:
        out["masks"] = torch.zeros(batch, slots, size, size, dtype=torch.bool, device=device)
    return out


def peak_rss_bytes() -> float:
    """This process's peak resident set (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)


def available_cpu_bytes() -> float:
    """MemAvailable plus what this process already holds (the probe's own pages count against the budget)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        available = float(info["MemAvailable"])
    except (OSError, KeyError, ValueError):
        available = 8.0 * 2**30  # unknown platform: assume a modest machine
    current = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return available + float(current if sys.platform == "darwin" else current * 1024)


def measure_peaks(run: Callable[[int], None], peak: Callable[[], float], reset: Callable[[], None]) -> dict[int, float]:
    """Peaks at batch 1, 2, then doubling up to 8 until the peak moves (a CPU peak can hide under earlier ones)."""
    peaks: dict[int, float] = {}
    for b in (1, 2, 4, 8):
        reset()
        run(b)
        peaks[b] = peak()
        if b >= 2 and peaks[b] - peaks[1] > 2**20:
            break
    return peaks


def resolve(cfg: ModelConfig, tcfg: TrainConfig, params, device: torch.device, world_size: int) -> AutoBatch:
    """Measure and decide (called by fit before the loaders are built)."""
    from rfdetr_fn.data import multi_scale_scales
    from rfdetr_fn.model.precision import resolve_precision
    from rfdetr_fn.step import make_train_step

    size = cfg.resolution
    if tcfg.multi_scale != "off":
        size = max(multi_scale_scales(cfg.resolution, tcfg.expanded_scales, cfg.patch_size, cfg.num_windows))
    probe_cfg = attrs.evolve(tcfg, batch_size=1, grad_accum_steps=1)
    precision = resolve_precision(tcfg.precision, device)
    step = make_train_step(cfg, probe_cfg, steps_per_epoch=1, precision=precision, world_size=1)
    state = step.init(params)  # the run's trainable set (freezing, LoRA) and its optimizer

    def run(b: int) -> None:
        out = step(state, [probe_batch(cfg, tcfg, size, b, device)])
        del out

    if device.type == "cuda":
        peaks = measure_peaks(
            run,
            lambda: float(torch.cuda.max_memory_allocated(device)),
            lambda: torch.cuda.reset_peak_memory_stats(device),
        )
        budget = CUDA_MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory
        choice = choose(peaks, budget, tcfg, world_size, device=torch.cuda.get_device_name(device))
        micro = _largest_that_runs(run, choice.micro_batch)
        if micro != choice.micro_batch:
            choice = attrs.evolve(
                choice,
                micro_batch=micro,
                grad_accum_steps=grad_accum_steps_for(micro, tcfg.auto_batch_target_effective, world_size),
                reason=choice.reason + f"; {choice.micro_batch} ran out of memory, halved to {micro}",
            )
        torch.cuda.empty_cache()
        return choice
    peaks = measure_peaks(run, peak_rss_bytes, lambda: None)
    cap = max(1, math.ceil(tcfg.auto_batch_target_effective / world_size))
    budget = CPU_MEMORY_FRACTION * available_cpu_bytes()
    reason = "the per-rank target: a bigger batch is no faster on a CPU"
    return choose(peaks, budget, tcfg, world_size, cap=cap, cap_reason=reason, device="cpu")


def _largest_that_runs(run: Callable[[int], None], start: int) -> int:
    b = start
    while b > 1:
        try:
            run(b)
            return b
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            b //= 2
    return 1
