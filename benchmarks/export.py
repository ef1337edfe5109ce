"""Exported runtimes against eager PyTorch: batch-1 latency, export time and file size (issue #25).

    python benchmarks/export.py                                   # Nano at 384 and 640, every runtime
    python benchmarks/export.py --resolutions 384 --runtimes eager onnx --iters 10

Per resolution: Nano (random weights, seed 0) is exported to ONNX and to a pt2 package with `rf.export`
(each timed, verification included, file size read back); then each runtime runs batch 1 in its own
subprocess (same threads): eager `rf.apply`, compiled (`torch.compile` regional forward, the predict
path's), onnxruntime (CPU provider) and AOTInductor. Medians after warm-up; ratios are eager / runtime,
eager measured in the same run. `--profile` adds onnxruntime's time per operator type (what bounds it).
The CPU model and its AMX / AVX512-BF16 flags head the table: bf16 targets need those units.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rfdetr_fn.model.precision import describe_cpu

RUNTIMES = ("eager", "compiled", "onnx", "pt2")


def _time(fn, x, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn(x)
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def worker(args) -> dict:
    """One runtime, batch 1, in this process: median ms (and first-call seconds: compile or session load)."""
    import rfdetr_fn as rf
    from rfdetr_fn.deploy.graph import example_input

    torch.set_num_threads(args.threads)
    cfg = rf.presets.nano(resolution=args.resolution)
    x = example_input(cfg, 1)
    start = time.perf_counter()
    profile = None
    if args.worker in ("eager", "compiled"):
        from rfdetr_fn.eval.inference import forward_fn

        params = rf.init(cfg, seed=0)
        forward = forward_fn(cfg, "cpu", compile=args.worker == "compiled")

        def fn(images):
            with torch.no_grad():
                return forward(params, images, None)
    elif args.worker == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.enable_profiling = args.profile
        session = ort.InferenceSession(args.file, options, providers=["CPUExecutionProvider"])

        def fn(images):
            return session.run(None, {"input": images.numpy()})
    else:
        package = torch._inductor.aoti_load_package(args.file)

        def fn(images):
            with torch.no_grad():
                return package(images)

    fn(x)
    first = time.perf_counter() - start
    ms = _time(fn, x, args.warmup, args.iters)
    if args.worker == "onnx" and args.profile:
        profile = _op_profile(session.end_profiling())
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "first_s": first, "profile": profile}


def _op_profile(trace: str) -> dict[str, float]:
    """onnxruntime's trace -> share of kernel time per operator type (top 8)."""
    events = json.loads(Path(trace).read_text())
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + e.get("dur", 0)
    Path(trace).unlink(missing_ok=True)
    whole = sum(totals.values()) or 1.0
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:8]
    return {op: round(100 * t / whole, 1) for op, t in top}


def export_all(resolution: int, folder: Path, formats: list[str]) -> dict[str, dict]:
    """Export Nano at `resolution` to each format: seconds (verification included), MB, max difference."""
    import rfdetr_fn as rf
    from rfdetr_fn.deploy.verify import SKIPPED

    cfg = rf.presets.nano(resolution=resolution)
    params = rf.init(cfg, seed=0)
    out = {}
    for fmt in formats:
        report = rf.export(params, cfg, folder / f"nano{resolution}.{fmt}")
        worst = max(v for d in report.differences.values() for k, v in d.items() if k != SKIPPED)
        out[fmt] = {"seconds": report.seconds, "mb": report.size_bytes / 1e6, "max_diff": worst}
        print(f"  exported {fmt} at {resolution}: {report.summary()}", flush=True)
    return out


def child(runtime: str, resolution: int, file: Path | None, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", runtime, "--resolution", str(resolution)]
    cmd += ["--threads", str(args.threads), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    cmd += ["--file", str(file)] if file else []
    cmd += ["--profile"] if args.profile else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.child_timeout} s"}
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=int, nargs="+", default=[384, 640])
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="onnxruntime time per operator type")
    p.add_argument("--child-timeout", type=int, default=3600)
    p.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(f"CPU: {describe_cpu()}; torch {torch.__version__}; {args.threads} threads; batch 1", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res in args.resolutions:
            formats = [f for f in ("onnx", "pt2") if f in args.runtimes]
            exports = export_all(res, Path(tmp), formats)
            results = {}
            for runtime in args.runtimes:
                file = Path(tmp) / f"nano{res}.{runtime}" if runtime in ("onnx", "pt2") else None
                results[runtime] = child(runtime, res, file, args)
                print(f"  {runtime} at {res}: {results[runtime]}", flush=True)
            rows += _rows(res, results, exports)
    print()
    print("| resolution | runtime | batch-1 median ms | vs eager | first call s | export s | file MB | max diff |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


def _rows(res: int, results: dict[str, dict], exports: dict[str, dict]) -> list[str]:
    eager = results.get("eager", {}).get("median_ms")
    rows = []
    for runtime, r in results.items():
        if "error" in r:
            rows.append(f"| {res} | {runtime} | {r['error']} | | | | | |")
            continue
        ratio = f"{eager / r['median_ms']:.2f}x" if eager else "-"
        e = exports.get(runtime, {})
        cells = [f"{r['median_ms']:.1f}", ratio, f"{r['first_s']:.1f}"]
        cells += [f"{e['seconds']:.1f}", f"{e['mb']:.1f}", f"{e['max_diff']:.1e}"] if e else ["-", "-", "-"]
        rows.append(f"| {res} | {runtime} | " + " | ".join(cells) + " |")
        if r.get("profile"):
            rows.append(f"| {res} | {runtime} op share % | " + ", ".join(f"{k} {v}" for k, v in r["profile"].items()))
    return rows


if __name__ == "__main__":
    main()
