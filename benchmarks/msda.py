"""Benchmark: Triton deformable attention vs the grid_sample reference at RF-DETR shapes.

    python benchmarks/msda.py --device cuda            # full table, fp32 and bf16
    python benchmarks/msda.py --device cuda --sweep    # also rows per program for the Triton kernels
    python benchmarks/msda.py --device cpu             # reference only
    python benchmarks/msda.py --device cpu --interpreter   # plus Triton's interpreter, tiny shape only

Times are medians in microseconds (CUDA events on GPU). "GB/s" counts each input and output tensor once
(value, locations, weights, output; plus grad_out and the three grads for backward), a lower bound on traffic,
and "% bw" compares it with a measured device-to-device copy. The reference gets spatial shapes as a Python
list (no host sync); Triton gets an int64 tensor on the device.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rfdetr_fn.kernels import ms_deform_attn_reference, ms_deform_attn_triton, msda_triton

# (name, batch, queries, heads, head dim, points, spatial shapes)
CONFIGS = [
    ("train S=576 B=4", 4, 3900, 16, 16, 2, [(24, 24)]),
    ("train S=576 B=8", 8, 3900, 16, 16, 2, [(24, 24)]),
    ("train S=1936 B=4", 4, 3900, 16, 16, 2, [(44, 44)]),
    ("train S=1936 B=8", 8, 3900, 16, 16, 2, [(44, 44)]),
    ("infer S=576 B=1", 1, 300, 16, 16, 2, [(24, 24)]),
    ("infer S=1936 B=8", 8, 300, 16, 16, 2, [(44, 44)]),
    ("large_dep train B=4", 4, 3900, 24, 16, 4, [(80, 80), (20, 20)]),
    ("large_dep infer B=1", 1, 300, 24, 16, 4, [(80, 80), (20, 20)]),
]
TINY = [("tiny B=1", 1, 50, 4, 16, 2, [(8, 8), (4, 4)])]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(batch, queries, heads, dim, points, shapes, dtype, device):
    gen = torch.Generator().manual_seed(0)
    s = sum(h * w for h, w in shapes)
    levels = len(shapes)
    value = torch.randn(batch, s, heads, dim, generator=gen)
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=gen) * 1.2 - 0.1
    attw = torch.rand(batch, queries, heads, levels * points, generator=gen).softmax(-1)
    attw = attw.view(batch, queries, heads, levels, points)
    return [t.to(device=device, dtype=dtype) for t in (value, loc, attw)]


def timer(fn, device: str, reps: int, warmup: int) -> float:
    """Median time of fn() in microseconds."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy, counting the read and the write."""
    n = (1 << 28) if device == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src), device, reps=20, warmup=3)
    return 2 * src.numel() * 4 / (us * 1e-6)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(fn, shapes_arg, inputs, device, reps, warmup):
    """(fwd, bwd, fwd+bwd) microseconds for one implementation."""
    value, loc, attw = inputs
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.no_grad():
        out = fn(value, shapes_arg, loc, attw)
    gout = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            fn(value, shapes_arg, loc, attw)

    graph_out = fn(leaves[0], shapes_arg, leaves[1], leaves[2])

    def bwd():
        torch.autograd.grad(graph_out, leaves, gout, retain_graph=True)

    def fwd_bwd():
        o = fn(leaves[0], shapes_arg, leaves[1], leaves[2])
        torch.autograd.grad(o, leaves, gout)

    return [timer(f, device, reps, warmup) for f in (fwd, bwd, fwd_bwd)], out, gout


def graphed_fwd_bwd(fn, shapes_arg, inputs, device, reps, warmup) -> float:
    """fwd+bwd replayed from one CUDA graph: GPU time without launch overhead (us); nan if capture fails."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    gout = torch.randn(inputs[2].shape[:3] + (inputs[0].shape[-1],), device=device, dtype=inputs[0].dtype)
    gout = gout.flatten(2)

    def step():
        out = fn(leaves[0], shapes_arg, leaves[1], leaves[2])
        return torch.autograd.grad(out, leaves, gout)

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return timer(graph.replay, device, reps, warmup)
    except Exception as exc:  # report and carry on: the eager table is the main result
        print(f"(CUDA graph capture failed for {getattr(fn, '__name__', fn)}: {exc!r})", flush=True)
        return float("nan")


def run_table(configs, dtypes, device, with_triton, reps, warmup, bandwidth, graphs=False):
    header = (
        "| shape | dtype | ref fwd | ref bwd | ref f+b | tri fwd | tri bwd | tri f+b | speedup f+b | "
        "tri fwd GB/s (% bw) | tri bwd GB/s (% bw) |"
        + (" ref f+b graph | tri f+b graph | graph speedup |" if graphs else "")
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, batch, queries, heads, dim, points, shapes in configs:
        for dname in dtypes:
            inputs = make_inputs(batch, queries, heads, dim, points, shapes, DTYPES[dname], device)
            ref_t, out, gout = measure(ms_deform_attn_reference, shapes, inputs, device, reps, warmup)
            row = [name, dname] + [f"{t:.0f}" for t in ref_t]
            if with_triton:
                shapes_t = torch.tensor(shapes, dtype=torch.int64, device=device)
                tri_t, _, _ = measure(ms_deform_attn_triton, shapes_t, inputs, device, reps, warmup)
                fwd_bytes = nbytes(*inputs, out)
                bwd_bytes = nbytes(gout, *inputs) * 2  # read the inputs, write a grad of each
                fwd_bw = fwd_bytes / (tri_t[0] * 1e-6)
                bwd_bw = bwd_bytes / (tri_t[1] * 1e-6)
                row += [f"{t:.0f}" for t in tri_t]
                row += [
                    f"{ref_t[2] / tri_t[2]:.2f}x",
                    f"{fwd_bw / 1e9:.0f} ({100 * fwd_bw / bandwidth:.0f}%)",
                    f"{bwd_bw / 1e9:.0f} ({100 * bwd_bw / bandwidth:.0f}%)",
                ]
            else:
                row += ["-"] * 6
            if graphs and with_triton:
                ref_g = graphed_fwd_bwd(ms_deform_attn_reference, shapes, inputs, device, reps, warmup)
                tri_g = graphed_fwd_bwd(ms_deform_attn_triton, shapes_t, inputs, device, reps, warmup)
                row += [f"{ref_g:.0f}", f"{tri_g:.0f}", f"{ref_g / tri_g:.2f}x"]
            print("| " + " | ".join(row) + " |", flush=True)


def run_sweep(device, reps, warmup):
    """Rows per program and warps for the raw kernels at the first training shape."""
    name, batch, queries, heads, dim, points, shapes = CONFIGS[0]
    shapes_t = torch.tensor(shapes, dtype=torch.int64, device=device)
    print(f"\nSweep at {name} (raw kernel time, us)\n")
    print("| dtype | BLOCK_R | warps | fwd us | bwd us |")
    print("|---|---|---|---|---|")
    for dname in ("fp32", "bf16"):
        value, loc, attw = make_inputs(batch, queries, heads, dim, points, shapes, DTYPES[dname], device)
        gout = torch.randn(batch, queries, heads * dim, device=device, dtype=value.dtype)
        for block, warps in ((32, 2), (64, 4), (128, 4), (256, 4), (256, 8), (512, 8)):
            fwd_args = (value, shapes_t, loc, attw, block, warps)
            bwd_args = (gout, *fwd_args)
            f = timer(lambda a=fwd_args: msda_triton.forward(*a), device, reps, warmup)
            b = timer(lambda a=bwd_args: msda_triton.backward(*a), device, reps, warmup)
            print(f"| {dname} | {block} | {warps} | {f:.0f} | {b:.0f} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 50 cuda, 3 cpu)")
    parser.add_argument("--interpreter", action="store_true", help="on cpu, also time Triton's interpreter")
    parser.add_argument("--sweep", action="store_true", help="also sweep rows per program and warps (cuda)")
    parser.add_argument("--graphs", action="store_true", help="also time fwd+bwd replayed from a CUDA graph")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {d!r} (choose from {', '.join(DTYPES)})")

    import triton

    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    bandwidth = copy_bandwidth(args.device)
    print(f"torch {torch.__version__}, triton {triton.__version__}, device {card}")
    print(f"measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write)\n")
    cuda = args.device == "cuda"
    reps = args.reps or (50 if cuda else 3)
    warmup = 5 if cuda else 1
    configs = CONFIGS if cuda or not args.interpreter else TINY
    run_table(configs, dtypes, args.device, cuda or args.interpreter, reps, warmup, bandwidth, args.graphs and cuda)
    if args.sweep and cuda:
        run_sweep(args.device, reps, warmup)


if __name__ == "__main__":
    main()
