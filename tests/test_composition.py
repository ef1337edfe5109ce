"""torch.func, torch.compile and the train step compose with no setup: plain calls over `rf.apply` and
`rf.loss`, checked against Python loops, adjoint identities, symmetric Hessians and finite differences.

No context manager anywhere in this file (no kernel switch, no `pytest.raises` block): each call picks
kernels that support what is active around it.
"""

from __future__ import annotations

import re

import attrs
import pytest
import torch

import rfdetr_fn as rf
from rfdetr_fn import compiler, tree
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.losses import objective
from rfdetr_fn.model import lora
from rfdetr_fn.optim import chain as gt
from rfdetr_fn.research import ensemble
from rfdetr_fn.step import compile_step, grad_and_value, make_train_step

CFG = rf.presets.tiny(
    num_classes=2, resolution=64, vit_num_layers=1, out_feature_indexes=(1,), hidden_dim=32,
    dim_feedforward=64, num_queries=4, num_select=4, group_detr=2,
)  # fmt: skip
TCFG = TrainConfig(multi_scale="off")
FOCAL = attrs.evolve(TCFG, ia_bce_loss=False)  # class targets independent of the predictions
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}


def _batch(dtype=torch.float32, size=2):
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([[0, 1], [1, -1], [0, -1]])[:size]
    boxes = torch.tensor(  # off the proposal grid: a box edge on a proposal's edge is a kink of GIoU at init
        [[[0.31, 0.33, 0.21, 0.17], [0.61, 0.58, 0.33, 0.29]], [[0.52, 0.47, 0.41, 0.37], [0.5] * 4],
         [[0.43, 0.61, 0.23, 0.31], [0.5] * 4]]
    )[:size]  # fmt: skip
    return {
        "images": torch.randn(size, 3, 64, 64, generator=gen, dtype=dtype),
        "mask": torch.zeros(size, 64, 64, dtype=torch.bool),
        "labels": labels,
        "boxes": boxes.to(dtype),
    }


def _params(dtype=torch.float32, seed=0):
    return rf.init(CFG, seed, dtype=dtype)


def _like(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return tree.map_(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype), params)


def _dot(a, b):
    return sum((x * y).sum() for x, y in zip(tree.leaves(a), tree.leaves(b)))


def _close(got, want, dtype):
    for g, w in zip(tree.leaves(got), tree.leaves(want), strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])


def _logits(params, batch):
    return rf.apply(params, batch["images"], batch["mask"], CFG, train=False)["pred_logits"]


# ---------------------------------------------------------------- rf.apply


@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap_apply_equals_the_loop(dtype):
    members = [_params(dtype, s) for s in range(3)]
    batch = _batch(dtype)
    got = torch.func.vmap(lambda p: _logits(p, batch))(ensemble.stack(members))
    for i, p in enumerate(members):
        torch.testing.assert_close(got[i], _logits(p, batch), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_jvp_and_vjp_satisfy_the_adjoint_identity(dtype):
    """<w, J v> == <J^T w, v>; jvp runs attention's math composite and deformable attention's gathers."""
    params, batch = _params(dtype), _batch(dtype)
    v = _like(params, 1)
    out, jv = torch.func.jvp(lambda p: _logits(p, batch), (params,), (v,))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    _, vjp_fn = torch.func.vjp(lambda p: _logits(p, batch), params)
    (jtw,) = vjp_fn(w)
    lhs, rhs = float((w * jv).sum()), float(_dot(jtw, v))
    assert lhs == pytest.approx(rhs, rel=1e-10 if dtype == torch.float64 else 1e-4)
    torch.testing.assert_close(out, _logits(params, batch), **TOL[dtype])


def test_jacrev_on_a_small_output_equals_vjp_rows():
    params, batch = _params(torch.float64), _batch(torch.float64)

    def small(p):
        return _logits(p, batch)[0, :2, :2].reshape(-1)  # 4 outputs

    jac = torch.func.jacrev(small)(params)
    _, vjp_fn = torch.func.vjp(small, params)
    for row in range(4):
        (want,) = vjp_fn(torch.nn.functional.one_hot(torch.tensor(row), 4).to(torch.float64))
        _close(tree.map_(lambda t, row=row: t[row], jac), want, torch.float64)


def test_compile_of_vmap_and_vmap_of_a_compiled_forward(dtype=torch.float32):
    """torch.compile(vmap(f)) traces fullgraph (no region marker runs on vmapped inputs); vmap over
    `compiler.compile_fn` (torch refuses vmap over a compiled function) runs the same function eagerly."""
    members = [_params(dtype, s) for s in range(2)]
    batch = _batch(dtype)
    stacked = ensemble.stack(members)
    eager = torch.func.vmap(lambda p: _logits(p, batch))(stacked)
    compiled = torch.compile(torch.func.vmap(lambda p: _logits(p, batch)), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(stacked), eager, **TOL[dtype])
    forward = compiler.compile_fn(lambda p: _logits(p, batch), backend="aot_eager", regions=True)
    torch.testing.assert_close(torch.func.vmap(forward)(stacked), eager, **TOL[dtype])


@pytest.mark.slow
@pytest.mark.inductor
def test_inductor_compile_of_vmap():
    members = [_params(torch.float32, s) for s in range(2)]
    batch = _batch()
    stacked = ensemble.stack(members)
    eager = torch.func.vmap(lambda p: _logits(p, batch))(stacked)
    compiled = torch.compile(torch.func.vmap(lambda p: _logits(p, batch)), fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(stacked), eager, rtol=1e-4, atol=1e-4)
    forward = compiler.compile_fn(lambda p: _logits(p, batch), backend="inductor")
    torch.testing.assert_close(torch.func.vmap(forward)(stacked), eager, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- rf.loss


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_of_rf_loss_equals_the_step_gradient(dtype):
    """torch.func.grad of `rf.loss` is the gradient the train step takes (plain autograd)."""
    params, batch = _params(dtype), _batch(dtype)
    want, _ = grad_and_value(lambda p: (rf.loss(p, batch, CFG, TCFG)[0], ()))(params)
    got = torch.func.grad(lambda p: rf.loss(p, batch, CFG, TCFG)[0])(params)
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap_of_grad_over_members_equals_the_loop(dtype):
    members = [_params(dtype, s) for s in range(2)]
    batch = _batch(dtype)
    stacked = ensemble.stack(members)
    indices = ensemble.matches(stacked, batch, CFG, TCFG)
    grads = torch.func.vmap(torch.func.grad(lambda p, idx: rf.loss(p, batch, CFG, TCFG, indices=idx)[0]))(
        stacked, indices
    )
    for i, p in enumerate(members):
        want = torch.func.grad(lambda q: rf.loss(q, batch, CFG, TCFG)[0])(p)
        _close(tree.map_(lambda t, i=i: t[i], grads), want, dtype)


def test_hessian_vector_products_are_symmetric_and_agree():
    """forward-over-reverse == reverse-over-reverse; <u, H v> == <v, H u> (float64, matches held fixed)."""
    dtype = torch.float64
    params, batch = _params(dtype), _batch(dtype)
    indices = objective.matches(params, batch, CFG, TCFG)
    grad = torch.func.grad(lambda p: rf.loss(p, batch, CFG, TCFG, indices=indices)[0])
    u, v = _like(params, 3), _like(params, 4)
    hv = torch.func.jvp(grad, (params,), (v,))[1]
    hu = torch.func.jvp(grad, (params,), (u,))[1]
    assert float(_dot(u, hv)) == pytest.approx(float(_dot(v, hu)), rel=1e-9)
    rr = torch.func.grad(lambda p: _dot(grad(p), v))(params)
    _close(rr, hv, dtype)
    assert max(float(t.abs().max()) for t in tree.leaves(hv)) > 1e-3


def test_finite_differences_along_head_directions():
    """Along the class and box heads (after the detached two-stage boxes) the derivative is the loss's own,
    with focal loss: IA-BCE's targets are IoUs of the predicted boxes, a stop-gradient input by design."""
    dtype = torch.float64
    params, batch = _params(dtype), _batch(dtype)
    indices = objective.matches(params, batch, CFG, FOCAL)
    direction = tree.map_where(torch.zeros_like, _like(params, 5), rf.tree.not_(["class_embed.*", "bbox_embed.*"]))

    def value(p):
        return rf.loss(p, batch, CFG, FOCAL, indices=indices)[0]

    _, slope = torch.func.jvp(value, (params,), (direction,))
    eps = 1e-6
    shifted = [tree.map_(lambda p, d, s=s: p + s * eps * d, params, direction) for s in (1, -1)]
    fd = (value(shifted[0]) - value(shifted[1])) / (2 * eps)
    assert float(slope) == pytest.approx(float(fd), rel=1e-6)
    assert abs(float(slope)) > 1e-3


def test_per_example_gradients_sum_to_the_batch_gradient():
    params, batch = _params(torch.float64), _batch(torch.float64, size=3)
    per_example, losses = ensemble.per_example_grads(params, batch, CFG, TCFG, normalise="batch")
    whole = torch.func.grad(lambda p: rf.loss(p, batch, CFG, TCFG)[0])(params)
    _close(tree.map_(lambda t: t.sum(0), per_example), whole, torch.float64)
    assert float(losses.sum()) == pytest.approx(float(rf.loss(params, batch, CFG, TCFG)[0]), rel=1e-10)
    own, _ = ensemble.per_example_grads(params, batch, CFG, TCFG, normalise="image")
    one = {k: v[1:2] for k, v in batch.items()}
    _close(
        tree.map_(lambda t: t[1], own), torch.func.grad(lambda p: rf.loss(p, one, CFG, TCFG)[0])(params), torch.float64
    )
    total, _ = rf.loss(params, batch, CFG, TCFG, normalise="image")  # the mean of the images' own losses
    singles = [rf.loss(params, {k: v[i : i + 1] for k, v in batch.items()}, CFG, TCFG)[0] for i in range(3)]
    assert float(total) == pytest.approx(float(sum(singles) / 3), rel=1e-10)


def test_gradient_checkpointing_under_torch_func_gives_the_same_derivatives():
    dtype = torch.float64
    params, batch = _params(dtype), _batch(dtype)
    checkpointed = attrs.evolve(CFG, gradient_checkpointing=True)
    indices = objective.matches(params, batch, CFG, TCFG)

    def grad(cfg):
        return torch.func.grad(lambda p: rf.loss(p, batch, cfg, TCFG, indices=indices)[0])

    _close(grad(checkpointed)(params), grad(CFG)(params), dtype)
    v = _like(params, 6)
    _close(torch.func.jvp(grad(checkpointed), (params,), (v,))[1], torch.func.jvp(grad(CFG), (params,), (v,))[1], dtype)
    step = make_train_step(checkpointed, TCFG, steps_per_epoch=10)  # torch cannot trace this one: a clear error
    raised = pytest.raises(ValueError, compile_step, step, regional=False, backend="aot_eager")
    raised.match("Use the regional step")


# ---------------------------------------------------------------- LoRA, the step, selections


def test_lora_rank_and_alpha_mean_the_same_model_everywhere(tmp_path):
    """A rank-4 alpha-8 adapter (scaling 2): rf.apply, lora's own merge, the step and a saved file agree."""
    cfg = attrs.evolve(CFG, backbone_lora=True, lora_rank=4, lora_alpha=8.0)
    base = rf.init(cfg, 0)
    adapters, frozen, merge = lora.lora(base, rank=4, alpha=8)
    adapters = tree.map_(
        lambda t: t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)), adapters
    )
    params, batch = tree.combine(adapters, frozen), _batch()
    dense_cfg = attrs.evolve(cfg, backbone_lora=False)
    adapted = rf.apply(params, batch["images"], batch["mask"], cfg, train=False)["pred_logits"]
    merged = rf.apply(merge(adapters, frozen), batch["images"], batch["mask"], dense_cfg, train=False)["pred_logits"]
    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)

    step = make_train_step(cfg, TCFG, steps_per_epoch=10)
    _, metrics = step(step.init(params), [batch])
    want, _ = rf.loss(merge(adapters, frozen), batch, dense_cfg, TCFG)
    assert float(metrics["loss"]) == pytest.approx(float(rf.loss(params, batch, cfg, TCFG)[0]), rel=1e-5)
    assert float(rf.loss(params, batch, cfg, TCFG)[0]) == pytest.approx(float(want), rel=1e-5)

    rf.save_weights(tmp_path / "lora.pth", params, cfg)
    loaded_cfg, loaded = rf.load_weights(tmp_path / "lora.pth")
    assert (loaded_cfg.lora_rank, loaded_cfg.lora_alpha) == (4, 8.0)
    again = rf.apply(loaded, batch["images"], batch["mask"], loaded_cfg, train=False)["pred_logits"]
    torch.testing.assert_close(again, adapted)
    _, dense = rf.load_weights(tmp_path / "lora.pth", dense_cfg)  # merged on load at the file's scaling
    torch.testing.assert_close(rf.apply(dense, batch["images"], None, dense_cfg, train=False)["pred_logits"], merged)
    wrong = attrs.evolve(cfg, lora_rank=16, lora_alpha=16.0)
    raised = pytest.raises(ValueError, rf.apply, params, batch["images"], None, wrong, train=False)
    raised.match("rank 4 but the model config says lora_rank=16")


def test_custom_chain_owns_clipping_and_reports_its_learning_rate():
    """The step hands a custom chain the raw gradient (its own clip applies, not train.clip_max_norm) and
    logs the lr the chain reports; a chain's updates are plain tensors."""
    seen = {}

    def spy(grads, state, params=None, **extra):
        seen["norm"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in tree.leaves(grads)]))
        return grads, {}

    tx = gt.chain(gt.GradientTransformation(lambda p: {}, spy), gt.clip_by_global_norm(5.0), gt.sgd(0.1),
                  gt.report_lr(0.1, lambda step: 0.5 ** step.to(torch.float64)))  # fmt: skip
    tcfg = attrs.evolve(TCFG, clip_max_norm=1e-3)
    step = make_train_step(CFG, tcfg, steps_per_epoch=10, optimizer=tx)
    state = step.init(_params())
    state, metrics = step(state, [_batch()])
    assert float(seen["norm"]) == pytest.approx(float(metrics["grad_norm"]), rel=1e-5)
    assert float(seen["norm"]) > 100 * tcfg.clip_max_norm
    assert float(metrics["lr"]) == pytest.approx(0.1) and "lr_factor" not in metrics
    _, metrics = step(state, [_batch()])
    assert float(metrics["lr"]) == pytest.approx(0.05)
    grads = {"w": torch.tensor([3.0, 4.0])}
    updates, _ = gt.adamw(0.1, weight_decay=0.01).update(grads, gt.adamw(0.1).init(grads), {"w": torch.ones(2)})
    assert isinstance(updates["w"], torch.Tensor) and updates["w"].norm() > 0


def test_one_optimizer_and_selection_and_safe_selections():
    """init and step share the selection; a pattern matching nothing (even inside not_) is an error naming
    it; freezing from the flag and from the API select the same leaves."""
    params = _params()
    flag = make_train_step(CFG, attrs.evolve(TCFG, freeze_encoder=True), steps_per_epoch=1)
    api = make_train_step(CFG, TCFG, steps_per_epoch=1, trainable=tree.not_("backbone.0.encoder.*"))
    assert tree.select(params, flag.trainable) == tree.select(params, api.trainable)
    assert list(tree.flatten(api.init(params)["opt_state"]["exp_avg"])) == tree.select(params, api.trainable)
    typo = make_train_step(CFG, TCFG, steps_per_epoch=1, trainable=tree.not_("backbone.0.encodr.*"))
    pytest.raises(ValueError, typo.init, params).match(re.escape("'backbone.0.encodr.*' matches no parameter"))
    nothing = make_train_step(CFG, TCFG, steps_per_epoch=1, trainable="heads.*")
    pytest.raises(ValueError, nothing.init, params).match("trainable 'heads.*' matches no parameter")
    both = tree.all_("transformer.*", tree.any_("*.weight", "*.bias"))
    assert tree.select(params, both) == [
        k for k in tree.select(params, "transformer.*") if k.endswith((".weight", ".bias"))
    ]


def test_compiled_step_keeps_the_record():
    step = make_train_step(CFG, TCFG, steps_per_epoch=10)
    compiled = compile_step(step, backend="aot_eager")
    assert compiled.init is step.init and compiled.optimizer is step.optimizer and compiled.trainable is step.trainable
