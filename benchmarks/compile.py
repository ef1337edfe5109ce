"""What compiling the train step and the forward pass costs and buys, as one table with ratios.

    python benchmarks/compile.py --preset nano --resolution 384 --batch-size 2 --device cpu
    python benchmarks/compile.py --preset tiny nano --device cuda          # adds launches, syncs, max-autotune
    python benchmarks/compile.py --preset nano --device cpu --precision bf16 --modes eager cold warm

--precision bf16 runs the step and the forward under bf16 autocast (on a CPU with AMX-BF16 or AVX512-BF16
that is what `auto` picks). --update eager (the CPU default, as `fit` runs there) compiles the loss piece
only and keeps the donated in-place update eager; --update compiled (the CUDA default) compiles it too.

Per preset, each measurement runs in its own subprocess (so peak RSS and the caches are that mode's alone):
- eager: train-step median, steady-state peak RSS, batch-1 inference median;
- cold: compiled (regional) step with empty inductor/AOT caches and no artifacts: first-call time (the
  compile), graph count, graph breaks, step median and peak RSS, the numerical check (every loss term and
  every gradient of the compiled loss against eager autograd), compiled batch-1 inference;
- warm: the same in a fresh process over the cold run's compile cache (artifacts and inductor's kernels), as a
  user's second run (`rfdetr_fn.compiler`);
- menu: Dynamo recompiles while cycling the multi-scale menu twice (backend aot_eager: recompiles are
  decided by Dynamo's guards, which do not depend on the backend, and it spares an inductor compile per size).
Steady-state peak RSS is read from /proc/self/status after resetting it (clear_refs 5) once warm, so the
compile's own memory is reported separately (`compile peak`). On CUDA the cold child also counts kernel
launches and host syncs per step, and times `--cuda-mode` (max-autotune-no-cudagraphs) against default.
Every child has --child-timeout seconds; one that runs out is reported as such, with its partial output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import torch

from rfdetr_fn.model.precision import describe_cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import gpu_report, peak_rss_gib, reset_peak_rss, synthetic_batch  # noqa: E402  (the benchmarks share their batch)


def _setup(args):
    import rfdetr_fn as rf
    from rfdetr_fn import tree
    from rfdetr_fn.config import TrainConfig

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = rf.presets.get(args.preset_one, num_classes=3, resolution=args.resolution)
    tcfg = TrainConfig(batch_size=args.batch_size, multi_scale="off", precision=args.precision)
    params = tree.to(rf.init(cfg, seed=0), device)
    return cfg, tcfg, params, device


def _median_step(step, state, batch, steps: int) -> tuple[dict, float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, [batch])
        float(metrics["loss"])
        times.append(time.perf_counter() - t0)
    return state, statistics.median(times)


def _median_forward(forward, params, image, steps: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(steps):
            t0 = time.perf_counter()
            float(forward(params, image, None)["pred_boxes"].sum())
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def max_grad_rel(got: dict, want: dict) -> float:
    """Largest per-tensor max|got - want| / max|want|, the denominator floored at 1e-6 of the largest gradient:
    some gradients are zero up to rounding (a key projection's bias cannot change a softmax), and their
    relative difference is noise over noise."""
    floor = 1e-6 * max(float(w.abs().max()) for w in want.values())
    return max(float((got[k] - w).abs().max()) / max(float(w.abs().max()), floor) for k, w in want.items())


def report_partial(out: dict) -> None:
    """Print what is measured so far; the parent keeps the last RESULT line a child printed."""
    print("RESULT " + json.dumps(out), flush=True)


def child(args) -> dict:
    """One measurement in this process (see the module docstring)."""
    import torch._dynamo.utils as dutils

    from rfdetr_fn import compiler, rng, tree
    from rfdetr_fn.eval.inference import forward_fn
    from rfdetr_fn.step import assemble_step, compile_step, grad_and_value, make_train_step

    cfg, tcfg, params, device = _setup(args)
    batch = synthetic_batch(cfg, args.batch_size, args.resolution, device)
    image = batch["images"][:1]
    donate = args.update == "eager"  # as fit runs CPU: the update in place, eager
    eager_step = make_train_step(cfg, tcfg, steps_per_epoch=1000, precision=args.precision, donate=donate)
    state = eager_step.init(tree.clone(params))
    out: dict = {"mode": args.child}
    if args.child == "eager":
        state, _ = _median_step(eager_step, state, batch, args.warmup)
        reset_peak_rss()
        state, out["step_s"] = _median_step(eager_step, state, batch, args.steps)
        out["peak_rss_gib"] = peak_rss_gib()
        out["infer_s"] = _median_forward(forward_fn(cfg, device, precision=args.precision), params, image, args.steps)
        return out
    if args.child == "menu":
        from rfdetr_fn.data import multi_scale_scales, resize_batch

        step = compile_step(eager_step, backend="aot_eager", max_shapes=32)
        scales = multi_scale_scales(cfg.resolution, True, cfg.patch_size, cfg.num_windows)
        for s in scales:
            state, _ = step(state, [resize_batch(batch, s)])
        before = dutils.counters["stats"]["unique_graphs"]
        for s in scales:
            state, _ = step(state, [resize_batch(batch, s)])
        out.update(sizes=len(scales), graphs=before, recompiles=dutils.counters["stats"]["unique_graphs"] - before)
        out["graph_breaks"] = sum(dutils.counters["graph_break"].values())
        return out
    # cold / warm: the compiled step and forward, caches as the parent arranged them
    key = compiler.cache_key(cfg, eager_step.settings, device=device, what="benchmark")
    cache = compiler.CompileCache(Path(args.artifacts), key)
    out["artifacts_loaded"] = cache.load()
    step = compile_step(eager_step, mode=args.mode, backend=args.backend, update=args.update == "compiled")
    # first the loss piece alone (its compile, and the numerical check), then the step (the update's compile)
    scale = torch.ones((), device=device)
    trainable, frozen = eager_step.pieces.split(params)
    key = rng.mix(state["seed"], state["step"], 0)
    t0 = time.perf_counter()
    got_g, (_, (_, got_l)) = grad_and_value(step.pieces.loss)(trainable, frozen, batch, scale, key)
    out["first_loss_s"] = time.perf_counter() - t0
    want_g, (_, (_, want_l)) = grad_and_value(eager_step.pieces.loss)(trainable, frozen, batch, scale, key)
    out["max_loss_rel"] = max(abs(float(got_l[k] - want_l[k])) / max(abs(float(want_l[k])), 1e-12) for k in want_l)
    out["max_grad_rel"] = max_grad_rel(tree.flatten(got_g), tree.flatten(want_g))
    report_partial(out)
    t0 = time.perf_counter()
    state, metrics = step(state, [batch])
    float(metrics["loss"])
    out["first_update_s"] = time.perf_counter() - t0
    out["first_step_s"] = out["first_loss_s"] + out["first_update_s"]
    out["compile_peak_rss_gib"] = peak_rss_gib()
    out["graphs"] = dutils.counters["stats"]["unique_graphs"]
    out["graph_breaks"] = sum(dutils.counters["graph_break"].values())
    out["compile_times"] = dutils.compile_times(repr="csv")
    cache.save_if_new()
    report_partial(out)
    state, _ = _median_step(step, state, batch, args.warmup)
    reset_peak_rss()
    state, out["step_s"] = _median_step(step, state, batch, args.steps)
    out["peak_rss_gib"] = peak_rss_gib()
    report_partial(out)  # a later failure keeps the compile figures
    loss_only = assemble_step(attrs.evolve(step.pieces, update=eager_step.pieces.update))  # nothing new to compile
    state, out["loss_only_step_s"] = _median_step(loss_only, state, batch, args.steps)
    forward = forward_fn(
        cfg,
        device,
        compile=True,
        cache_dir=args.artifacts,
        mode=args.mode,
        backend=args.backend,
        precision=args.precision,
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        float(forward(params, image, None)["pred_boxes"].sum())
    out["first_infer_s"] = time.perf_counter() - t0
    out["infer_s"] = _median_forward(forward, params, image, args.steps)
    cache.save_if_new()
    if device.type == "cuda":
        out.update(gpu_report(step, state, batch, cfg, argparse.Namespace(report_scales=0)))
    return out


def run_child(args, preset: str, mode: str, env: dict, artifacts: str) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", mode, "--preset-one", preset, "--artifacts", artifacts]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
    except subprocess.TimeoutExpired as e:
        partial = [x for x in (e.stdout or b"").decode().splitlines() if x.startswith("RESULT ")]
        return {
            **(json.loads(partial[-1][7:]) if partial else {}),
            "mode": mode,
            "timeout": True,
            "wall_s": time.perf_counter() - started,
        }
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
    if not lines:
        return {"mode": mode, "failed": True}
    return {**json.loads(lines[-1][7:]), **({"failed": True} if done.returncode != 0 else {})}


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def report(preset: str, rows: dict, args) -> None:
    eager, cold, warm, menu = (rows.get(k, {}) for k in ("eager", "cold", "warm", "menu"))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    print(
        f"\n### {preset} {args.resolution}, batch {args.batch_size}, {args.precision}, {name}, torch "
        f"{torch.__version__}, triton {triton_version}, compile mode {args.mode or 'default'}, update "
        f"{args.update}\n\n{describe_cpu()}\n"
    )

    def cells(key: str, spec: str) -> list[str]:
        return [_fmt(r.get(key), spec) for r in (eager, cold, warm)]

    table = [
        ("first call (compile), s", ["", *cells("first_step_s", ".1f")[1:]], _ratio(warm, cold, "first_step_s")),
        ("  of which loss + backward piece, s", ["", *cells("first_loss_s", ".1f")[1:]], ""),
        ("  of which update piece, s", ["", *cells("first_update_s", ".1f")[1:]], ""),
        ("train step median, s", cells("step_s", ".3f"), "eager/compiled " + _ratio(eager, cold, "step_s")),
        (
            "train step median, compiled loss + eager update, s",
            ["", *cells("loss_only_step_s", ".3f")[1:]],
            "eager/this " + _ratio(eager, cold, "step_s", "loss_only_step_s"),
        ),
        ("steady peak RSS, GiB", cells("peak_rss_gib", ".2f"), "compiled/eager " + _ratio(cold, eager, "peak_rss_gib")),
        ("peak RSS while compiling, GiB", ["", *cells("compile_peak_rss_gib", ".2f")[1:]], ""),
        ("inference batch 1 median, s", cells("infer_s", ".3f"), "eager/compiled " + _ratio(eager, cold, "infer_s")),
        ("inference first call, s", ["", *cells("first_infer_s", ".1f")[1:]], ""),
        (
            "graphs / graph breaks",
            ["", *(f"{r.get('graphs', '-')} / {r.get('graph_breaks', '-')}" for r in (cold, warm))],
            "",
        ),
        ("artifact files loaded", ["", *(str(r.get("artifacts_loaded", "-")) for r in (cold, warm))], ""),
        (
            "max rel diff loss terms / grads",
            ["", f"{_fmt(cold.get('max_loss_rel'), '.1e')} / {_fmt(cold.get('max_grad_rel'), '.1e')}", ""],
            "",
        ),
    ]
    if menu:
        menu_cell = "timeout" if menu.get("timeout") else f"{menu.get('recompiles')} over {menu.get('sizes')} sizes"
        table.append(("recompiles after warm-up (menu x2)", ["", menu_cell, ""], ""))
    if "kernels_per_step" in cold:
        table.append(
            (
                "CUDA kernels / host syncs per step",
                ["", f"{cold['kernels_per_step']} / {cold['host_syncs_per_step']}", ""],
                "",
            )
        )
    for r in (cold, warm, menu):
        if r.get("timeout"):
            table.append((f"{r['mode']} child", ["", f"did not finish in {r['wall_s']:.0f} s", ""], ""))
    print("| measurement | eager | compiled cold | compiled warm | ratio |")
    print("|---|---|---|---|---|")
    for label, values, ratio in table:
        print(f"| {label} | {' | '.join(values)} | {ratio} |")
    if cold.get("compile_times"):
        print("\ncold compile, where the time went (torch._dynamo.utils.compile_times):\n")
        print(cold["compile_times"])


def _ratio(top: dict, bottom: dict, key: str, bottom_key: str | None = None) -> str:
    a, b = top.get(key), bottom.get(bottom_key or key)
    return "-" if not a or not b else f"{a / b:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["tiny", "nano"])
    parser.add_argument("--resolution", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["eager", "cold", "warm", "menu"])
    parser.add_argument("--backend", default="inductor", help="aot_eager checks this script in minutes, no codegen")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--update", choices=["compiled", "eager"], help="default: eager on CPU (as fit), else compiled")
    parser.add_argument("--child-timeout", type=float, default=3600.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--preset-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.update = args.update or ("eager" if args.device == "cpu" else "compiled")
    if args.child:
        report_partial(child(args))
        return
    for preset in args.preset:
        with tempfile.TemporaryDirectory(prefix="rfdetr_fn_compile_bench_") as tmp:
            # the compile cache (artifacts, and inductor's kernels under it) starts empty; warm is a second
            # process over the same cache folder, as a user's second run is
            env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
            rows = {mode: run_child(args, preset, mode, env, f"{tmp}/cache") for mode in args.modes}
            report(preset, rows, args)


if __name__ == "__main__":
    main()
