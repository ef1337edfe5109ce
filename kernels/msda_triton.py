"""Triton kernels for multi-scale deformable attention: fused forward and backward.

One program owns a tile of BLOCK_R rows, a row being one (batch, query, head) triple, and all D channels
of that head. Flattening (N, Q, H) into rows keeps the location, weight and output tiles contiguous.
Sampling matches `F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`; every sum
runs in fp32 and results are cast to the input dtypes.

CPU tensors run under Triton's interpreter, which Triton only enables for functions decorated while
TRITON_INTERPRET=1 (its own `tl` helpers included). So on a machine without CUDA this module (and msda_op)
sets that variable before importing triton, unless triton was already imported; tests set it in conftest.
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
def _row_tile(R, Q, S, HEADS: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows, their mask, channel offsets/mask and each row's base offset into value."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    head = rows % HEADS
    batch = rows // (Q * HEADS)
    chans = tl.arange(0, BLOCK_D)
    if BLOCK_D == D:  # no channel mask: a constant mask lets the gathers vectorise
        chan_ok = tl.full((BLOCK_D,), 1, tl.int1)
    else:
        chan_ok = chans < D
    # value is (N, S, H, D): (n, s, h, c) sits at ((n * S + s) * H + h) * D + c
    vbase = (batch.to(tl.int64) * S * HEADS + head) * D
    return rows.to(tl.int64), row_ok, chans, chan_ok[None, :], vbase


@triton.jit
def _corners(lx, ly, hl, wl, start, vbase, token_stride, row_ok):
    """grid_sample's bilinear corners of one sampling point per row: the fractions, the value offset of the
    top-left corner and which of the four corners lie inside the level (outside ones read zero).

    Unnormalises grid = 2 * loc - 1 with align_corners=False. Everything is per row (1-D); callers
    broadcast over channels, which keeps the address arithmetic out of the (rows, channels) tile.
    """
    x = ((2.0 * lx.to(tl.float32) - 1.0 + 1.0) * wl - 1.0) * 0.5
    y = ((2.0 * ly.to(tl.float32) - 1.0 + 1.0) * hl - 1.0) * 0.5
    xf = tl.floor(x)
    yf = tl.floor(y)
    x0 = xf.to(tl.int32)
    y0 = yf.to(tl.int32)
    x_in0 = (x0 >= 0) & (x0 < wl)
    x_in1 = (x0 + 1 >= 0) & (x0 + 1 < wl)
    y_in0 = (y0 >= 0) & (y0 < hl)
    y_in1 = (y0 + 1 >= 0) & (y0 + 1 < hl)
    base00 = vbase + (start + y0 * wl + x0).to(tl.int64) * token_stride
    in00 = row_ok & y_in0 & x_in0
    in01 = row_ok & y_in0 & x_in1
    in10 = row_ok & y_in1 & x_in0
    in11 = row_ok & y_in1 & x_in1
    return x - xf, y - yf, base00, in00, in01, in10, in11


@triton.jit
def _msda_fwd(
    value_ptr,
    shapes_ptr,
    loc_ptr,
    attw_ptr,
    out_ptr,
    R,
    Q,
    S,
    HEADS: tl.constexpr,
    D: tl.constexpr,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows64, row_ok, chans, cmask, vbase = _row_tile(R, Q, S, HEADS, D, BLOCK_R, BLOCK_D)
    token_stride = HEADS * D
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    start = 0
    for lvl in tl.static_range(LEVELS):
        hl = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        wl = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        for pt in tl.static_range(POINTS):
            k = lvl * POINTS + pt
            loc_off = rows64 * (LEVELS * POINTS * 2) + 2 * k
            lx = tl.load(loc_ptr + loc_off, mask=row_ok, other=0.0)
            ly = tl.load(loc_ptr + loc_off + 1, mask=row_ok, other=0.0)
            w = tl.load(attw_ptr + rows64 * (LEVELS * POINTS) + k, mask=row_ok, other=0.0).to(tl.float32)
            fx, fy, base00, in00, in01, in10, in11 = _corners(lx, ly, hl, wl, start, vbase, token_stride, row_ok)
            p00 = value_ptr + base00
            v00 = tl.load(p00[:, None] + chans[None, :], mask=in00[:, None] & cmask, other=0.0).to(tl.float32)
            v01 = tl.load(p00[:, None] + token_stride + chans[None, :], mask=in01[:, None] & cmask, other=0.0).to(
                tl.float32
            )
            v10 = tl.load(p00[:, None] + wl * token_stride + chans[None, :], mask=in10[:, None] & cmask, other=0.0).to(
                tl.float32
            )
            v11 = tl.load(
                p00[:, None] + (wl + 1) * token_stride + chans[None, :], mask=in11[:, None] & cmask, other=0.0
            ).to(tl.float32)
            w00 = w * (1.0 - fx) * (1.0 - fy)
            w01 = w * fx * (1.0 - fy)
            w10 = w * (1.0 - fx) * fy
            w11 = w * fx * fy
            acc += w00[:, None] * v00 + w01[:, None] * v01
            acc += w10[:, None] * v10 + w11[:, None] * v11
        start += hl * wl
    out_ptrs = out_ptr + rows64[:, None] * D + chans[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & cmask)


@triton.jit
def _msda_bwd(
    gout_ptr,
    value_ptr,
    shapes_ptr,
    loc_ptr,
    attw_ptr,
    gvalue_ptr,
    gloc_ptr,
    gattw_ptr,
    R,
    Q,
    S,
    HEADS: tl.constexpr,
    D: tl.constexpr,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows64, row_ok, chans, cmask, vbase = _row_tile(R, Q, S, HEADS, D, BLOCK_R, BLOCK_D)
    token_stride = HEADS * D
    gout = tl.load(gout_ptr + rows64[:, None] * D + chans[None, :], mask=row_ok[:, None] & cmask, other=0.0).to(
        tl.float32
    )
    start = 0
    for lvl in tl.static_range(LEVELS):
        hl = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        wl = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        for pt in tl.static_range(POINTS):
            k = lvl * POINTS + pt
            loc_off = rows64 * (LEVELS * POINTS * 2) + 2 * k
            lx = tl.load(loc_ptr + loc_off, mask=row_ok, other=0.0)
            ly = tl.load(loc_ptr + loc_off + 1, mask=row_ok, other=0.0)
            w = tl.load(attw_ptr + rows64 * (LEVELS * POINTS) + k, mask=row_ok, other=0.0).to(tl.float32)
            fx, fy, base00, in00, in01, in10, in11 = _corners(lx, ly, hl, wl, start, vbase, token_stride, row_ok)
            m00 = in00[:, None] & cmask
            m01 = in01[:, None] & cmask
            m10 = in10[:, None] & cmask
            m11 = in11[:, None] & cmask
            o00 = base00[:, None] + chans[None, :]
            o01 = o00 + token_stride
            o10 = o00 + wl * token_stride
            o11 = o10 + token_stride
            v00 = tl.load(value_ptr + o00, mask=m00, other=0.0).to(tl.float32)
            v01 = tl.load(value_ptr + o01, mask=m01, other=0.0).to(tl.float32)
            v10 = tl.load(value_ptr + o10, mask=m10, other=0.0).to(tl.float32)
            v11 = tl.load(value_ptr + o11, mask=m11, other=0.0).to(tl.float32)
            fx2 = fx[:, None]
            fy2 = fy[:, None]
            top = v00 + fx2 * (v01 - v00)
            bottom = v10 + fx2 * (v11 - v10)
            sampled = top + fy2 * (bottom - top)
            ds_dx = (1.0 - fy2) * (v01 - v00) + fy2 * (v11 - v10)
            ds_dy = bottom - top
            # d(pixel x)/d(loc x) = W and d(pixel y)/d(loc y) = H
            g_w = tl.sum(gout * sampled, axis=1)
            g_x = tl.sum(gout * ds_dx, axis=1) * w * wl
            g_y = tl.sum(gout * ds_dy, axis=1) * w * hl
            tl.store(gattw_ptr + rows64 * (LEVELS * POINTS) + k, g_w.to(gattw_ptr.dtype.element_ty), mask=row_ok)
            tl.store(gloc_ptr + loc_off, g_x.to(gloc_ptr.dtype.element_ty), mask=row_ok)
            tl.store(gloc_ptr + loc_off + 1, g_y.to(gloc_ptr.dtype.element_ty), mask=row_ok)
            gw = gout * w[:, None]
            tl.atomic_add(gvalue_ptr + o00, gw * ((1.0 - fx) * (1.0 - fy))[:, None], mask=m00, sem="relaxed")
            tl.atomic_add(gvalue_ptr + o01, gw * (fx * (1.0 - fy))[:, None], mask=m01, sem="relaxed")
            tl.atomic_add(gvalue_ptr + o10, gw * ((1.0 - fx) * fy)[:, None], mask=m10, sem="relaxed")
            tl.atomic_add(gvalue_ptr + o11, gw * (fx * fy)[:, None], mask=m11, sem="relaxed")
        start += hl * wl


def _interpreted(kernel) -> bool:
    """True when Triton built `kernel` for its interpreter (TRITON_INTERPRET=1 at decoration)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


INTERPRETED = _interpreted(_msda_fwd)


def _check_device(device: torch.device) -> None:
    """CPU tensors need the interpreter; fail clearly instead of Triton's '0 active drivers'."""
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "ms_deform_attn_triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "triton is first imported (or use ms_deform_attn / the reference on CPU)"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"ms_deform_attn_triton: unsupported device {device}")


def _block_rows(rows: int, device: torch.device, backward: bool, block_r: int | None) -> int:
    """Rows per program. The interpreter pays per op per program, so CPU uses one or a few huge tiles."""
    if block_r is not None:
        return block_r
    if device.type != "cuda" or INTERPRETED:
        return min(triton.next_power_of_2(max(rows, 1)), 2048)
    return 64 if backward else 128


def _dims(value: Tensor, sampling_locations: Tensor) -> tuple[int, int, int, int, int, int, int]:
    n, s, heads, d = value.shape
    q, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    return n, s, heads, d, q, levels, points


def forward(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    block_r: int | None = None,
    num_warps: int = 4,
) -> Tensor:
    """Launch the forward kernel. Inputs must be contiguous; spatial_shapes int64 (L, 2) on value's device.
    Returns (N, Q, H*D) in value's dtype."""
    n, s, heads, d, q, levels, points = _dims(value, sampling_locations)
    out = torch.empty((n, q, heads * d), dtype=value.dtype, device=value.device)
    rows = n * q * heads
    if rows == 0:
        return out
    _check_device(value.device)
    block = _block_rows(rows, value.device, False, block_r)
    extra = {} if INTERPRETED else {"num_warps": num_warps}
    _msda_fwd[(triton.cdiv(rows, block),)](
        value,
        spatial_shapes,
        sampling_locations,
        attention_weights,
        out,
        rows,
        q,
        s,
        HEADS=heads,
        D=d,
        LEVELS=levels,
        POINTS=points,
        BLOCK_R=block,
        BLOCK_D=triton.next_power_of_2(d),
        **extra,
    )
    return out


def backward(
    grad_out: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    block_r: int | None = None,
    num_warps: int = 4,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernel: grads of value, locations and weights, each in its input's dtype.
    grad value is scattered with fp32 atomics, then cast."""
    n, s, heads, d, q, levels, points = _dims(value, sampling_locations)
    gvalue = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    gloc = torch.empty_like(sampling_locations)
    gattw = torch.empty_like(attention_weights)
    rows = n * q * heads
    if rows > 0:
        _check_device(value.device)
        block = _block_rows(rows, value.device, True, block_r)
        extra = {} if INTERPRETED else {"num_warps": num_warps}
        _msda_bwd[(triton.cdiv(rows, block),)](
            grad_out,
            value,
            spatial_shapes,
            sampling_locations,
            attention_weights,
            gvalue,
            gloc,
            gattw,
            rows,
            q,
            s,
            HEADS=heads,
            D=d,
            LEVELS=levels,
            POINTS=points,
            BLOCK_R=block,
            BLOCK_D=triton.next_power_of_2(d),
            **extra,
        )
    return gvalue.to(value.dtype), gloc, gattw
