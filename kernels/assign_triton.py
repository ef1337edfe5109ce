"""Triton kernel for batched linear assignment: one program solves one problem, loops inside the kernel.

The same shortest-augmenting-path algorithm as `rfdetr_fn.losses.assignment.shortest_augmenting_paths`
(Jonker-Volgenant with dual potentials, scipy's tie rule), but where the torch version must run every
problem for the worst-case number of steps with static loop bounds, here each program loops only as long
as its own problem needs (a data-dependent `while` on the device, no host involvement): one launch per
solve, capturable in a CUDA graph. A problem's whole state lives in registers: the column potentials,
assignments, distances and path (vectors over the Q queries, padded to BLOCK_Q) and the row potentials
and assignments (over the T targets, padded to BLOCK_T). Triton has no register indexing, so reading one
element of such a vector is a masked sum. Costs are float64, like scipy's.

CPU tensors run under Triton's interpreter (tests); see msda_triton for how TRITON_INTERPRET is set.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _element(vec, ids, i):
    """vec[i] of a register vector whose positions are `ids`."""
    return tl.sum(tl.where(ids == i, vec, tl.zeros_like(vec)), axis=0)


@triton.jit
def _sap_kernel(cost_ptr, count_ptr, out_ptr, Q, T, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr):
    """Problem `program_id`: cost (T, Q) row-major at cost_ptr + n*T*Q; rows [0, count) get a column."""
    n = tl.program_id(0)
    cols = tl.arange(0, BLOCK_Q)
    rows = tl.arange(0, BLOCK_T)
    col_ok = cols < Q
    count = tl.load(count_ptr + n).to(tl.int32)
    base = cost_ptr + n.to(tl.int64) * T * Q
    v = tl.zeros([BLOCK_Q], dtype=tl.float64)
    u = tl.zeros([BLOCK_T], dtype=tl.float64)
    row4col = tl.full([BLOCK_Q], -1, tl.int32)
    col4row = tl.full([BLOCK_T], -1, tl.int32)
    for k in range(0, count):
        dist = tl.full([BLOCK_Q], float("inf"), tl.float64)
        path = tl.zeros([BLOCK_Q], dtype=tl.int32)
        seen_col = cols >= Q  # padding lanes count as visited: never picked
        seen_row = rows < 0
        popped = tl.zeros([BLOCK_T], dtype=tl.float64)  # each visited row's distance when reached
        min_val = tl.sum(popped, axis=0)
        row = k
        sink = k - k - 1
        while sink < 0:
            seen_row = seen_row | (rows == row)
            c = tl.load(base + row * Q + cols, mask=col_ok, other=float("inf"))
            reduced = min_val + c - _element(u, rows, row) - v
            better = (reduced < dist) & ~seen_col
            dist = tl.where(better, reduced, dist)
            path = tl.where(better, row, path)
            open_dist = tl.where(seen_col, float("inf"), dist)
            lowest = tl.min(open_dist, axis=0)
            ties = open_dist == lowest
            score = ties.to(tl.int32) * 2 + (ties & (row4col < 0)).to(tl.int32)  # free columns first
            col = tl.min(tl.where(score == tl.max(score, axis=0), cols, BLOCK_Q), axis=0)  # then lowest index
            min_val = lowest
            seen_col = seen_col | (cols == col)
            owner = _element(row4col, cols, col)
            popped = tl.where(rows == owner, lowest, popped)
            sink = tl.where(owner < 0, col, -1)
            row = tl.where(owner < 0, row, owner)
        # dual update, then flip the path from the sink back to row k
        u = tl.where(seen_row & (rows != k), u + min_val - popped, u)
        u = tl.where(rows == k, u + min_val, u)
        v = tl.where(seen_col & col_ok, v - (min_val - dist), v)
        col = sink
        row = k - k - 1
        while row != k:
            row = _element(path, cols, col)
            row4col = tl.where(cols == col, row, row4col)
            previous = _element(col4row, rows, row)
            col4row = tl.where(rows == row, col, col4row)
            col = previous
    tl.store(out_ptr + n.to(tl.int64) * T + rows, col4row.to(tl.int64), mask=rows < T)


def block_sizes(queries: int, targets: int) -> tuple[int, int]:
    return triton.next_power_of_2(max(queries, 2)), triton.next_power_of_2(max(targets, 2))


def solve(cost: Tensor, n_valid: Tensor) -> Tensor:
    """(N, T, Q) float64 costs (T <= Q, finite) and (N,) counts -> (N, T) int64 column per row, -1 = none."""
    n, targets, queries = cost.shape
    out = torch.empty((n, targets), dtype=torch.int64, device=cost.device)
    if n == 0 or targets == 0:
        return out.fill_(-1)
    counts = n_valid.to(device=cost.device, dtype=torch.int32).clamp(0, targets).contiguous()
    block_q, block_t = block_sizes(queries, targets)
    _sap_kernel[(n,)](cost.contiguous(), counts, out, queries, targets, BLOCK_Q=block_q, BLOCK_T=block_t, num_warps=4)
    return out
