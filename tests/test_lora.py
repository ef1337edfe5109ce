"""DoRA/LoRA as a tree transform: PEFT's forward and gradients, upstream's checkpoint keys, merging,
the backbone_lora run, and gradient checkpointing (same numbers)."""

from __future__ import annotations

import re

import attrs
import pytest
import torch
import torch.nn.functional as F

import rfdetr_fn as rf
from rfdetr_fn import presets, tree
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.model import detector, lora, nn
from rfdetr_fn.step import make_train_step

QUERY = "backbone.0.encoder.encoder.encoder.layer.0.attention.attention.query"


def _peft_dora_linear(x, weight, bias, a, b, magnitude, scaling):
    """PEFT 0.21's unmerged DoRA Linear forward (lora/layer.py + dora.py), written out."""
    base = F.linear(x, weight, bias)
    norm = torch.linalg.norm(weight + scaling * (b @ a).detach(), dim=1).detach()
    scale = (magnitude / norm).view(1, -1)
    return base + (scale - 1) * (base - bias) + scale * F.linear(F.linear(x, a), b) * scaling


def test_dora_merge_matches_peft_forward_and_gradients():
    gen = torch.Generator().manual_seed(0)
    w, bias, x = torch.randn(6, 5, generator=gen), torch.randn(6, generator=gen), torch.randn(3, 5, generator=gen)
    params = {"m": {"weight": w, "bias": bias}}
    adapters, frozen, merge = lora.lora(params, rank=2, alpha=4, where="m.weight")
    flat = tree.flatten(adapters)
    assert sorted(flat) == [
        "m.lora_A.default.weight",
        "m.lora_B.default.weight",
        "m.lora_magnitude_vector.default.weight",
    ]
    assert not flat["m.lora_B.default.weight"].any()  # starts as the base model
    torch.testing.assert_close(flat["m.lora_magnitude_vector.default.weight"], w.norm(dim=1))
    assert flat["m.lora_A.default.weight"].abs().max() <= 1 / 5**0.5
    torch.testing.assert_close(nn.linear(merge(adapters, frozen)["m"], x), F.linear(x, w, bias))

    trained = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in flat.items()}
    ours = {k: v.clone().requires_grad_() for k, v in trained.items()}
    ref = {k: v.clone().requires_grad_() for k, v in trained.items()}
    y = nn.linear(merge(tree.unflatten(ours), frozen)["m"], x)
    want = _peft_dora_linear(x, w, bias, *(ref[f"m.{p}.default.weight"] for p in lora.ADAPTER_PARTS), 2.0)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    want.square().sum().backward()
    for k in ours:
        torch.testing.assert_close(ours[k].grad, ref[k].grad, rtol=1e-5, atol=1e-6)

    plain_ad, _, plain_merge = lora.lora(params, rank=2, alpha=4, where="m.weight", dora=False)
    plain_ad = tree.map_(lambda t: t + 1.0, plain_ad)
    a, b = plain_ad["m"]["lora_A"]["default"]["weight"], plain_ad["m"]["lora_B"]["default"]["weight"]
    torch.testing.assert_close(plain_merge(plain_ad, params)["m"]["weight"], w + 2.0 * b @ a)


def test_upstream_targets_and_peft_key_layout():
    """Upstream wraps the encoder with PEFT: `base_model.model.` prefix, `base_layer.` on adapted linears."""
    cfg = presets.tiny()
    params = lora.add_adapters(detector.init(cfg, 0), cfg)
    adapted = {k.rsplit(".lora_A", 1)[0] for k in tree.flatten(params) if ".lora_A." in k}
    assert adapted == {
        f"backbone.0.encoder.encoder.encoder.layer.{i}.attention.attention.{m}"
        for i in range(cfg.vit_num_layers)
        for m in ("query", "key", "value")
    }  # PEFT matches module names: tokens are parameters, not modules
    peft = lora.to_peft(tree.flatten(params))
    prefix = "backbone.0.encoder.base_model.model.encoder."
    for key in (
        "encoder.layer.0.attention.attention.query.base_layer.weight",
        "encoder.layer.0.attention.attention.query.base_layer.bias",
        "encoder.layer.0.attention.attention.query.lora_A.default.weight",
        "encoder.layer.0.attention.attention.query.lora_B.default.weight",
        "encoder.layer.0.attention.attention.query.lora_magnitude_vector.default.weight",
        "encoder.layer.0.attention.output.dense.weight",
        "embeddings.cls_token",
        "layernorm.weight",
    ):
        assert prefix + key in peft, key
    assert peft["class_embed.weight"] is params["class_embed"]["weight"]
    assert not any(k.startswith("backbone.0.encoder.encoder.") for k in peft)
    dense, adapters = lora.from_peft(peft)
    assert {**dense, **adapters}.keys() == tree.flatten(params).keys()
    assert lora.to_peft(tree.flatten(detector.init(cfg, 0))).keys() == tree.flatten(detector.init(cfg, 0)).keys()


def test_lora_weights_file_round_trip_keep_or_merge(tmp_path):
    cfg = attrs.evolve(presets.tiny(num_classes=2), backbone_lora=True)
    params = lora.add_adapters(detector.init(cfg, 0), cfg)
    params = tree.map_where(lambda t: t + 0.05, params, re.compile(r"lora_(A|B)\."))
    path = tmp_path / "lora.pth"
    rf.save_weights(path, params, cfg)
    saved = torch.load(path, weights_only=True)["model"]
    assert (
        "backbone.0.encoder.base_model.model.encoder.encoder.layer.0.attention.attention.query.lora_B.default.weight"
        in saved
    )

    _, kept = rf.load_weights(path, cfg)
    for k, v in tree.flatten(params).items():
        assert torch.equal(tree.flatten(kept)[k], v), k
    plain = attrs.evolve(cfg, backbone_lora=False)
    _, merged = rf.load_weights(path, plain)
    assert not any(lora.is_adapter(k) for k in tree.flatten(merged))
    want = tree.flatten(lora.merge(params))
    for k, v in tree.flatten(merged).items():
        torch.testing.assert_close(v, want[k])
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    a = rf.apply(kept, images, None, cfg, train=False)["pred_logits"]
    b = rf.apply(merged, images, None, plain, train=False)["pred_logits"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _batch():
    gen = torch.Generator().manual_seed(0)
    return {
        "images": torch.randn(2, 3, 64, 64, generator=gen),
        "mask": torch.zeros(2, 64, 64, dtype=torch.bool),
        "labels": torch.tensor([[1, 0], [0, -1]]),
        "boxes": torch.tensor([[[0.5, 0.5, 0.3, 0.3], [0.3, 0.3, 0.2, 0.2]], [[0.6, 0.6, 0.2, 0.4], [0, 0, 0, 0]]]),
    }


def test_backbone_lora_step_trains_adapters_and_heads_only():
    cfg = attrs.evolve(presets.tiny(num_classes=2), backbone_lora=True)
    tcfg = TrainConfig(lr=1e-2, lr_encoder=1e-2)
    params = lora.add_adapters(detector.init(cfg, 0), cfg)
    step = make_train_step(cfg, tcfg, steps_per_epoch=1)
    state = step.init(params)
    moments = tree.flatten(state["opt_state"]["exp_avg"])
    assert all(lora.is_adapter(k) or not k.startswith("backbone.0.encoder.") for k in moments)
    new, _ = step(state, [_batch()])
    before, after = tree.flatten(state["params"]), tree.flatten(new["params"])
    for k in before:
        moved = not torch.equal(before[k], after[k])
        if k.startswith("backbone.0.encoder.") and not lora.is_adapter(k):
            assert not moved, k
    assert not torch.equal(before[f"{QUERY}.lora_B.default.weight"], after[f"{QUERY}.lora_B.default.weight"])


@pytest.mark.slow
def test_gradient_checkpointing_same_gradients(monkeypatch):
    """ViT blocks, decoder layers, two-stage groups and heads are recomputed; the step is bit-identical."""
    from rfdetr_fn.model import nn as nn_lib

    calls = []

    def counted(fn, *args, **kwargs):
        calls.append(fn.__name__)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(nn_lib, "checkpoint_for_call", lambda: counted)
    cfg = presets.tiny(num_classes=2)
    params = detector.init(cfg, 0)
    tcfg = TrainConfig(drop_path=0.2)
    grads = {}
    for flag in (False, True):
        c = attrs.evolve(cfg, gradient_checkpointing=flag)
        step = make_train_step(c, tcfg, steps_per_epoch=1)
        torch.manual_seed(3)
        new, metrics = step(step.init(params), [_batch()])
        grads[flag] = (tree.flatten(new["params"]), float(metrics["loss"]))
    blocks = cfg.out_feature_indexes[-1]
    assert sorted(set(calls)) == ["_block", "_group_proposals", "_heads", "decoder_layer"]
    assert len(calls) == blocks + cfg.dec_layers + cfg.group_detr + 1
    assert grads[True][1] == grads[False][1]
    for k, v in grads[False][0].items():
        assert torch.equal(v, grads[True][0][k]), k
