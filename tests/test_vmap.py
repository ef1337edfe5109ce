"""torch.func over the model: vmapped ensembles and losses, per-example gradients, jvp and Hessian-vector
products, checked against Python loops and finite differences; deformable attention's vmap and gather rules."""

from __future__ import annotations

import pytest
import torch

from rfdetr_fn import presets, tree
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.kernels import ms_deform_attn_gather, ms_deform_attn_reference
from rfdetr_fn.losses.config import LossConfig
from rfdetr_fn.losses.criterion import criterion, match_all
from rfdetr_fn.model import backbone, detector
from rfdetr_fn.research import ensemble

CFG = presets.tiny(num_classes=3)
TCFG = TrainConfig()
LCFG = LossConfig.resolve(CFG, TCFG)


def _batch(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return {
        "images": torch.randn(2, 3, 64, 64, generator=gen, dtype=dtype),
        "mask": torch.zeros(2, 64, 64, dtype=torch.bool),
        "labels": torch.tensor([[0, 1], [2, -1]]),
        "boxes": torch.tensor(
            [[[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]], [[0.5, 0.5, 0.4, 0.4], [0, 0, 0, 0]]], dtype=dtype
        ),
    }


def _loss(params, batch):
    out = detector.apply(params, batch["images"], batch["mask"], CFG, train=True)
    return criterion(out, {k: batch[k] for k in ("labels", "boxes")}, CFG, LCFG, train=True)[0]


def test_vmapped_ensemble_outputs_and_losses_equal_the_loop():
    members = [detector.init(CFG, seed) for seed in range(4)]
    stacked = ensemble.stack(members)
    batch = _batch()
    out = ensemble.apply(stacked, batch["images"], batch["mask"], CFG)
    for i, params in enumerate(members):
        ref = detector.apply(params, batch["images"], batch["mask"], CFG, train=False)
        # 1e-6 of the logits' size: the batched matmuls sum in another order
        torch.testing.assert_close(out["pred_logits"][i], ref["pred_logits"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["pred_boxes"][i], ref["pred_boxes"], rtol=0, atol=1e-6)
    pair = ensemble.stack(members[:2])
    losses = ensemble.losses(pair, batch, CFG, TCFG)
    want = torch.stack([_loss(p, batch) for p in members[:2]])
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=0)
    assert want[0] != want[1]  # the members differ
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(ensemble.unstack(stacked)[2]), tree.leaves(members[2])))


def test_per_example_gradients_equal_the_loop():
    params = detector.init(CFG, 0)
    batch = _batch()
    grads, losses = ensemble.per_example_grads(params, batch, CFG, TCFG, normalise="image")
    for i in range(2):
        example = {k: v[i : i + 1] for k, v in batch.items()}
        want, value = torch.func.grad_and_value(_loss)(params, example)
        torch.testing.assert_close(losses[i], value, rtol=1e-5, atol=0)
        for k, g in tree.flatten(want).items():
            got = tree.flatten(grads)[k][i]
            assert (got - g).norm() <= 1e-5 * g.norm() + 1e-9, k


@pytest.mark.slow
def test_member_gradients_equal_the_loop():
    params, batch = detector.init(CFG, 0), _batch()
    stacked = ensemble.stack([params, detector.init(CFG, 1)])
    member_grads, _ = ensemble.grads(stacked, batch, CFG, TCFG)
    want = torch.func.grad(_loss)(detector.init(CFG, 1), batch)
    for k, g in tree.flatten(want).items():
        assert (tree.flatten(member_grads)[k][1] - g).norm() <= 1e-5 * g.norm() + 1e-9, k


def _dot(a, b) -> float:
    return sum(float((x * y).sum()) for x, y in zip(tree.leaves(a), tree.leaves(b)))


def test_jvp_matches_finite_differences_and_reverse_mode():
    """The detector detaches its two-stage reference boxes (as upstream), so derivatives of the full model
    are checked against reverse mode, and against finite differences on the detach-free ViT."""
    params = detector.init(CFG, 0, dtype=torch.float64)
    batch = _batch(torch.float64)
    gen = torch.Generator().manual_seed(5)
    direction = tree.map_(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype), params)
    logits, tangent = ensemble.jvp(params, direction, batch["images"], batch["mask"], CFG)
    probe = torch.randn(logits.shape, generator=gen, dtype=logits.dtype)

    def probed(p):
        return (detector.apply(p, batch["images"], batch["mask"], CFG, train=False)["pred_logits"] * probe).sum()

    assert float((probe * tangent).sum()) == pytest.approx(_dot(torch.func.grad(probed)(params), direction), rel=1e-6)

    vit = params["backbone"]["0"]["encoder"]
    # position_embeddings pass through a float32 resize, too coarse for a difference quotient: hold them still
    v_dir = tree.map_where(torch.zeros_like, direction["backbone"]["0"]["encoder"], "*position_embeddings")
    eps = 1e-6

    def features(p):
        return backbone.features(p, batch["images"], CFG)[-1]

    _, feat_tangent = torch.func.jvp(features, (vit,), (v_dir,))
    shifted = [tree.map_(lambda p, d, s=s: p + s * eps * d, vit, v_dir) for s in (1, -1)]
    fd = (features(shifted[0]) - features(shifted[1])) / (2 * eps)
    torch.testing.assert_close(feat_tangent, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_hvp_is_symmetric_and_equals_reverse_over_reverse():
    params = detector.init(CFG, 0, dtype=torch.float64)
    batch = _batch(torch.float64)
    gen = torch.Generator().manual_seed(5)
    direction = tree.map_(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype), params)
    hv = ensemble.hvp(params, direction, batch, CFG, TCFG)
    with torch.no_grad():
        indices = match_all(detector.apply(params, batch["images"], batch["mask"], CFG, train=True),
                            {k: batch[k] for k in ("labels", "boxes")}, CFG, LCFG, train=True)  # fmt: skip
    grad = torch.func.grad(lambda p: ensemble.member_loss(p, batch, indices, CFG, TCFG))
    other = tree.map_(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype), params)
    hw = ensemble.hvp(params, other, batch, CFG, TCFG)
    assert _dot(hv, other) == pytest.approx(_dot(hw, direction), rel=1e-7)  # the Hessian is symmetric
    rr = torch.func.grad(lambda p: _dot_t(grad(p), direction))(params)  # reverse-over-reverse: the same
    for a, b in zip(tree.leaves(hv), tree.leaves(rr)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    assert max(float(t.abs().max()) for t in tree.leaves(hv)) > 1e-3


def _dot_t(a, b):
    return sum((x * y).sum() for x, y in zip(tree.leaves(a), tree.leaves(b)))


def test_gather_msda_and_the_triton_op_vmap_rule():
    from rfdetr_fn.kernels.msda_op import MSDeformAttnFunction, shapes_tensor

    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(3, 2, tokens, 2, 4, generator=gen)
    loc = torch.rand(3, 2, 5, 2, 2, 3, 2, generator=gen) * 1.2 - 0.1  # some samples fall outside
    weights = torch.rand(3, 2, 5, 2, 2, 3, generator=gen)
    ref = torch.stack([ms_deform_attn_reference(value[i], shapes, loc[i], weights[i]) for i in range(3)])
    gathered = torch.func.vmap(lambda v, l, w: ms_deform_attn_gather(v, shapes, l, w))(value, loc, weights)
    torch.testing.assert_close(gathered, ref, rtol=1e-5, atol=1e-6)
    pytest.importorskip("triton")
    op = torch.func.vmap(lambda v, l, w: MSDeformAttnFunction.apply(v, shapes_tensor(shapes, v.device), l, w))
    torch.testing.assert_close(op(value, loc, weights), ref, rtol=1e-5, atol=1e-6)
    # No forward-mode rule (a custom `jvp` would stop Dynamo from tracing the op): torch refuses, and
    # forward mode runs on the gather backend instead.
    with pytest.raises(RuntimeError, match="jvp"):
        torch.func.jvp(lambda v: MSDeformAttnFunction.apply(v[0], shapes_tensor(shapes, v.device), loc[0], weights[0]),
                       (value,), (value,))  # fmt: skip
