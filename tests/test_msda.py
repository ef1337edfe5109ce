"""Triton deformable attention against the grid_sample reference: forward, the three gradients, dtypes,
dispatch, and how the op behaves under torch.compile (dynamo) and torch.func.grad.

Without CUDA the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1): shapes stay small.
With CUDA the same comparisons run on the GPU, plus one at training-like size.
"""

from __future__ import annotations

import os

import pytest
import torch

from rfdetr_fn import kernels
from rfdetr_fn.kernels import (
    ms_deform_attn,
    ms_deform_attn_reference,
    ms_deform_attn_triton,
    msda_op,
    resolve_backend,
)

CUDA = torch.cuda.is_available()


def _interpreted() -> bool:
    from rfdetr_fn.kernels import msda_triton

    return msda_triton.INTERPRETED


# CPU tensors need the interpreter; on a CUDA machine (TRITON_INTERPRET unset) the kernels run on the GPU.
DEVICE = "cuda" if CUDA else "cpu"
NO_KERNELS = (
    None if CUDA or _interpreted() else "Triton interpreter is off: set TRITON_INTERPRET=1 before importing triton"
)


@pytest.fixture
def kernels_run():
    """For tests that launch a kernel: without one to run they skip, and fail under CI=true; the tests of
    dispatch, validation and caching run either way."""
    if NO_KERNELS:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(NO_KERNELS)
        pytest.skip(NO_KERNELS)


launches = pytest.mark.usefixtures("kernels_run")

# (name, spatial shapes (H, W) per level, batch, queries, heads, head dim, points)
CASES = [
    ("one_level", [(6, 7)], 2, 33, 4, 16, 2),
    ("three_levels", [(5, 6), (3, 4), (2, 2)], 2, 20, 2, 8, 3),
    ("odd_dim", [(4, 5), (2, 3)], 1, 17, 3, 12, 4),
]


def make_inputs(shapes, n, q, heads, d, points, dtype=torch.float32, seed=0, device=DEVICE):
    """Random inputs: locations outside [0, 1], some exactly on 0 and 1, and zeroed (padded) value rows."""
    gen = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    levels = len(shapes)
    value = torch.randn(n, s, heads, d, generator=gen)
    value[:, -3:] = 0.0  # padded tokens, as masked_fill leaves them
    loc = torch.rand(n, q, heads, levels, points, 2, generator=gen) * 1.3 - 0.15
    loc[:, 0] = 0.0
    loc[:, 1] = 1.0
    loc[:, 2, :, :, :, 0] = 0.0
    loc[:, 2, :, :, :, 1] = 1.0
    attw = torch.rand(n, q, heads, levels, points, generator=gen)
    attw = attw / attw.sum((-1, -2), keepdim=True)
    tensors = [t.to(device=device, dtype=dtype) for t in (value, loc, attw)]
    return tensors[0], torch.tensor(shapes, dtype=torch.int64, device=device), tensors[1], tensors[2]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude of the reference."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def fwd_bwd(fn, value, shapes, loc, attw, grad_out):
    leaves = [t.detach().requires_grad_() for t in (value, loc, attw)]
    out = fn(leaves[0], shapes, leaves[1], leaves[2])
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


@launches
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_forward_and_grads_match_reference(case):
    _, shapes, n, q, heads, d, points = case
    value, sshapes, loc, attw = make_inputs(shapes, n, q, heads, d, points)
    grad_out = torch.randn(n, q, heads * d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads = fwd_bwd(ms_deform_attn_triton, value, sshapes, loc, attw, grad_out)
    ref, ref_grads = fwd_bwd(ms_deform_attn_reference, value, sshapes, loc, attw, grad_out)
    assert out.shape == (n, q, heads * d) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    for name, g, r in zip(("value", "loc", "attw"), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == torch.float32, name
        assert rel_err(g, r) <= 1e-5, name
    # padded rows that no sample touches with weight keep zero output contribution: check the zeroed tokens'
    # gradient is still produced (they are sampled), i.e. padding is data, not a mask
    assert torch.isfinite(grads[0]).all()


@launches
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_half_precision_matches_fp32_reference(case, dtype):
    """Low-precision inputs: fp32 accumulation inside, outputs and grads in the input dtype, <= 1e-2 relative
    to the fp32 reference evaluated on the same (rounded) inputs."""
    _, shapes, n, q, heads, d, points = case
    value, sshapes, loc, attw = make_inputs(shapes, n, q, heads, d, points, dtype=dtype)
    grad_out = torch.randn(n, q, heads * d, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out, grads = fwd_bwd(ms_deform_attn_triton, value, sshapes, loc, attw, grad_out)
    ref, ref_grads = fwd_bwd(
        ms_deform_attn_reference, value.float(), sshapes, loc.float(), attw.float(), grad_out.float()
    )
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 1e-2
    for name, g, r in zip(("value", "loc", "attw"), grads, ref_grads):
        assert g.dtype == dtype, name
        assert rel_err(g, r) <= 1e-2, name


@launches
def test_list_shapes_and_samples_outside_give_zero():
    """spatial_shapes may be a list; a point entirely outside the map samples zeros (zero padding)."""
    value, _, loc, attw = make_inputs([(3, 4)], 1, 5, 2, 8, 1)
    loc[:, :3] = -0.75  # more than one pixel left/up of the map: every corner is out of bounds
    out = ms_deform_attn_triton(value, [(3, 4)], loc, attw)
    assert out[:, :3].abs().max().item() == 0.0
    assert rel_err(out, ms_deform_attn_reference(value, [(3, 4)], loc, attw)) <= 1e-5


@launches
def test_dispatch_and_backend_switch(monkeypatch):
    value, shapes, loc, attw = make_inputs([(3, 4)], 1, 6, 2, 8, 2)
    calls = []
    real = msda_op.ms_deform_attn_triton
    monkeypatch.setattr(msda_op, "ms_deform_attn_triton", lambda *a: calls.append(1) or real(*a))

    assert kernels.current_backend() == "auto"
    assert resolve_backend(torch.device("cpu")) == "reference"
    assert resolve_backend(torch.device("cuda")) == "triton"
    out = ms_deform_attn(value, shapes, loc, attw)
    if DEVICE == "cpu":
        assert not calls and torch.equal(out, ms_deform_attn_reference(value, shapes, loc, attw))
    else:
        assert calls == [1]

    calls.clear()
    with kernels.backend("reference"):  # a context the caller owns: gone after the block
        assert resolve_backend(torch.device("cuda")) == "reference"
        assert torch.equal(ms_deform_attn(value, shapes, loc, attw), ms_deform_attn_reference(value, shapes, loc, attw))
    assert not calls and kernels.current_backend() == "auto"

    assert resolve_backend(torch.device("cpu"), "triton") == "triton"
    out = ms_deform_attn(value, shapes, loc, attw, backend="triton")  # or per call
    assert calls == [1]
    assert rel_err(out, ms_deform_attn_reference(value, shapes, loc, attw)) <= 1e-5

    with pytest.raises(ValueError, match="bogus"), kernels.backend("bogus"):
        pass


def test_backend_env_var(monkeypatch):
    monkeypatch.setenv("RFDETR_FN_MSDA", "Reference")
    assert msda_op._backend_from_env() == "reference"
    monkeypatch.setenv("RFDETR_FN_MSDA", "")
    assert msda_op._backend_from_env() == "auto"
    monkeypatch.setenv("RFDETR_FN_MSDA", "cuda")
    with pytest.raises(ValueError, match="RFDETR_FN_MSDA"):
        msda_op._backend_from_env()


def test_bad_inputs_name_the_argument():
    value, shapes, loc, attw = make_inputs([(3, 4)], 1, 4, 2, 8, 2)
    with pytest.raises(ValueError, match="value"):
        ms_deform_attn_triton(value[0], shapes, loc, attw)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_triton(value, shapes, loc, attw[..., :1])
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn_triton(value, shapes, loc[..., :1], attw)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn_triton(value, [(3, 5)], loc, attw)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn_triton(value, torch.tensor([[3, 4], [1, 1]]), loc, attw)
    with pytest.raises(ValueError, match="spatial_shapes: sum"):
        ms_deform_attn_triton(value, torch.tensor([[3, 5]]), loc, attw)


@launches
def test_dynamo_sees_one_graph_without_breaks():
    value, shapes, loc, attw = make_inputs([(3, 4), (2, 2)], 1, 6, 2, 8, 2)

    def loss(value, shapes, loc, attw):
        return (ms_deform_attn_triton(value, shapes, loc, attw) ** 2).sum()

    explanation = torch._dynamo.explain(loss)(value, shapes, loc, attw)
    assert explanation.graph_count == 1
    assert explanation.graph_break_count == 0
    ops = [str(node.target) for g in explanation.graphs for node in g.graph.nodes if node.op == "call_function"]
    assert not any("grid_sampler" in op for op in ops)


@launches
def test_func_grad_matches_reference():
    value, shapes, loc, attw = make_inputs([(4, 5), (2, 3)], 1, 9, 2, 8, 2)
    weight = torch.randn(1, 9, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def loss(fn):
        return lambda v, l, a: (fn(v, shapes, l, a) * weight).sum()

    got = torch.func.grad(loss(ms_deform_attn_triton), argnums=(0, 1, 2))(value, loc, attw)
    want = torch.func.grad(loss(ms_deform_attn_reference), argnums=(0, 1, 2))(value, loc, attw)
    for name, g, w in zip(("value", "loc", "attw"), got, want):
        assert rel_err(g, w) <= 1e-5, name


@launches
@pytest.mark.slow
def test_compiled_fullgraph_train_step_matches_reference():
    """fwd+bwd through torch.compile(fullgraph=True): the op stays opaque and grads match."""
    value, shapes, loc, attw = make_inputs([(3, 4), (2, 2)], 1, 6, 2, 8, 2)
    grad_out = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    backend = "inductor" if CUDA else "aot_eager"
    compiled = torch.compile(ms_deform_attn_triton, fullgraph=True, backend=backend)
    out, grads = fwd_bwd(compiled, value, shapes, loc, attw, grad_out)
    ref, ref_grads = fwd_bwd(ms_deform_attn_reference, value, shapes, loc, attw, grad_out)
    assert rel_err(out, ref) <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-5


@launches
@pytest.mark.skipif(not CUDA, reason="training-size comparison needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_training_shape_matches_reference(dtype):
    value, shapes, loc, attw = make_inputs([(24, 24)], 2, 3900, 16, 16, 2, dtype=dtype)
    grad_out = torch.randn(2, 3900, 256, device="cuda", dtype=dtype)
    out, grads = fwd_bwd(ms_deform_attn_triton, value, shapes, loc, attw, grad_out)
    ref, ref_grads = fwd_bwd(
        ms_deform_attn_reference, value.float(), shapes, loc.float(), attw.float(), grad_out.float()
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) <= tol
    for name, g, r in zip(("value", "attw"), grads[::2], ref_grads[::2]):
        assert rel_err(g, r) <= tol, name
    # d/dloc jumps where a sample sits exactly on a pixel centre; among ~5e5 random samples one may round to
    # the other side of it than grid_sample does, so allow a handful of such elements and no more.
    bad = ((grads[1].float() - ref_grads[1]).abs() > tol * ref_grads[1].abs().max()).sum().item()
    assert bad <= 4


def _ptx_counts(arch: int, dtype: str) -> dict[str, dict[str, int]]:
    import json
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("triton_ptx_worker.py")
    done = subprocess.run(
        [sys.executable, str(worker), str(arch), dtype], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("arch", "dtype"), [(90, "fp32"), (90, "bf16"), (80, "fp16")])
def test_kernels_compile_for_cuda_without_a_gpu(arch, dtype):
    """CPU CI runs the kernels only under the interpreter; this compiles them for sm_80/sm_90 as a GPU would."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no CUDA backend")
    counts = _ptx_counts(arch, dtype)
    fwd, bwd = counts["_msda_fwd"], counts["_msda_bwd"]
    atomics = lambda ops: sum(n for op, n in ops.items() if op.startswith(("atom.", "red.")))  # noqa: E731
    assert atomics(fwd) == 0  # the forward owns its output rows: plain stores
    assert atomics(bwd) > 0 and all(".add.f32" in op for op in bwd if op.startswith(("atom.", "red.")))
    widen = f"cvt.f32.{'bf16' if dtype == 'bf16' else 'f16'}"
    if dtype == "fp32":
        assert not any(op.startswith("cvt.f32.") and "16" in op for op in {**fwd, **bwd})
    else:  # half inputs are widened: every sum runs in fp32
        assert fwd.get(widen, 0) > 0 and bwd.get(widen, 0) > 0


def test_level_shapes_reach_the_gpu_once():
    """A list of level shapes is copied to an accelerator once per distinct list (a pageable host-to-device
    copy syncs), fresh on the CPU, and a tensor argument is used as given. "meta" stands in for CUDA."""
    from rfdetr_fn.kernels.msda_op import shapes_tensor

    meta = torch.device("meta")
    first = shapes_tensor([(24, 24), (12, 12)], meta)
    assert first.shape == (2, 2) and first.dtype == torch.int64 and first.device.type == "meta"
    assert shapes_tensor([(24, 24), (12, 12)], meta) is first
    assert shapes_tensor([(20, 20), (10, 10)], meta) is not first
    on_cpu = shapes_tensor([(6, 7)], torch.device("cpu"))
    assert on_cpu.tolist() == [[6, 7]] and shapes_tensor([(6, 7)], torch.device("cpu")) is not on_cpu
    with torch.inference_mode():  # a cached tensor made here must still be usable by training later
        assert not shapes_tensor([(5, 5)], meta).is_inference()
    given = torch.tensor([[3, 4]], dtype=torch.int32)
    assert shapes_tensor(given, meta).dtype == torch.int64 and shapes_tensor(given, meta).tolist() == [[3, 4]]
