"""Optimizer, schedules and EMA against upstream's recipe numbers (golden/recipe) and torch.optim."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rfdetr_fn import presets, tree
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.optim import chain as gt
from rfdetr_fn.optim.ema import _delta, ema_init, ema_maybe_update, ema_update
from rfdetr_fn.optim.recipe import Group, group_values, param_groups, param_settings
from rfdetr_fn.optim.schedules import lr_factor, lr_kwargs, schedule_lengths


def adamw_init(params):
    """Zero moments and a float32 step count, as the optimizer `make_optimizer` builds for adamw."""
    return gt.scale_by_adam().init(params)


def adamw_update(params, grads, opt_state, groups: list[Group], lr_factor, *, betas=(0.9, 0.999), eps=1e-8):
    """One step of upstream's AdamW recipe over parameter groups at lr = group.lr * lr_factor (leaves in no
    group, or with a None gradient, keep their value and moments, as torch skips them)."""
    named = {n for g in groups for n in g.names}
    grads = tree.unflatten({n: g for n, g in tree.flatten(grads).items() if n in named})
    lrs, decays = group_values(groups)
    factor = torch.as_tensor(lr_factor, dtype=torch.float64)
    tx = gt.adamw(lrs, betas[0], betas[1], eps, weight_decay=decays, schedule=lambda step: factor)
    updates, opt_state = gt.deferred_update(tx)(grads, opt_state, params, step=opt_state["step"])
    return gt.apply_updates(params, updates), opt_state


def _recipe(golden_dir, name: str) -> dict:
    return json.loads((golden_dir / "recipe" / name).read_text())


# ---------------------------------------------------------------- parameter groups


@pytest.mark.parametrize(
    ("fname", "make_cfg"),
    [("param_groups_nano.json", presets.nano), ("param_groups_tiny_det.json", presets.tiny)],
)
def test_param_groups_match_upstream(golden_dir, fname, make_cfg):
    ref = _recipe(golden_dir, fname)
    cfg, tcfg = make_cfg(), TrainConfig(**ref["train_config"])
    assert cfg.out_feature_indexes[-1] + 1 == ref["num_layers_for_decay"]
    names = list(ref["params"])  # upstream named_parameters() order
    groups = param_groups(names, cfg, tcfg)

    assert len(groups) == len(ref["groups"])
    for ours, theirs in zip(groups, ref["groups"]):
        assert ours.lr == pytest.approx(theirs["lr"], rel=1e-12, abs=0)
        assert ours.weight_decay == theirs["weight_decay"]
        assert list(ours.names) == theirs["params"]
    assert [n for g in groups for n in g.names] == ref["optimizer_param_order"]

    settings = param_settings(names, cfg, tcfg)
    index = {n: i for i, g in enumerate(groups) for n in g.names}
    for name, want in ref["params"].items():
        lr, wd = settings[name]
        assert lr == pytest.approx(want["lr"], rel=1e-12, abs=0), name
        assert wd == want["weight_decay"], name
        assert index[name] == want["group"], name


def test_detector_param_order_gives_upstream_groups(golden_dir):
    """The model's own parameter listing (state-dict order) must reproduce upstream's groups unaided."""
    detector = pytest.importorskip("rfdetr_fn.model.detector")
    ref = _recipe(golden_dir, "param_groups_nano.json")
    groups = param_groups(list(detector.param_shapes(presets.nano())), presets.nano(), TrainConfig())
    assert [list(g.names) for g in groups] == [g["params"] for g in ref["groups"]]


def test_param_settings_rules():
    cfg, tcfg = presets.nano(), TrainConfig()
    s = param_settings(
        [
            "backbone.0.encoder.encoder.embeddings.mask_token",
            "backbone.0.encoder.encoder.encoder.layer.11.mlp.fc1.weight",
            "backbone.0.encoder.encoder.layernorm.weight",
            "transformer.decoder.norm.bias",
            "backbone.0.projector.stages.0.1.bias",
        ],
        cfg,
        tcfg,
    )
    enc = 1.5e-4 * 0.49
    assert s["backbone.0.encoder.encoder.embeddings.mask_token"] == (pytest.approx(enc * 0.8**14), 0.0)
    assert s["backbone.0.encoder.encoder.encoder.layer.11.mlp.fc1.weight"] == (
        pytest.approx(enc * 0.8**2),
        1e-4,
    )
    assert s["backbone.0.encoder.encoder.layernorm.weight"] == (pytest.approx(enc), 0.0)
    assert s["transformer.decoder.norm.bias"] == (pytest.approx(7e-5), 1e-4)
    assert s["backbone.0.projector.stages.0.1.bias"] == (1e-4, 1e-4)
    with pytest.raises(ValueError, match="listed twice"):
        param_settings(["a.b", "a.b"], cfg, tcfg)


# ---------------------------------------------------------------- schedules


def test_lr_schedule_matches_upstream(golden_dir):
    ref = _recipe(golden_dir, "lr_schedule.json")
    total, warmup = schedule_lengths(ref["epochs"], ref["steps_per_epoch"], ref["warmup_epochs"])
    assert (total, warmup) == (ref["total_steps"], ref["warmup_steps"])
    for kind, sched in ref["schedules"].items():
        kw = dict(
            total_steps=total,
            steps_per_epoch=ref["steps_per_epoch"],
            warmup_steps=warmup,
            kind=kind,
            lr_drop_epochs=sched["lr_scheduler_kwargs"].get("lr_drop", 100),
            min_factor=sched["lr_scheduler_kwargs"].get("min_factor", 0.0),
        )
        want = sched["factor"] + [sched["factor_at_total_steps"]]
        ints = [lr_factor(s, **kw) for s in range(total + 1)]
        tens = lr_factor(torch.arange(total + 1), **kw)
        assert tens.dtype == torch.float64 and tens.shape == (total + 1,)
        assert ints == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert tens.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert isinstance(lr_factor(torch.tensor(3), **kw), torch.Tensor)


def test_schedule_lengths_and_config_kwargs():
    assert schedule_lengths(10, 7, 0.5) == (70, 3)
    assert schedule_lengths(10, 7, 1.0, max_steps=25) == (25, 2)  # steps_per_epoch becomes 25 // 10
    kw = lr_kwargs(TrainConfig(epochs=10, warmup_epochs=1.0, lr_drop=8, lr_scheduler="cosine"), 7)
    assert kw == dict(
        total_steps=70, steps_per_epoch=7, warmup_steps=7, kind="cosine", lr_drop_epochs=8, min_factor=0.0
    )
    # upstream's default recipe (step, lr_drop = epochs = 100, no warmup) is constant
    default = lr_kwargs(TrainConfig(), 5)
    assert {lr_factor(s, **default) for s in range(500)} == {1.0}
    with pytest.raises(ValueError, match="lr_scheduler"):
        lr_factor(0, **{**default, "kind": "linear"})


# ---------------------------------------------------------------- EMA


def test_ema_decay_matches_upstream(golden_dir):
    ref = _recipe(golden_dir, "ema_decay.json")
    # the step's own rule: delta of the k-th update given k - 1 done; the first update is a copy (delta 0)
    got = _delta(torch.arange(1000), ref["decay"], ref["tau"]).tolist()
    assert got[0] == 0.0 and got[1:] == pytest.approx(ref["delta"][1:], rel=1e-12, abs=0)


def test_ema_applied_sequence_matches_averaged_model(golden_dir):
    ref = _recipe(golden_dir, "ema_decay.json")
    applied = ref["applied_delta_first_200_from_AveragedModel"]
    assert applied[0] is None and ref["first_update_copies_weights"]
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, generator=gen, dtype=torch.float64)}
    state = ema_init(params)
    assert state["params"]["w"].data_ptr() != params["w"].data_ptr()
    expect = None
    for k, delta in enumerate(applied, start=1):
        params = {"w": torch.randn(3, generator=gen, dtype=torch.float64)}
        state = ema_update(state, params, decay=ref["decay"], tau=ref["tau"])
        expect = params["w"].clone() if delta is None else delta * expect + (1 - delta) * params["w"]
        torch.testing.assert_close(state["params"]["w"], expect, rtol=1e-12, atol=1e-14)
        assert state["updates"].item() == k


def test_ema_first_update_copies_bitwise_and_interval_skips():
    params = {"a": {"w": torch.randn(4, 3)}, "b": torch.randn(5)}
    state = ema_init(params)
    state = ema_update(state, tree.map_(lambda t: t * 3, params), decay=0.993, tau=100)
    assert torch.equal(state["params"]["a"]["w"], params["a"]["w"] * 3)

    state = ema_init(params)
    history = []
    for step in range(1, 8):  # steps 3 and 6 are due with interval 3
        new = tree.map_(lambda t, s=step: t + s, params)
        before = tree.clone(state["params"])
        state = ema_maybe_update(state, new, torch.tensor(step), interval=3, decay=0.993, tau=100)
        changed = not torch.equal(state["params"]["b"], before["b"])
        history.append((changed, int(state["updates"].item())))
        if step % 3:
            assert torch.equal(state["params"]["b"], before["b"]) and torch.equal(
                state["params"]["a"]["w"], before["a"]["w"]
            )
    assert history == [(False, 0), (False, 0), (True, 1), (False, 1), (False, 1), (True, 2), (False, 2)]
    d2 = float(_delta(torch.tensor(1), 0.993, 100))
    torch.testing.assert_close(state["params"]["b"], d2 * (params["b"] + 3) + (1 - d2) * (params["b"] + 6))


# ---------------------------------------------------------------- AdamW and clipping

_NAMES = [  # one or two parameters from every kind of upstream group
    "transformer.decoder.layers.0.linear1.weight",
    "transformer.decoder.layers.0.linear1.bias",
    "class_embed.weight",
    "class_embed.bias",
    "backbone.0.encoder.encoder.embeddings.cls_token",
    "backbone.0.encoder.encoder.embeddings.mask_token",
    "backbone.0.encoder.encoder.encoder.layer.0.norm1.weight",
    "backbone.0.encoder.encoder.encoder.layer.0.mlp.fc1.weight",
    "backbone.0.encoder.encoder.encoder.layer.11.layer_scale1.lambda1",
    "backbone.0.encoder.encoder.layernorm.weight",
]
_NO_GRAD = "backbone.0.encoder.encoder.embeddings.mask_token"


def _fake(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    shapes = [(6, 4), (6,), (5, 4), (5,), (1, 1, 4), (1, 4), (4,), (8, 4), (4,), (4,)]
    return {n: scale * torch.randn(s, generator=gen) for n, s in zip(_NAMES, shapes)}


def _big_lr_config() -> TrainConfig:
    # large rates so decay, layer-wise LR and bias correction all move the weights visibly
    return TrainConfig(lr=1e-2, lr_encoder=2e-2, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-6)


def test_adamw_matches_torch_over_five_steps():
    gen = torch.Generator().manual_seed(0)
    tcfg = _big_lr_config()
    groups = param_groups(_NAMES, presets.nano(), tcfg)
    assert len(groups) >= 5 and any(g.weight_decay == 0 for g in groups)
    flat = _fake(gen)
    params = tree.unflatten(flat)
    state = adamw_init(params)
    for a, b in zip(tree.leaves(state["exp_avg"]), tree.leaves(params)):
        assert a.data_ptr() != b.data_ptr() and not a.any()

    ref = {n: torch.nn.Parameter(t.clone()) for n, t in flat.items()}
    opt = torch.optim.AdamW(
        [{"params": [ref[n] for n in g.names], "lr": g.lr, "weight_decay": g.weight_decay} for g in groups],
        betas=tcfg.betas,
        eps=tcfg.eps,
    )
    for factor in (0.3, 1.0, 0.7, 0.1, 0.5):
        grads = _fake(gen, scale=0.1)
        grads[_NO_GRAD] = None
        for g, group in zip(opt.param_groups, groups):
            g["lr"] = group.lr * factor
        for n, p in ref.items():
            p.grad = grads[n]
        opt.step()
        params, state = adamw_update(
            params, tree.unflatten(grads), state, groups, torch.tensor(factor), betas=tcfg.betas, eps=tcfg.eps
        )

    assert state["step"].item() == 5
    ours = tree.flatten(params)
    m, v = tree.flatten(state["exp_avg"]), tree.flatten(state["exp_avg_sq"])
    for n, p in ref.items():
        assert (ours[n] - flat[n]).abs().max() > 1e-4 or n == _NO_GRAD
        torch.testing.assert_close(ours[n], p.detach(), rtol=1e-6, atol=1e-7)
        if n == _NO_GRAD:
            assert torch.equal(ours[n], flat[n]) and not m[n].any() and not v[n].any()
            assert opt.state[p] == {}
            continue
        torch.testing.assert_close(m[n], opt.state[p]["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(v[n], opt.state[p]["exp_avg_sq"], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("max_norm", [0.1, 1e3])
def test_clip_matches_torch(max_norm):
    gen = torch.Generator().manual_seed(1)
    grads = _fake(gen)
    grads[_NO_GRAD] = None
    ref = {n: torch.nn.Parameter(torch.zeros(4 if g is None else g.shape)) for n, g in grads.items()}
    for n, p in ref.items():
        p.grad = None if grads[n] is None else grads[n].clone()
    want_norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), max_norm)
    clipped, norm = gt.global_norm_clip(tree.unflatten(grads), max_norm)
    torch.testing.assert_close(norm, want_norm, rtol=1e-6, atol=0)
    flat = tree.flatten(clipped)
    assert flat[_NO_GRAD] is None
    for n, p in ref.items():
        if p.grad is not None:
            torch.testing.assert_close(flat[n], p.grad, rtol=1e-6, atol=0)
    if max_norm < 1:
        total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in flat.values() if g is not None]))
        assert total.item() == pytest.approx(max_norm, rel=1e-5)


def test_clip_zero_disables():
    grads = {"a": torch.full((3,), 4.0), "b": None}
    out, norm = gt.global_norm_clip(grads, 0.0)
    assert torch.equal(out["a"], grads["a"]) and norm.item() == pytest.approx(math.sqrt(48))
    with pytest.raises(ValueError, match="clip_max_norm"):
        gt.global_norm_clip(grads, -1.0)


# ---------------------------------------------------------------- one compiled step


def test_compiled_clip_adamw_ema_does_not_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    gen = torch.Generator().manual_seed(2)
    tcfg = _big_lr_config()
    groups = param_groups(_NAMES, presets.nano(), tcfg)
    sched = dict(total_steps=10, steps_per_epoch=2, warmup_steps=2, kind="cosine", lr_drop_epochs=5, min_factor=0.1)

    def step_fn(params, grads, opt_state, ema_state, step):
        grads, norm = gt.global_norm_clip(grads, 0.5)
        factor = lr_factor(step, **sched)
        params, opt_state = adamw_update(params, grads, opt_state, groups, factor, betas=tcfg.betas, eps=tcfg.eps)
        ema_state = ema_maybe_update(ema_state, params, step + 1, interval=2, decay=0.9, tau=2.0)
        return params, opt_state, ema_state, norm, factor

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step_fn, backend=counter, fullgraph=True)
    torch._dynamo.reset()

    params = tree.unflatten(_fake(gen))
    runs = {}
    for name, fn in (("eager", step_fn), ("compiled", compiled)):
        p, o, e = params, adamw_init(params), ema_init(params)
        factors = []
        for s in range(3):
            grads = tree.unflatten({**_fake(torch.Generator().manual_seed(10 + s), 0.1), _NO_GRAD: None})
            p, o, e, _, f = fn(p, grads, o, e, torch.tensor(s, dtype=torch.int64))
            factors.append(f.item())
        runs[name] = (p, o, e, factors)
    assert counter.frame_count == 1
    assert runs["compiled"][3] == pytest.approx([0.0, 0.5, 1.0])  # step, hence lr, changed every call
    for a, b in zip(tree.leaves(runs["compiled"][0]), tree.leaves(runs["eager"][0])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(tree.leaves(runs["compiled"][2]), tree.leaves(runs["eager"][2])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert runs["compiled"][2]["updates"].item() == 1  # interval 2: updated after step 2 only
