"""Eager vs compiled vs CUDA-graphed train-step throughput and peak memory, printed as a table with ratios.

    python benchmarks/train_step.py --preset nano --resolution 384 --batch-size 2 --device cpu
    python benchmarks/train_step.py --preset nano --batch-size 4 16 --device cuda --precision bf16 --gpu-report
    python benchmarks/train_step.py --device cuda --precision bf16 --modes eager graphed --gpu-report
    python benchmarks/train_step.py --device cuda --precision bf16 --parity 20   # graphed vs eager, 20 steps
    python benchmarks/train_step.py --preset nano --resolution 384 --batch-size 2 --device cpu --precision bf16

Modes: eager (the pure step), donated (`make_train_step(donate=True)`: the update in place, what `fit` runs
on CPU), compiled (on CPU as `fit` compiles there: the loss piece, the donated update eager; on CUDA the
whole regional step), graphed (CUDA). Default: eager and donated on CPU, eager and compiled on CUDA.
Each mode runs in its own subprocess so peak RSS (CPU) or peak allocated memory (CUDA) belongs to that mode
alone. Timings are medians over --steps steps after --warmup steps (the compiled mode's first call,
which compiles, is reported separately). On CUDA, --gpu-report also counts host syncs per step
(torch.cuda.set_sync_debug_mode), kernels launched per step (profiler) and recompiles while stepping
through the multi-scale menu after warm-up (for the graphed mode: new graph captures). "graphed" is the
eager step replayed from one CUDA graph per input size (`rfdetr_fn.train.graphs`, `--train.cuda-graphs`); it needs
the device matcher, which --matcher auto picks on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from rfdetr_fn.model.precision import describe_cpu


def peak_rss_gib() -> float:
    """This process's peak resident memory since start or the last `reset_peak_rss` (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak_rss() -> None:
    """Restart the peak at the current RSS, so a figure excludes what came before (e.g. a compile)."""
    with contextlib.suppress(OSError):  # Linux only: 5 resets VmHWM
        Path("/proc/self/clear_refs").write_text("5")


def synthetic_batch(cfg, batch_size: int, resolution: int, device, *, targets: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch_size, targets, 2, generator=g) * 0.6 + 0.2
    sizes = torch.rand(batch_size, targets, 2, generator=g) * 0.2 + 0.05
    batch = {
        "images": torch.randn(batch_size, 3, resolution, resolution, generator=g),
        "mask": torch.zeros(batch_size, resolution, resolution, dtype=torch.bool),
        "labels": torch.randint(0, cfg.num_classes, (batch_size, targets), generator=g),
        "boxes": torch.cat([centres, sizes], dim=-1),
        "size": torch.tensor([[resolution, resolution]] * batch_size),
    }
    if cfg.segmentation_head:
        batch["masks"] = torch.rand(batch_size, targets, resolution, resolution, generator=g) > 0.7
    return {k: v.to(device) for k, v in batch.items()}


def build_step(args: argparse.Namespace, batch_size: int, mode: str):
    """(cfg, step, state, batch) for one mode: eager, compiled or graphed."""
    import rfdetr_fn as rf
    from rfdetr_fn import tree
    from rfdetr_fn.config import TrainConfig
    from rfdetr_fn.step import compile_step, make_train_step
    from rfdetr_fn.train.graphs import graphed_step

    device = torch.device(args.device)
    cfg = rf.presets.get(args.preset, resolution=args.resolution or rf.presets.get(args.preset).resolution)
    tcfg = TrainConfig(
        batch_size=batch_size,
        multi_scale="off",
        compile="on" if mode == "compiled" else "off",
        precision=args.precision,
        matcher_backend=args.matcher,
        cuda_graphs=mode == "graphed",
    )
    params = tree.map_(lambda t: t.to(device), rf.init(cfg, seed=0))
    # donated: eager, clip + AdamW + EMA in place on the state (what fit runs on CPU); compiled on CPU is what
    # fit compiles there: the loss piece, with the donated update eager
    cpu = device.type == "cpu"
    donate = mode == "donated" or (mode == "compiled" and cpu)
    train_step = make_train_step(cfg, tcfg, steps_per_epoch=1000, precision=args.precision, donate=donate)
    state = train_step.init(params)
    step = compile_step(train_step, enabled=mode == "compiled", max_shapes=32, update=not cpu)
    step = graphed_step(step, tcfg, device, max_graphs=32)
    if mode == "graphed" and not hasattr(step, "graphs"):
        raise SystemExit("graphed mode could not start (see the message above)")
    return cfg, step, state, synthetic_batch(cfg, batch_size, cfg.resolution, device)


def run_mode(args: argparse.Namespace, batch_size: int, mode: str) -> dict:
    """One mode in this process: returns timings and peak memory."""
    torch.set_num_threads(args.threads) if args.device == "cpu" else None
    device = torch.device(args.device)
    cfg, step, state, batch = build_step(args, batch_size, mode)

    def one(state):
        t0 = time.perf_counter()
        state, metrics = step(state, [batch])
        float(metrics["loss"])  # forces completion (and a sync on CUDA)
        return state, time.perf_counter() - t0

    state, first = one(state)
    for _ in range(args.warmup):
        state, _ = one(state)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        state, dt = one(state)
        times.append(dt)
    result = {
        "mode": mode,
        "batch": batch_size,
        "first_s": first,
        "median_s": statistics.median(times),
        "images_per_s": batch_size / statistics.median(times),
    }
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if args.gpu_report:
            result.update(gpu_report(step, state, batch, cfg, args))
    else:
        result["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def gpu_report(step, state, batch, cfg, args) -> dict:
    """Host syncs and kernel launches per step, and recompiles over the multi-scale menu."""
    from torch.profiler import ProfilerActivity, profile

    from rfdetr_fn.data import multi_scale_scales, resize_batch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        state, metrics = step(state, [batch])
        torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        state, metrics = step(state, [batch])
        torch.cuda.synchronize()
    kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    import torch._dynamo.utils as dutils

    def compiled_count() -> int:  # graphs compiled by Dynamo, or captured by the graphed step
        return len(step.graphs) if hasattr(step, "graphs") else dutils.counters["stats"]["unique_graphs"]

    scales = multi_scale_scales(cfg.resolution, True, cfg.patch_size, cfg.num_windows)[: args.report_scales]
    for s in scales:  # warm every scale once
        state, _ = step(state, [resize_batch(batch, s)])
    before = compiled_count()
    for s in scales:
        state, _ = step(state, [resize_batch(batch, s)])
    recompiles = compiled_count() - before
    return {
        "host_syncs_per_step": syncs,
        "kernels_per_step": kernels,
        "recompiles_after_warmup": recompiles,
        "scales": len(scales),
    }


def parity(args: argparse.Namespace) -> None:
    """Eager and graphed steps from the same weights over the same batches and seeds: loss and parameter gaps."""
    from rfdetr_fn import tree
    from rfdetr_fn.step import seed_for_step

    bs = args.batch_size[0]
    _, eager, eager_state, batch = build_step(args, bs, "eager")
    _, graphed, graph_state, _ = build_step(args, bs, "graphed")
    worst_loss = 0.0
    for i in range(args.parity):
        torch.manual_seed(seed_for_step(0, i))
        eager_state, want = eager(eager_state, [batch])
        torch.manual_seed(seed_for_step(0, i))
        graph_state, got = graphed(graph_state, [batch])
        worst_loss = max(worst_loss, abs(float(got["loss"]) - float(want["loss"])) / abs(float(want["loss"])))
    flat_want, flat_got = tree.flatten(eager_state["params"]), tree.flatten(graph_state["params"])
    worst_param = max(
        float((flat_got[k] - w).abs().max()) / max(float(w.abs().max()), 1e-12) for k, w in flat_want.items()
    )
    print(f"\nparity: {args.parity} steps, preset={args.preset} batch={bs} precision={args.precision}")
    print("| steps | max rel loss gap | max rel param gap (per tensor, vs its max) | final loss eager | graphed |")
    print("|---|---|---|---|---|")
    losses = f"{float(want['loss']):.5f} | {float(got['loss']):.5f}"
    print(f"| {args.parity} | {worst_loss:.2e} | {worst_param:.2e} | {losses} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=None,
        choices=["eager", "donated", "compiled", "graphed"],
        help="default: eager donated on CPU (fit's auto stays eager there), eager compiled on CUDA",
    )
    parser.add_argument("--matcher", default="auto", choices=["auto", "scipy", "device"])
    parser.add_argument("--parity", type=int, default=0, help="compare N graphed steps with N eager steps instead")
    parser.add_argument("--gpu-report", action="store_true")
    parser.add_argument("--report-scales", type=int, default=None, help="multi-scale sizes to cycle (default all)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.modes = args.modes or (["eager", "donated"] if args.device == "cpu" else ["eager", "compiled"])
    if args.parity:
        parity(args)
        return
    if args.child:
        mode, bs = args.child.split(":")
        print("RESULT " + json.dumps(run_mode(args, int(bs), mode)))
        return
    rows = []
    for bs in args.batch_size:
        for mode in args.modes:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", f"{mode}:{bs}"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{mode} bs={bs} failed")
            rows.append(json.loads(line[0][7:]))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    if not args.device.startswith("cuda"):
        print(f"CPU: {describe_cpu()}")
    print(
        f"\ntrain step: preset={args.preset} res={args.resolution or 'preset'} precision={args.precision} "
        f"device={name} torch={torch.__version__} matcher={args.matcher}"
    )
    head = "| mode | batch | first call s | step s (median) | images/s | speed-up | peak mem GiB |"
    extra = any("kernels_per_step" in r for r in rows)
    if extra:
        head += " syncs/step | kernels/step | recompiles over scales |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["mode"] == rows[0]["mode"])
        line = (
            f"| {r['mode']} | {r['batch']} | {r['first_s']:.1f} | {r['median_s']:.3f} | {r['images_per_s']:.2f} | "
            f"{base['median_s'] / r['median_s']:.2f}x | {r['peak_mem_gib']:.2f} |"
        )
        if extra:
            line += (
                f" {r.get('host_syncs_per_step', '-')} | {r.get('kernels_per_step', '-')} | "
                f"{r.get('recompiles_after_warmup', '-')} |"
            )
        print(line)


if __name__ == "__main__":
    main()
