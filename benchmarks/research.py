"""Research-API targets, measured side by side (CPU), printed as tables with ratios.

    python benchmarks/research.py            # transforms: vmapped ensemble, per-example grads, jvp (tiny, 1 thread)
    python benchmarks/research.py memory     # Nano 384 batch 2: full vs backbone_lora vs LoRA-only vs checkpointing

`transforms` (the default) measures, with every variant interleaved in one process (medians): a 4-member
vmapped ensemble forward against the Python loop over members (target 1.5x), per-example gradients of
`rf.loss` by vmap against a loop of per-image gradients, and `torch.func.jvp` of the logits as a multiple
of the forward (target <= 3x). Targets are ratios against a baseline of the same run, never timed asserts.

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

from rfdetr_fn.model.precision import describe_cpu

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


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, the variants alternating in every repeat (after one warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def transforms(repeats: int) -> None:
    import rfdetr_fn as rf
    from rfdetr_fn import tree
    from rfdetr_fn.config import TrainConfig
    from rfdetr_fn.research import ensemble

    cfg, tcfg = rf.presets.tiny(num_classes=3, resolution=64), TrainConfig(multi_scale="off")
    members = [rf.init(cfg, seed) for seed in range(4)]
    stacked = ensemble.stack(members)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.randn(4, 3, 64, 64, generator=gen),
        "mask": torch.zeros(4, 64, 64, dtype=torch.bool),
        "labels": torch.tensor([[0, 1], [2, -1], [1, -1], [0, 2]]),
        "boxes": torch.rand(4, 2, 4, generator=gen) * 0.4 + 0.2,
    }
    images = batch["images"][:2]
    params = members[0]
    rows = []

    def logits(p):
        return rf.apply(p, images, None, cfg, train=False)["pred_logits"]

    with torch.no_grad():
        t = _interleaved(
            {"loop": lambda: [logits(p) for p in members], "vmap": lambda: ensemble.apply(stacked, images, None, cfg)},
            repeats,
        )
    rows.append(("ensemble forward, 4 members, 2 images", "Python loop", t["loop"], "vmap", t["vmap"], ">= 1.5x"))

    count = batch["labels"].ge(0).sum() * cfg.group_detr

    def loop_grads():
        one = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)]
        return [torch.func.grad(lambda p, e=e: rf.loss(p, e, cfg, tcfg, num_boxes=count)[0])(params) for e in one]

    t = _interleaved(
        {"loop": loop_grads, "vmap": lambda: ensemble.per_example_grads(params, batch, cfg, tcfg)}, repeats
    )
    rows.append(("per-example gradients, 4 images", "loop of grads", t["loop"], "vmap(grad)", t["vmap"], "speed-up"))

    tangent = tree.map_(torch.randn_like, params)

    def forward():
        with torch.no_grad():
            return logits(params)

    t = _interleaved({"forward": forward, "jvp": lambda: torch.func.jvp(logits, (params,), (tangent,))}, repeats)
    rows.append(("jvp of the logits, 2 images", "forward (no grad)", t["forward"], "jvp", t["jvp"], "<= 3x cost"))

    print(
        f"{describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"tiny preset at 64x64, {repeats} interleaved repeats, medians"
    )
    print("| what | baseline | s | variant | s | speed-up (baseline/variant) | cost (variant/baseline) | target |")
    print("|---|---|---|---|---|---|---|---|")
    for what, base, base_s, var, var_s, target in rows:
        print(f"| {what} | {base} | {base_s:.3f} | {var} | {var_s:.3f} | {base_s / var_s:.2f}x | "
              f"{var_s / base_s:.2f}x | {target} |")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        torch.set_num_threads(2)
        print(json.dumps(step_variant(sys.argv[2], int(sys.argv[3]))))
        raise SystemExit
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", nargs="?", default="transforms", choices=("transforms", "memory"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="transforms: torch threads (0: torch's default)")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="memory: the first is the base"
    )
    args = parser.parse_args()
    if args.threads and args.what == "transforms":
        torch.set_num_threads(args.threads)
    memory(args.steps, args.variants) if args.what == "memory" else transforms(args.repeats)
