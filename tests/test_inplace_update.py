"""The in-place update primitives (for a donated state) are bit-equal to the pure update they mirror."""

from __future__ import annotations

import pytest
import torch

from rfdetr_fn import tree
from rfdetr_fn.optim import chain as gt
from rfdetr_fn.optim import ema as ema_lib
from rfdetr_fn.optim import inplace


def _params():
    g = torch.Generator().manual_seed(0)
    return {
        "decayed": {"w": torch.randn(300, 257, generator=g), "v": torch.randn(1000, generator=g)},
        "plain": {"bias": torch.randn(33, 7, generator=g)},
    }


def test_inplace_clip_adamw_and_ema_are_bit_equal_to_the_pure_update():
    params = _params()
    lrs = {"decayed": {"w": 1e-3, "v": 1e-3}, "plain": {"bias": 3e-4}}
    decays = {"decayed": {"w": 1e-2, "v": 1e-2}, "plain": {"bias": 0.0}}

    def schedule(step):
        return 0.5 + 0.1 * step.to(torch.float64)

    tx = gt.adamw(lrs, weight_decay=decays, schedule=schedule)
    pure_p, pure_opt, pure_ema = tree.clone(params), tx.init(params), ema_lib.ema_init(params)
    own_p, own_ema = tree.clone(params), ema_lib.ema_init(params)
    own_m, own_v = tree.map_(torch.zeros_like, params), tree.map_(torch.zeros_like, params)
    own_step = torch.zeros((), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    for i in range(4):
        grads = tree.map_(lambda t: torch.randn(t.shape, generator=gen) * 10.0, params)
        step = torch.tensor(i)
        clipped, norm = gt.global_norm_clip(grads, 0.1)
        updates, pure_opt = gt.deferred_update(tx)(clipped, pure_opt, pure_p, step=step)  # as the step applies it
        pure_p = gt.apply_updates(pure_p, updates)
        pure_ema = ema_lib.ema_maybe_update(pure_ema, pure_p, step + 1, interval=1, decay=0.993, tau=100)

        flat_g = tree.flatten(tree.clone(grads))
        own_norm = inplace.global_norm_clip_(list(flat_g.values()), 0.1)
        own_step += 1
        flat_p, flat_m, flat_v = tree.flatten(own_p), tree.flatten(own_m), tree.flatten(own_v)
        for names, lr, wd in ((["decayed.w", "decayed.v"], 1e-3, 1e-2), (["plain.bias"], 3e-4, 0.0)):
            inplace.adamw_(
                [flat_p[n] for n in names],
                [flat_g[n] for n in names],
                [flat_m[n] for n in names],
                [flat_v[n] for n in names],
                own_step,
                lr=schedule(step) * lr,
                weight_decay=wd,
            )
        delta = ema_lib._delta(own_ema["updates"], 0.993, 100)
        inplace.ema_blend_(list(tree.leaves(own_ema["params"])), list(tree.leaves(own_p)), delta)
        own_ema["updates"] += 1

        assert torch.equal(norm, own_norm)
        for name, value in tree.flatten(pure_p).items():
            assert torch.equal(value, flat_p[name]), f"step {i}: {name}"
            assert torch.equal(tree.flatten(pure_opt["exp_avg"])[name], flat_m[name])
            assert torch.equal(tree.flatten(pure_opt["exp_avg_sq"])[name], flat_v[name])
            assert torch.equal(tree.flatten(pure_ema["params"])[name], tree.flatten(own_ema["params"])[name])
    assert not torch.equal(tree.flatten(pure_p)["decayed.w"], params["decayed"]["w"])  # it really trained


def _step_pair(**train):
    """The pure and the donating step of one configuration, and a batch (tiny model, 64 px)."""
    import rfdetr_fn as rf
    from rfdetr_fn.step import make_train_step
    from tests.test_train import _tiny_setup

    cfg, tcfg, batch = _tiny_setup(**train)
    pure = make_train_step(cfg, tcfg, steps_per_epoch=10)
    donating = make_train_step(cfg, tcfg, steps_per_epoch=10, donate=True)
    return rf.init(cfg, 0), pure, donating, batch


@pytest.mark.parametrize(
    "train",
    [{}, {"ema_update_interval": 2, "freeze_encoder": True}, {"optimizer_kwargs": '{"betas": [0.8, 0.99]}'}],
    ids=["default", "ema-interval-frozen-encoder", "betas"],
)
def test_donating_step_is_bit_equal_to_the_pure_step(train):
    """make_train_step(donate=True): params, moments, EMA and metrics equal the pure step's, to the bit."""
    params, pure, donating, batch = _step_pair(**train)
    a, b = pure.init(tree.clone(params)), donating.init(tree.clone(params))
    assert donating.settings["donate"] and not pure.settings["donate"]
    for _ in range(3):
        a, metrics_a = pure(a, [batch])
        b, metrics_b = donating(b, [batch])
        for key in ("loss", "grad_norm", "lr_factor"):
            assert torch.equal(metrics_a[key], metrics_b[key]), key
    for part in ("params", "opt_state", "ema_state"):
        for name, value in tree.flatten(a[part]).items():
            assert torch.equal(value, tree.flatten(b[part])[name]), f"{part}.{name}"
    assert torch.equal(a["step"], b["step"]) and int(b["step"]) == 3


def test_donated_state_is_reused_in_place_and_refused_when_passed_again():
    params, _, donating, batch = _step_pair()
    state = donating.init(params)
    weight = tree.flatten(state["params"])["class_embed.weight"]
    before = weight.clone()
    new, _ = donating(state, [batch])
    assert tree.flatten(new["params"])["class_embed.weight"] is weight  # the same buffer, updated
    assert not torch.equal(weight, before)
    with pytest.raises(ValueError, match="donated to an earlier step"):
        donating(state, [batch])
    donating(new, [batch])  # the returned state is the one to pass on


def test_donation_falls_back_to_the_pure_update_where_it_cannot_mirror_it():
    """sgd (or any optimizer but the built-in adamw) and fp16 run the pure update under donate=True."""
    from rfdetr_fn.step import make_train_step
    from tests.test_train import _tiny_setup

    cfg, tcfg, _ = _tiny_setup(optimizer="sgd")
    assert not make_train_step(cfg, tcfg, steps_per_epoch=10, donate=True).settings["donate"]
    cfg, tcfg, _ = _tiny_setup()
    assert not make_train_step(cfg, tcfg, steps_per_epoch=10, precision="fp16", donate=True).settings["donate"]
