"""Research-API targets, measured side by side (CPU), printed as tables with ratios.

    python benchmarks/research.py memory     # Nano 384 batch 2: full vs backbone_lora vs LoRA-only vs checkpointing
    python benchmarks/research.py ensemble   # vmapped 4-member tiny ensemble vs the Python loop

`memory` runs each variant's train step in its own subprocess so its peak RSS is its own, and counts
trainable parameters and optimizer-state elements. glibc keeps freed blocks below its (adaptive) mmap
threshold in the heap, so peak RSS also counts fragmentation; `MALLOC_MMAP_THRESHOLD_=131072` in the
environment returns large blocks to the system on free, and peak RSS then tracks live memory.
`ensemble` interleaves vmap and loop repeats in one process and reports medians.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("full", "backbone_lora", "lora_only", "checkpointing")


def step_variant(name: str, steps: int) -> dict:
    """One variant's train step on Nano 384, batch 2 (run in a child process)."""
    import rfdetr_fn as rf
    from rfdetr_fn import tree
    from rfdetr_fn.config import TrainConfig
    from rfdetr_fn.model import lora
    from rfdetr_fn.optim import recipe
    from rfdetr_fn.step import make_train_step

    sys.path.insert(0, "benchmarks")
    from train_step import synthetic_batch

    cfg = rf.presets.nano(num_classes=3, gradient_checkpointing=name == "checkpointing",
                          backbone_lora=name in ("backbone_lora", "lora_only"))  # fmt: skip
    tcfg = TrainConfig(batch_size=2, multi_scale="off")
    params = rf.init(cfg, seed=0)
    if cfg.backbone_lora:
        params = lora.add_adapters(params, cfg)
    # lora_only is the transform alone: the adapters train, everything else is frozen
    trainable = (lambda k, v: lora.is_adapter(k)) if name == "lora_only" else recipe.trainable(cfg, tcfg)
    step = make_train_step(cfg, tcfg, steps_per_epoch=100, trainable=trainable)
    state = step.init(params)
    batch = synthetic_batch(cfg, 2, 384, "cpu")
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state, metrics = step(state, [batch])
        times.append(time.perf_counter() - started)
    n_train = tree.num_params(tree.partition(params, trainable)[0]) if trainable else tree.num_params(params)
    return {
        "variant": name,
        "params": tree.num_params(params),
        "trainable": n_train,
        "opt_state": sum(t.numel() for t in tree.leaves(state["opt_state"])),
        "step_s": statistics.median(times),
        "loss": float(metrics["loss"]),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def memory(steps: int, variants: list[str]) -> None:
    rows = []
    for name in variants:
        out = subprocess.run([sys.executable, __file__, "_child", name, str(steps)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = rows[0]
    print(f"Nano 384, batch 2, CPU, {steps} steps, torch {torch.__version__}")
    print("| variant | trainable | of model | optimizer state | vs full | step s | peak RSS GiB | vs full | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['trainable']:,} | {r['trainable'] / r['params']:.1%} | {r['opt_state']:,} | "
              f"{r['opt_state'] / full['opt_state']:.1%} | {r['step_s']:.1f} | {r['peak_rss_gib']:.2f} | "
              f"{r['peak_rss_gib'] / full['peak_rss_gib']:.2f}x | {r['loss']:.4f} |")  # fmt: skip


def ensemble_speed(repeats: int) -> None:
    import rfdetr_fn as rf
    from rfdetr_fn.research import ensemble

    cfg = rf.presets.tiny(num_classes=3)
    members = [rf.init(cfg, seed) for seed in range(4)]
    stacked = ensemble.stack(members)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def loop():
        with ensemble.transformable():
            return [rf.apply(p, images, None, cfg, train=False)["pred_logits"] for p in members]

    def vmapped():
        return ensemble.apply(stacked, images, None, cfg)["pred_logits"]

    times = {"loop": [], "vmap": []}
    with torch.no_grad():
        vmapped(), loop()  # warm-up
        for _ in range(repeats):
            for name, fn in (("vmap", vmapped), ("loop", loop)):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
        gap = (vmapped() - torch.stack(loop())).abs().max().item()
    loop_s, vmap_s = statistics.median(times["loop"]), statistics.median(times["vmap"])
    threads = torch.get_num_threads()
    print(
        f"tiny, 4 members, 2 images 64x64, eval, {repeats} interleaved repeats, {threads} threads, "
        f"torch {torch.__version__}"
    )
    print("| mode | median s | speed-up |\n|---|---|---|")
    print(f"| Python loop | {loop_s:.3f} | 1.00x |\n| vmap | {vmap_s:.3f} | {loop_s / vmap_s:.2f}x |")
    best = min(times["loop"]) / min(times["vmap"])
    print(f"best-of ratio {best:.2f}x; max |vmap - loop| = {gap:.1e}")


if __name__ == "__main__":
    if sys.argv[1] == "_child":
        torch.set_num_threads(2)
        print(json.dumps(step_variant(sys.argv[2], int(sys.argv[3]))))
        raise SystemExit
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=("memory", "ensemble"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="ensemble: torch threads (0: torch's default)")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="memory: the first is the base"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    memory(args.steps, args.variants) if args.what == "memory" else ensemble_speed(args.repeats)
