"""The train step: gradient parity with upstream, compiled == eager, no recompiles, seeded, and it learns."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import rfdetr_fn as rf
from rfdetr_fn import rng, tree
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.losses.config import LossConfig
from rfdetr_fn.losses.criterion import criterion
from rfdetr_fn.model import detector
from rfdetr_fn.step import compile_step, grad_and_value, make_train_step
from tests.golden import golden_config, golden_params, golden_targets


def test_gradients_match_upstream(golden_dir):
    """Every parameter's gradient of the weighted loss within 1e-4 of upstream's (relative to its max |g|)."""
    case = golden_dir / "tiny_det"
    cfg = golden_config(case)
    params = golden_params(case)
    inputs = load_file(case / "inputs.safetensors")
    targets = golden_targets(case)
    tcfg = TrainConfig()

    def loss(p):
        out = detector.apply(p, inputs["batch1.images"], inputs["batch1.mask"], cfg, train=True)
        return criterion(out, targets, cfg, LossConfig.resolve(cfg, tcfg), train=True)[0]

    grads = tree.flatten(torch.func.grad(loss)(params))
    expected = load_file(case / "grads.safetensors")
    assert set(grads) == set(expected)
    worst = 0.0
    for key, ref in expected.items():
        scale = ref.abs().max().item()
        delta = (grads[key] - ref).abs().max().item()
        if key.endswith("attention.key.bias"):  # mathematically zero; upstream stores rounding noise
            assert delta < 1e-9, key
            continue
        rel = delta / max(scale, 1e-12)
        worst = max(worst, rel)
        assert rel <= 1e-4, f"{key}: max |dg| {delta:.3e} vs max |g| {scale:.3e} (rel {rel:.2e})"
    norm = torch.stack([g.norm() for g in grads.values()]).norm().item()  # like clip_grad_norm_
    expected_norm = json.loads((case / "loss.json").read_text())["grad_global_l2_norm"]
    assert norm == pytest.approx(expected_norm, rel=1e-5), f"worst per-tensor rel {worst:.2e}"


def _tiny_setup(batch_size: int = 2, **train):
    cfg = rf.presets.tiny(num_classes=3, resolution=64)
    tcfg = TrainConfig(batch_size=batch_size, multi_scale="off", **train)
    g = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.randn(batch_size, 3, 64, 64, generator=g),
        "mask": torch.zeros(batch_size, 64, 64, dtype=torch.bool),
        "labels": torch.tensor([[0, 2, -1, -1, -1, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1, -1]]),
        "boxes": torch.tensor(
            [
                [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]] + [[0.0] * 4] * 6,
                [[0.5, 0.5, 0.4, 0.3]] + [[0.0] * 4] * 7,
            ]
        ),
    }
    return cfg, tcfg, batch


def _run(step_fn, state, batch, steps: int):
    losses = []
    for _ in range(steps):
        state, metrics = step_fn(state, [batch])
        losses.append(float(metrics["loss"]))
    return state, losses


def test_eager_gradients_equal_torch_func():
    """The eager step's plain-autograd gradients are torch.func's, up to fp32 rounding (under torch.func the
    attention runs as SDPA's math composite, which has every transform's rules; eagerly the fused kernel)."""
    cfg, tcfg, batch = _tiny_setup()
    params = rf.init(cfg, 0)

    def loss_fn(p):
        out = detector.apply(p, batch["images"], batch["mask"], cfg, train=True)
        return criterion(
            out, {k: batch[k] for k in ("labels", "boxes")}, cfg, LossConfig.resolve(cfg, tcfg), train=True
        )

    grads, (value, losses) = grad_and_value(loss_fn)(params)
    want, (want_value, want_losses) = torch.func.grad_and_value(loss_fn, has_aux=True)(params)
    assert value.item() == pytest.approx(want_value.item(), rel=1e-6) and not value.requires_grad
    assert all(torch.allclose(losses[k], want_losses[k], rtol=1e-5, atol=1e-7) for k in want_losses)
    assert not any(v.requires_grad for v in losses.values())
    got, want = tree.flatten(grads), tree.flatten(want)
    assert got.keys() == want.keys() and not any(g.requires_grad for g in got.values())
    for key, ref in want.items():
        bound = 1e-5 * ref.abs().max().item() + 1e-10  # key.bias gradients are zero up to ~1e-12 rounding
        assert (got[key] - ref).abs().max().item() <= bound, key


@pytest.mark.parametrize(("backend", "solver"), [("scipy", "hungarian"), ("device", "assign_device")])
def test_eager_step_has_no_hidden_host_round_trips(backend, solver):
    """On CUDA every tensor built from Python data is a host-to-device copy and every value read on the host
    a device-to-host one: each a sync that stalls the step. The only one allowed is inside the scipy op; with
    the device solver there is none, which is what lets the whole step be captured as a CUDA graph."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {"lift_fresh", "lift_fresh_copy", "_local_scalar_dense", "nonzero", "masked_select", "item"}
    seen: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    cfg, tcfg, batch = _tiny_setup(drop_path=0.1, matcher_backend=backend)
    step = make_train_step(cfg, tcfg, steps_per_epoch=10)
    state = step.init(rf.init(cfg, 0))
    with Watch():
        step(state, [batch])
    # the final and aux layers in one call, the encoder's 16 proposals (a 64 px image) in another
    assert seen.count(solver) == 2
    assert sorted(set(seen) & syncing) == []


def _same(a: dict, b: dict) -> bool:
    fa, fb = tree.flatten(a), tree.flatten(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_step_is_pure():
    """No hidden inputs or outputs: the global RNG does not matter, two calls on the same inputs agree bit
    for bit, and the input state is left untouched; the state's seed is what varies the draws."""
    cfg, tcfg, batch = _tiny_setup(drop_path=0.5)
    step = make_train_step(cfg, tcfg, steps_per_epoch=10)
    state = step.init(rf.init(cfg, 0))
    before = tree.clone(state)
    torch.manual_seed(1)
    a, metrics_a = step(state, [batch])
    torch.manual_seed(2)
    b, metrics_b = step(state, [batch])
    assert _same(state, before)
    assert _same(a, b) and _same(metrics_a, metrics_b)
    assert not _same(a["params"], state["params"])
    _, metrics_c = step({**state, "seed": rng.key_tensor(1)}, [batch])
    assert float(metrics_c["loss"]) != float(metrics_a["loss"])  # other drop-path draws


def test_same_seed_same_losses():
    cfg, tcfg, batch = _tiny_setup(drop_path=0.1)
    step = make_train_step(cfg, tcfg, steps_per_epoch=10)
    _, a = _run(step, step.init(rf.init(cfg, 1)), batch, 3)
    _, b = _run(step, step.init(rf.init(cfg, 1)), batch, 3)
    assert a == b
    _, c = _run(step, step.init(rf.init(cfg, 2)), batch, 3)
    assert a != c


def _nan_batch(batch: dict) -> dict:
    """A batch whose loss and gradients are NaN: what an fp16 overflow looks like to the step."""
    return {**batch, "images": torch.full_like(batch["images"], float("nan"))}


def test_fp16_overflow_skips_the_update_and_growth_counts_from_the_last_overflow():
    """GradScaler's rule: an overflow skips the update and halves the scale; the scale doubles only after
    `growth interval` finite steps in a row, whatever the step number (it used to grow on step % 2000)."""
    cfg, tcfg, batch = _tiny_setup()
    step = make_train_step(cfg, tcfg, steps_per_epoch=10, precision="fp16")
    state = step.init(rf.init(cfg, 0))
    state["step"] = torch.tensor(1997)
    after, metrics = step(state, [_nan_batch(batch)])
    assert not bool(metrics["finite"]) and float(after["loss_scale"]) == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(after["params"]), tree.leaves(state["params"])))
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(after["opt_state"]), tree.leaves(state["opt_state"])))
    for _ in range(2):  # steps 1998 and 1999: two finite steps since the overflow, far below 2000
        after, metrics = step(after, [batch])
        assert bool(metrics["finite"])
    assert float(after["loss_scale"]) == 2.0**15


def test_fp16_scale_doubles_after_the_growth_interval():
    """Starts at 2**10, not GradScaler's 2**16: with fp16 linear outputs (as upstream's nn.Linear under
    autocast) this tiny model's activation gradients overflow fp16 at 2**16 by its fifth step, a real
    overflow that would halve the scale; the growth rule is what this test pins down."""
    cfg, tcfg, batch = _tiny_setup(loss_scale_growth_interval=2)
    step = make_train_step(cfg, tcfg, steps_per_epoch=10, precision="fp16")
    state, scales = step.init(rf.init(cfg, 0)), []
    state["loss_scale"] = torch.tensor(2.0**10)
    for b in (batch, _nan_batch(batch), batch, batch, batch):
        state, _ = step(state, [b])
        scales.append((float(state["loss_scale"]), int(state["good_steps"])))
    assert scales == [(2.0**10, 1), (2.0**9, 0), (2.0**9, 1), (2.0**10, 0), (2.0**10, 1)]


def test_step_schedule_is_capped_by_max_steps():
    """Like Lightning's estimated_stepping_batches: max_steps shortens the cosine, so it ends at min_factor."""
    cfg, tcfg, batch = _tiny_setup(epochs=2, max_steps=4, lr_scheduler="cosine", lr_min_factor=0.25)
    step = make_train_step(cfg, tcfg, steps_per_epoch=10)  # 20 steps uncapped, 4 capped
    state, factors = step.init(rf.init(cfg, 0)), []
    for _ in range(4):
        state, metrics = step(state, [batch])
        factors.append(float(metrics["lr_factor"]))
    # total 4, no warm-up: 0.25 + 0.75 * 0.5 * (1 + cos(pi * s / 4))
    assert factors == pytest.approx([1.0, 0.890165, 0.625, 0.359835], abs=1e-6)


@pytest.mark.slow
def test_whole_compiled_step_matches_eager_without_recompiles():
    """The one-graph torch.func step (compile_step's regional=False); the default regional step is checked
    in test_compile.py. aot_eager traces the graph inductor compiles, at a fraction of the compile time."""
    import torch._dynamo.utils as dutils

    cfg, tcfg, batch = _tiny_setup(drop_path=0.1)  # the random draws too: compiled == eager
    step = make_train_step(cfg, tcfg, steps_per_epoch=10)
    _, eager = _run(step, step.init(rf.init(cfg, 0)), batch, 3)
    torch._dynamo.reset()
    compiled = compile_step(step, regional=False, backend="aot_eager")
    state = step.init(rf.init(cfg, 0))
    state, first = _run(compiled, state, batch, 1)
    graphs = dutils.counters["stats"]["unique_graphs"]
    state, rest = _run(compiled, state, batch, 2)
    assert dutils.counters["stats"]["unique_graphs"] == graphs, "the step recompiled after warm-up"
    for e, c in zip(eager, first + rest):
        assert c == pytest.approx(e, rel=1e-5)


def test_compiled_step_survives_a_multi_scale_menu(monkeypatch):
    """Past Dynamo's recompile limit a fullgraph function fails; compile_step makes room for every size."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(dynamo_config, name, 8)  # Dynamo's default, restored after the test
    torch._dynamo.reset()
    fn = compile_step(lambda x: (x * 2.0).sum(), max_shapes=12, backend="eager")
    assert [float(fn(torch.ones(n))) for n in range(1, 12)] == [2.0 * n for n in range(1, 12)]  # 11 shapes
    assert getattr(dynamo_config, name) == 12
    compile_step(lambda x: x, max_shapes=4, backend="eager")
    assert getattr(dynamo_config, name) == 12  # never lowered
    torch._dynamo.reset()


def test_gradient_accumulation_equals_big_batch():
    """Two micro-batches of one image give the same update as one batch of two when boxes per image match."""
    cfg, tcfg, batch = _tiny_setup(clip_max_norm=0.0)
    batch["labels"] = torch.tensor([[0, -1], [1, -1]])
    batch["boxes"] = batch["boxes"][:, :2]
    halves = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
    step = make_train_step(cfg, tcfg, steps_per_epoch=10)
    big, _ = step(step.init(rf.init(cfg, 0)), [batch])
    accum_cfg = TrainConfig(batch_size=1, grad_accum_steps=2, multi_scale="off", clip_max_norm=0.0)
    accum = make_train_step(cfg, accum_cfg, steps_per_epoch=10)
    small, _ = accum(accum.init(rf.init(cfg, 0)), halves)
    for key, value in tree.flatten(big["params"]).items():
        torch.testing.assert_close(tree.flatten(small["params"])[key], value, rtol=1e-4, atol=1e-6)  # 1% of one lr step
