"""Gradient transforms against torch.optim, the upstream AdamW recipe against the previous recipe.py,
freezing (state only for trainable leaves) and the optimizer choice."""

from __future__ import annotations

import pytest
import torch

from rfdetr_fn import presets, tree
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.model import detector
from rfdetr_fn.optim import chain as gt
from rfdetr_fn.optim import recipe
from rfdetr_fn.step import make_train_step
from tests.test_optim import adamw_init, adamw_update


def _tree(gen, scale=1.0):
    return {"a": {"w": scale * torch.randn(5, 3, generator=gen)}, "b": scale * torch.randn(4, generator=gen)}


def _run_torch(opt_cls, params, grads_seq, **kw):
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in tree.flatten(params).items()}
    opt = opt_cls(list(ref.values()), **kw)
    for grads in grads_seq:
        for k, g in tree.flatten(grads).items():
            ref[k].grad = g.clone()
        opt.step()
    return {k: p.detach() for k, p in ref.items()}


def _run_ours(tx, params, grads_seq):
    state = tx.init(params)
    for step, grads in enumerate(grads_seq):
        updates, state = gt.deferred_update(tx)(grads, state, params, step=torch.tensor(step))
        params = gt.apply_updates(params, updates)
    return tree.flatten(params), state


@pytest.mark.parametrize(
    ("name", "ours", "torch_cls", "kw"),
    [
        ("adamw", gt.adamw(0.05, 0.8, 0.95, 1e-6, weight_decay=0.1), torch.optim.AdamW, {}),
        ("adam", gt.adam(0.05, 0.8, 0.95, 1e-6), torch.optim.Adam, {}),
        ("sgd", gt.sgd(0.1, momentum=0.9, weight_decay=0.01), torch.optim.SGD, dict(momentum=0.9, weight_decay=0.01)),
        ("nesterov", gt.sgd(0.1, momentum=0.9, nesterov=True), torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
    ],
)
def test_chains_match_torch_optimizers(name, ours, torch_cls, kw):
    gen = torch.Generator().manual_seed(0)
    params = _tree(gen)
    grads_seq = [_tree(gen, 0.1) for _ in range(4)]
    if name in ("adamw", "adam"):
        kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, **({"weight_decay": 0.1} if name == "adamw" else {}))
    else:
        kw = dict(lr=0.1, **kw)
    want = _run_torch(torch_cls, params, grads_seq, **kw)
    got, _ = _run_ours(ours, params, grads_seq)
    for k in want:
        assert (got[k] - tree.flatten(params)[k]).abs().max() > 1e-3
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_chain_state_is_the_union_and_schedules_read_the_step():
    gen = torch.Generator().manual_seed(1)
    params = _tree(gen)
    tx = gt.chain(gt.clip_by_global_norm(1.0), gt.scale_by_adam(), gt.scale_by_learning_rate(0.1, lambda s: 0.5 * s))
    state = tx.init(params)
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]  # the layout of earlier train states
    with pytest.raises(ValueError, match="step="):
        tx.update(_tree(gen), state, params)
    zero, state = tx.update(_tree(gen), state, params, step=torch.tensor(0))
    zero = gt.materialize(zero)
    assert state["step"].item() == 1 and all(not t.any() for t in tree.leaves(zero))  # schedule(0) = 0
    with pytest.raises(ValueError, match="named"):
        gt.chain(gt.scale_by_adam(), gt.scale_by_adam()).init(params)
    two = gt.chain(gt.named("fast", gt.scale_by_adam()), gt.named("slow", gt.trace(0.9)))
    assert sorted(two.init(params)) == ["fast", "slow"]


def test_masked_and_multi_transform_hold_state_for_their_leaves_only():
    gen = torch.Generator().manual_seed(2)
    params, grads = _tree(gen), _tree(gen)
    tx = gt.masked(gt.scale_by_adam(), "a.*")
    state = tx.init(params)
    assert list(tree.flatten(state["exp_avg"])) == ["a.w"]
    updates, _ = tx.update(grads, state, params)
    updates = gt.materialize(updates)
    assert torch.equal(updates["b"], grads["b"]) and not torch.equal(updates["a"]["w"], grads["a"]["w"])

    labels = tree.labels(params, {"adam": "a.*", "sgd": "b"})
    multi = gt.multi_transform({"adam": gt.adam(0.05), "sgd": gt.sgd(0.1)}, labels)
    state = multi.init(params)
    assert list(tree.flatten(state["adam"]["exp_avg"])) == ["a.w"] and state["sgd"] == {}
    updates, state = multi.update(grads, state, params)
    torch.testing.assert_close(gt.materialize(updates, params)["b"], -0.1 * grads["b"])
    with pytest.raises(ValueError, match="no transformation"):
        gt.multi_transform({"adam": gt.adam(0.05)}, labels)


def _previous_adamw(params, grads, state, groups, lr_factor, betas, eps):
    """recipe.adamw_update as it was before the gradient transforms (kept to compare against)."""
    b1, b2 = betas
    fp, fg = tree.flatten(params), tree.flatten(grads)
    fm, fv = tree.flatten(state["exp_avg"]), tree.flatten(state["exp_avg_sq"])
    step = state["step"] + 1
    s64 = step.to(torch.float64)
    bias1, bias2 = 1.0 - b1**s64, torch.sqrt(1.0 - b2**s64)
    for g in groups:
        names = [n for n in g.names if fg.get(n) is not None]
        ps, gs = [fp[n] for n in names], [fg[n] for n in names]
        lr = lr_factor * g.lr
        if g.weight_decay:
            ps = torch._foreach_mul(ps, (1.0 - lr * g.weight_decay).float())
        ms = torch._foreach_lerp([fm[n] for n in names], gs, 1.0 - b1)
        vs = torch._foreach_addcmul(torch._foreach_mul([fv[n] for n in names], b2), gs, gs, value=1.0 - b2)
        denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(vs), bias2.float()), eps)
        ps = torch._foreach_sub(ps, torch._foreach_mul(torch._foreach_div(ms, denom), (lr / bias1).float()))
        for i, n in enumerate(names):
            fp[n], fm[n], fv[n] = ps[i], ms[i], vs[i]
    return tree.unflatten(fp), {"step": step, "exp_avg": tree.unflatten(fm), "exp_avg_sq": tree.unflatten(fv)}


def test_recipe_is_bit_equal_to_previous_optim_over_steps():
    """The chain (Adam scaling -> decoupled decay -> per-group LR x schedule) rounds as the earlier recipe.py
    and torch.optim.AdamW do: weights, moments and step count bit-equal over several steps of upstream's
    groups (layer-wise ViT decay, no-decay names, component decay), one gradient missing."""
    cfg = presets.tiny()
    tcfg = TrainConfig(
        lr=1e-2, lr_encoder=2e-2, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-6,
        lr_vit_layer_decay=0.8, lr_component_decay=0.7,
    )  # fmt: skip
    groups = recipe.param_groups(list(detector.param_shapes(cfg)), cfg, tcfg)
    assert len({g.lr for g in groups}) >= 4 and {g.weight_decay for g in groups} == {0.0, 0.05}
    params = detector.init(cfg, 0)
    skipped = "class_embed.bias"
    gen = torch.Generator().manual_seed(3)
    old, new = (params, adamw_init(params)), (params, adamw_init(params))
    for factor in (0.3, 1.0, 0.5, 0.05):
        grads = tree.flatten(tree.map_(lambda t: 0.1 * torch.randn(t.shape, generator=gen), params))
        grads = tree.unflatten({**grads, skipped: None})
        f = torch.tensor(factor, dtype=torch.float64)
        old = _previous_adamw(*old[:1], grads, old[1], groups, f, tcfg.betas, tcfg.eps)
        new = adamw_update(new[0], grads, new[1], groups, f, betas=tcfg.betas, eps=tcfg.eps)
        for a, b in zip(tree.leaves(old[1]), tree.leaves(new[1])):
            assert torch.equal(a, b)
        for (k, a), b in zip(tree.flatten(old[0]).items(), tree.leaves(new[0])):
            assert torch.equal(a, b), k
    moved = [not torch.equal(a, b) for a, b in zip(tree.leaves(params), tree.leaves(new[0]))]
    assert sum(moved) == len(moved) - 1 and torch.equal(new[0]["class_embed"]["bias"], params["class_embed"]["bias"])


def test_freezing_keeps_no_optimizer_state_and_no_update_for_the_encoder():
    with torch.device("meta"):
        params = detector.init(presets.nano(), 0)

    def opt_state(tcfg):
        return make_train_step(presets.nano(), tcfg, steps_per_epoch=1).init(params)["opt_state"]

    full = tree.num_params(opt_state(TrainConfig()))
    frozen = tree.num_params(opt_state(TrainConfig(freeze_encoder=True)))
    vit = tree.num_params(tree.partition(params, "backbone.0.encoder.*")[0])
    assert full == 2 * tree.num_params(params) + 1
    assert frozen == full - 2 * vit  # the ViT's ~22M parameters hold no moments at all

    cfg = presets.tiny(num_classes=2)
    tcfg = TrainConfig(freeze_encoder=True, lr=1e-2)
    step = make_train_step(cfg, tcfg, steps_per_epoch=1)
    state = step.init(detector.init(cfg, 0))
    batch = {
        "images": torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
        "mask": torch.zeros(1, 64, 64, dtype=torch.bool),
        "labels": torch.tensor([[1]]),
        "boxes": torch.tensor([[[0.5, 0.5, 0.3, 0.3]]]),
    }
    new, _ = step(state, [batch])
    before, after = tree.flatten(state["params"]), tree.flatten(new["params"])
    assert list(before) == list(after)
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same if k.startswith("backbone.0.encoder.") else True, k
    assert not torch.equal(before["class_embed.bias"], after["class_embed.bias"])


def make_hook(cfg, tcfg, groups, schedule, scale=1.0):
    """A Python optimizer hook for `train.optimizer = 'tests.test_gradient_transforms:make_hook'`."""
    return gt.chain(gt.clip_by_global_norm(1.0), gt.sgd(0.5 * scale, schedule=schedule))


def test_make_optimizer_names_kwargs_and_hook():
    cfg = presets.tiny()
    names = list(detector.param_shapes(cfg))
    sgd = recipe.make_optimizer(cfg, TrainConfig(optimizer="sgd", optimizer_kwargs={"momentum": 0.9}), names)
    assert list(sgd.init({"w": torch.zeros(2)})) == ["momentum_buffer"]
    with pytest.raises(ValueError, match="optimizer_kwargs"):
        recipe.make_optimizer(cfg, TrainConfig(optimizer="sgd", optimizer_kwargs='{"nope": 1}'), names)
    with pytest.raises(ValueError, match="train.optimizer='lion'"):
        recipe.make_optimizer(cfg, TrainConfig(optimizer="lion"), names)
    hook = TrainConfig(optimizer="tests.test_gradient_transforms:make_hook", optimizer_kwargs='{"scale": 2.0}')
    tx = recipe.make_optimizer(cfg, hook, names)
    updates, _ = tx.update({"w": torch.tensor([0.1])}, {}, {"w": torch.zeros(1)})
    assert gt.materialize(updates)["w"].item() == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="optimizer_kwargs"):
        TrainConfig(optimizer_kwargs="[1, 2]")
