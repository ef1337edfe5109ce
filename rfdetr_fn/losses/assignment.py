"""Batched linear assignment for the matcher: scipy on the host, or an exact solver on the device.

Both solve N independent problems given as one padded cost (N, Q, T): problem i uses target columns
[0, n_valid[i]) and every query row, and the answer (N, T) int64 holds the query matched to each target
column, -1 for padding. Both are `torch.library` custom ops with fake implementations, so each is one
opaque node under `torch.compile(fullgraph=True)` and `torch.func`.

- `hungarian`: scipy's `linear_sum_assignment` per problem, on the host. On CUDA the costs are copied
  over, which is a sync point (one per call), and the answer goes back from pinned memory.
- `assign_device`: a shortest-augmenting-path solver (Jonker-Volgenant with dual potentials, the same
  algorithm scipy runs) vectorised over the N problems in torch ops. It never reads a value on the host:
  target rows are augmented one at a time with static loop bounds (augmenting row k needs at most k + 1
  Dijkstra steps and a path of at most k + 1 edges) and finished problems are masked, not skipped. So it
  runs inside a CUDA graph, and it gives scipy's assignment wherever the optimum is unique (ties pick a
  free column first, then the lowest index, like scipy; with several optima it returns one of equal cost).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from rfdetr_fn.kernels.msda_op import _triton_available

BACKENDS = ("auto", "scipy", "device")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> the device solver on CUDA (no host round trip), scipy elsewhere (fastest on a CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"matcher backend {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        return "device" if device.type == "cuda" else "scipy"
    return backend


def solve(cost: Tensor, n_valid: Tensor, backend: str = "auto") -> Tensor:
    """(N, Q, T) costs and (N,) target counts -> (N, T) matched query per target column, -1 = none."""
    if resolve_backend(backend, cost.device) == "device":
        return assign_device(cost, n_valid)
    return hungarian(cost, n_valid)


# ------------------------------------------------------------------------------------------ scipy (host)
def sanitize_cost(cost: np.ndarray) -> np.ndarray:
    """Replace non-finite entries by a finite value above every real cost (scipy rejects inf/NaN)."""
    finite = np.isfinite(cost)
    if finite.all():
        return cost
    real = cost[finite]
    fill = real.max() + np.abs(real).max() + 1.0 if real.size else 0.0
    return np.where(finite, cost, fill)


@torch.library.custom_op("rfdetr_fn::hungarian", mutates_args=())
def hungarian(cost: Tensor, n_valid: Tensor) -> Tensor:
    """scipy per problem. Leaves targets beyond the Q queries unmatched (scipy picks the best subset).

    Runs on the host: CUDA costs are copied over, which is a sync point, as in any scipy-based matcher.
    It is the only one: costs and counts travel in one copy, and the answer goes back from pinned memory
    without waiting.
    """
    packed = torch.cat([cost.detach().reshape(-1).to(torch.float64), n_valid.detach().to(torch.float64)])
    host = packed.cpu().numpy()
    cost_np = host[: cost.numel()].reshape(cost.shape)
    out = np.full((cost.shape[0], cost.shape[2]), -1, dtype=np.int64)
    for i, count in enumerate(host[cost.numel() :].tolist()):
        count = min(int(count), cost.shape[2])
        if count <= 0:
            continue
        rows, cols = linear_sum_assignment(sanitize_cost(cost_np[i, :, :count]))
        out[i, cols] = rows
    answer = torch.from_numpy(out)
    if cost.device.type != "cuda":
        return answer.to(cost.device)
    return answer.pin_memory().to(cost.device, non_blocking=True)


@hungarian.register_fake
def _(cost: Tensor, n_valid: Tensor) -> Tensor:
    return cost.new_empty((cost.shape[0], cost.shape[2]), dtype=torch.int64)


# ------------------------------------------------------------------------------------ device (no syncs)
def sanitize_cost_batched(cost: Tensor, n_valid: Tensor) -> Tensor:
    """`sanitize_cost` per problem over its valid columns, in tensor ops (no host read)."""
    valid = torch.arange(cost.shape[2], device=cost.device) < n_valid[:, None]  # (N, T)
    finite = torch.isfinite(cost)
    real = finite & valid[:, None, :]
    low = torch.finfo(cost.dtype).min
    top = torch.where(real, cost, low).amax((1, 2))
    size = torch.where(real, cost.abs(), 0.0).amax((1, 2))
    fill = torch.where(real.any(2).any(1), top + size + 1.0, 0.0)
    return torch.where(finite, cost, fill[:, None, None])


def _pick(values: Tensor, index: Tensor) -> Tensor:
    """values[n, index[n]] for (N, K) values and (N,) index."""
    return values.gather(1, index[:, None]).squeeze(1)


def _put(values: Tensor, index: Tensor, new: Tensor, where: Tensor) -> Tensor:
    """values with values[n, index[n]] = new[n] where `where[n]` (index clamped: masked rows may hold -1)."""
    index = index.clamp(min=0)
    return values.scatter(1, index[:, None], torch.where(where, new, _pick(values, index))[:, None])


def shortest_augmenting_paths(cost: Tensor, n_valid: Tensor) -> Tensor:
    """Exact min-cost assignment of rows to columns for (N, R, C) costs with R <= C: (N, R) column per row.

    Rows [0, n_valid[n]) of problem n are assigned (the rest get -1); costs must be finite. Rows are
    added one at a time: a Dijkstra search over reduced costs `c - u - v` from the new row finds the
    cheapest path to a free column, the potentials u, v are updated so reduced costs stay >= 0, and the
    path is flipped. Each step of the search and of the flip is a few batched tensor ops; problems that
    finished early keep their values through `torch.where`.
    """
    n, rows, cols = cost.shape
    if rows > cols:
        raise ValueError(f"device assignment needs rows <= columns (targets <= queries), got {rows} > {cols}")
    col_ids = torch.arange(cols, device=cost.device)
    row_ids = torch.arange(rows, device=cost.device)
    u = cost.new_zeros(n, rows)
    v = cost.new_zeros(n, cols)
    col4row = torch.full((n, rows), -1, dtype=torch.int64, device=cost.device)
    row4col = torch.full((n, cols), -1, dtype=torch.int64, device=cost.device)
    for k in range(rows):
        todo = n_valid > k
        dist = torch.full_like(v, float("inf"))  # shortest reduced path cost to each column
        path = torch.zeros_like(row4col)  # the row preceding each column on its shortest path
        seen_rows = torch.zeros_like(col4row, dtype=torch.bool)
        seen_cols = torch.zeros_like(row4col, dtype=torch.bool)
        min_val = cost.new_zeros(n)
        row = torch.full_like(n_valid, k, dtype=torch.int64)
        sink = torch.zeros_like(row)
        active = todo
        for _ in range(k + 1):  # k rows are assigned, so a free column is reached within k + 1 steps
            seen_rows = seen_rows | ((row_ids == row[:, None]) & active[:, None])
            row_cost = cost.gather(1, row[:, None, None].expand(-1, 1, cols)).squeeze(1)
            reduced = min_val[:, None] + row_cost - _pick(u, row)[:, None] - v
            better = (reduced < dist) & ~seen_cols & active[:, None]
            dist = torch.where(better, reduced, dist)
            path = torch.where(better, row[:, None], path)
            open_dist = torch.where(seen_cols, float("inf"), dist)
            lowest = open_dist.amin(1)
            ties = open_dist == lowest[:, None]
            col = (ties.to(torch.int8) * 2 + (ties & (row4col < 0)).to(torch.int8)).argmax(1)  # free first
            min_val = torch.where(active, lowest, min_val)
            seen_cols = seen_cols | ((col_ids == col[:, None]) & active[:, None])
            owner = _pick(row4col, col)
            found = active & (owner < 0)
            sink = torch.where(found, col, sink)
            row = torch.where(active & ~found, owner, row)
            active = active & ~found
        # dual update: reduced costs stay >= 0 and the path's edges become tight
        at_col = dist.gather(1, col4row.clamp(min=0))
        du = torch.where(row_ids == k, min_val[:, None], min_val[:, None] - at_col)
        u = torch.where(seen_rows & todo[:, None], u + du, u)
        v = torch.where(seen_cols & todo[:, None], v - (min_val[:, None] - dist), v)
        # flip the path from the sink back to row k
        col, going = sink, todo
        for _ in range(k + 1):
            row = _pick(path, col)
            row4col = _put(row4col, col, row, going)
            previous = _pick(col4row, row)
            col4row = _put(col4row, row, col, going)
            going = going & (row != k)
            col = torch.where(going, previous, col)
    return col4row


@torch.library.custom_op("rfdetr_fn::assign_device", mutates_args=())
def assign_device(cost: Tensor, n_valid: Tensor) -> Tensor:
    """Device-resident solve of (N, Q, T) costs (T <= Q), same result layout as `hungarian`.

    Works in float64 like scipy, so where the optimum is unique both return the same assignment. On CUDA
    it is one Triton launch (`kernels/assign_triton.py`: one program per problem, each looping only as
    long as its problem needs); elsewhere, or without Triton, the torch-ops version below.
    """
    if cost.shape[2] > cost.shape[1]:
        raise ValueError(
            f"device matcher: {cost.shape[2]} target slots exceed {cost.shape[1]} queries per group; "
            "use --train.matcher-backend scipy"
        )
    counts = n_valid.to(device=cost.device, dtype=torch.int64).clamp(0, cost.shape[2])
    clean = sanitize_cost_batched(cost.detach().to(torch.float64), counts).transpose(1, 2).contiguous()
    if cost.device.type == "cuda" and _triton_available():  # imports Triton (and the kernel) only here
        from rfdetr_fn.kernels import assign_triton

        return assign_triton.solve(clean, counts)
    return shortest_augmenting_paths(clean, counts)


@assign_device.register_fake
def _(cost: Tensor, n_valid: Tensor) -> Tensor:
    return cost.new_empty((cost.shape[0], cost.shape[2]), dtype=torch.int64)
