"""Device assignment solver vs scipy on one train step's whole batch of matching problems.

    python benchmarks/assignment.py --device cuda --batch-size 4 16
    python benchmarks/assignment.py --device cpu --batch-size 2 --reps 3

Nano's matching at batch B: 3 matched layers (final, aux, encoder) x 13 groups x B images problems of
300 queries x T target slots, with costs built by the real matcher (`match_costs`) from random
predictions and targets. Rows, timed interleaved (median of --reps): scipy (`hungarian`: the host copy
and one solve per problem), the device op (`assign_device`: Triton on CUDA, torch ops elsewhere), the
torch-ops solver run eagerly, and on CUDA both device solvers replayed from a captured CUDA graph. Every
device answer is checked against scipy's (continuous costs: one optimum, so they must be identical).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rfdetr_fn.losses.assignment import assign_device, hungarian, sanitize_cost_batched, shortest_augmenting_paths
from rfdetr_fn.losses.matcher import MatchCosts, match_costs

LAYERS, GROUPS, QUERIES, CLASSES = 3, 13, 300, 90


def step_problems(batch: int, slots: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(L*B*G, Q, T) costs and target counts as one step of Nano training hands them to the solver."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (batch, slots), generator=gen)
    counts = torch.randint(slots // 2, slots + 1, (batch,), generator=gen)
    labels[torch.arange(slots)[None, :] >= counts[:, None]] = -1
    boxes = torch.cat(
        [torch.rand(batch, slots, 2, generator=gen) * 0.6 + 0.2, torch.rand(batch, slots, 2) * 0.3 + 0.05], -1
    )
    targets = {"labels": labels.to(device), "boxes": boxes.to(device)}
    costs = []
    for _ in range(LAYERS):
        layer = {
            "pred_logits": torch.randn(batch, GROUPS * QUERIES, CLASSES, generator=gen).to(device),
            "pred_boxes": torch.rand(batch, GROUPS * QUERIES, 4, generator=gen).mul(0.5).add(0.1).to(device),
        }
        total = match_costs(layer, targets, MatchCosts())["total"]  # (B, G*Q, T)
        costs.append(total.reshape(batch, GROUPS, QUERIES, slots).flatten(0, 1))
    n_valid = (targets["labels"] >= 0).sum(1).repeat_interleave(GROUPS).repeat(LAYERS)
    return torch.cat(costs), n_valid


def torch_ops_solve(cost: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    clean = sanitize_cost_batched(cost.to(torch.float64), n_valid).transpose(1, 2).contiguous()
    return shortest_augmenting_paths(clean, n_valid)


def graphed(fn, *args):
    """fn(*args) captured once in a CUDA graph; returns (replay, output buffer)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    return graph.replay, out


def solvers(cost: torch.Tensor, n_valid: torch.Tensor, cuda: bool) -> dict:
    """label -> a zero-argument call returning the (N, T) answer."""
    out = {
        "scipy (host)": lambda: hungarian(cost, n_valid),
        "device op": lambda: assign_device(cost, n_valid),
        "torch ops, eager": lambda: torch_ops_solve(cost, n_valid),
    }
    if cuda:
        for label, fn in (("device op", assign_device), ("torch ops", torch_ops_solve)):
            replay, answer = graphed(fn, cost, n_valid)
            out[f"{label}, CUDA graph"] = lambda replay=replay, answer=answer: (replay(), answer)[1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 32], help="target slots T (padded)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (a shared 2-core host: 1 is faster)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"assignment: Nano step problems, device={name} torch={torch.__version__}")
    print("| batch | T | problems | variant | ms (median) | vs scipy | equal to scipy |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch_size:
        for slots in args.slots:
            cost, n_valid = step_problems(batch, slots, device)
            variants = solvers(cost, n_valid, cuda)
            want = hungarian(cost, n_valid)
            times: dict[str, list[float]] = {k: [] for k in variants}
            answers = {k: fn() for k, fn in variants.items()}  # warm-up, and the answers to check
            for _ in range(args.reps):  # interleaved: every variant sees the same machine state
                for label, fn in variants.items():
                    sync()
                    start = time.perf_counter()
                    fn()
                    sync()
                    times[label].append(time.perf_counter() - start)
            base = statistics.median(times["scipy (host)"])
            for label, found in answers.items():
                ms = statistics.median(times[label])
                same = torch.equal(found.cpu(), want.cpu())
                print(f"| {batch} | {slots} | {cost.shape[0]} | {label} | {ms * 1e3:.2f} | {base / ms:.1f}x | {same} |")


if __name__ == "__main__":
    main()
