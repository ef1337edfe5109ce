"""Windowed DINOv2 backbone and multi-scale projector: keys, sizes, windows, PE, drop path, dtypes."""

from __future__ import annotations

import json
import math

import attrs
import pytest
import torch
import torch.nn.functional as F

from rfdetr_fn import presets, tree
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.model import backbone, projector
from rfdetr_fn.model.backbone import resize_pos_embed, window_partition, window_unpartition
from tests.golden import golden_config, reference_shapes


def small_cfg(**overrides) -> ModelConfig:
    """A 4-layer, 2-window ViT small enough for float64 reference checks."""
    spec = dict(
        vit_hidden_size=32,
        vit_num_layers=4,
        vit_num_heads=2,
        out_feature_indexes=(1, 2, 4),
        patch_size=4,
        num_windows=2,
        resolution=32,
        positional_encoding_size=6,
        hidden_dim=32,
        sa_nheads=4,
        ca_nheads=4,
    )
    return ModelConfig(**{**spec, **overrides})


def make(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    b, p = backbone.init(cfg, gen), projector.init(cfg, gen)
    # Perturb the constant-initialised tensors (LN, LayerScale, biases) so every parameter matters.
    noise = torch.Generator().manual_seed(seed + 1)
    b = tree.map_(lambda t: (t + 0.1 * torch.randn(t.shape, generator=noise)).to(dtype), b)
    p = tree.map_(lambda t: (t + 0.1 * torch.randn(t.shape, generator=noise)).to(dtype), p)
    return b, p


def meta_params(cfg: ModelConfig):
    with torch.device("meta"):
        gen = torch.Generator()
        return backbone.init(cfg, gen), projector.init(cfg, gen)


# ---- keys, shapes, counts ----


@pytest.mark.parametrize(("preset", "variant"), [("nano", "nano"), ("seg_nano", "segnano")])
def test_keys_shapes_and_order_match_upstream_state_dict(preset, variant, golden_dir):
    ref = {k: v for k, v in reference_shapes(golden_dir.parent, variant).items() if k.startswith("backbone.")}
    b, p = meta_params(presets.get(preset))
    flat = {**tree.flatten(b, "backbone.0.encoder."), **tree.flatten(p, "backbone.0.projector.")}
    ours = {k: tuple(v.shape) for k, v in flat.items()}
    assert ours == ref
    assert list(ours) == list(ref)  # upstream's parameter order (optimizer state order)


@pytest.mark.parametrize(
    ("preset", "vit", "proj"),
    [
        ("nano", 21_821_184, 1_444_864),
        ("base", 22_056_576, 1_444_864),
        ("large_deprecated", 86_580_480, 32_457_216),
    ],
)
def test_parameter_counts_match_spec(preset, vit, proj):
    b, p = meta_params(presets.get(preset))
    assert tree.num_params(b) == vit
    assert tree.num_params(p) == proj


def test_large_deprecated_projector_keys():
    _, p = meta_params(presets.large_deprecated())
    shapes = tree.shapes(p)
    assert shapes["stages_sampling.0.3.0.weight"] == (768, 384, 2, 2)
    assert shapes["stages_sampling.0.3.0.bias"] == (384,)
    assert shapes["stages_sampling.1.3.0.conv.weight"] == (768, 768, 3, 3)
    assert shapes["stages_sampling.1.3.0.bn.weight"] == (768,)
    assert shapes["stages.0.0.cv1.conv.weight"] == (384, 1536, 1, 1)
    assert shapes["stages.1.0.cv1.conv.weight"] == (384, 3072, 1, 1)


def test_registers_encoder_adds_zero_register_tokens():
    cfg = small_cfg(encoder="dinov2_registers_windowed_small")
    b = backbone.init(cfg, torch.Generator().manual_seed(0))
    emb = b["encoder"]["embeddings"]
    assert list(emb)[:4] == ["cls_token", "mask_token", "register_tokens", "position_embeddings"]
    assert emb["register_tokens"].shape == (1, 4, 32) and not emb["register_tokens"].any()
    assert emb["position_embeddings"].shape == (1, 37, 32)


def test_init_statistics():
    cfg = presets.nano(vit_num_layers=2, out_feature_indexes=(1, 2))
    gen = torch.Generator().manual_seed(0)
    b, p = backbone.init(cfg, gen), projector.init(cfg, gen)
    layer = b["encoder"]["encoder"]["layer"]["0"]
    w = layer["mlp"]["fc1"]["weight"]
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert not layer["mlp"]["fc1"]["bias"].any() and not b["encoder"]["embeddings"]["mask_token"].any()
    assert torch.equal(layer["layer_scale1"]["lambda1"], torch.ones(384))
    pos = b["encoder"]["embeddings"]["position_embeddings"]
    assert abs(pos.std().item() - 0.02) < 1e-3
    conv = p["stages"]["0"]["0"]["m"]["0"]["cv1"]["conv"]["weight"]  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
    bound = 1 / math.sqrt(128 * 9)
    assert conv.abs().max() <= bound and conv.abs().max() > 0.99 * bound
    again = backbone.init(cfg, torch.Generator().manual_seed(0))
    assert torch.equal(again["encoder"]["embeddings"]["cls_token"], b["encoder"]["embeddings"]["cls_token"])


# ---- windows and position table ----


def test_window_partition_round_trip_and_order():
    x = torch.randn(2, 6, 8, 5)
    w = window_partition(x, 2)
    assert w.shape == (8, 12, 5)
    assert torch.equal(window_unpartition(w, 2, (6, 8)), x)
    # image 1, window row 1, column 0 is window 4 + 2 = 6
    assert torch.equal(w[6], x[1, 3:6, 0:4].reshape(12, 5))
    assert torch.equal(window_partition(x, 1)[1], x[1].reshape(48, 5))


def test_position_table_identity_at_native_grid_and_resized_otherwise():
    table = torch.randn(1, 1 + 6 * 6, 8)
    assert resize_pos_embed(table, (6, 6)) is table
    same_count = resize_pos_embed(table, (4, 9))  # 36 patches, but not the square grid: must interpolate
    assert same_count.shape == table.shape and not torch.allclose(same_count, table)
    assert torch.equal(same_count[:, 0], table[:, 0])
    wide = resize_pos_embed(table, (6, 12))
    assert wide.shape == (1, 73, 8)
    # a constant table stays constant under bicubic resampling
    flat = torch.full((1, 37, 3), 0.5)
    assert torch.allclose(resize_pos_embed(flat, (3, 9)), torch.full((1, 28, 3), 0.5), atol=1e-6)


# ---- forward against an independent, loop-based reference ----


def _reference_features(b, images, cfg):
    """Plain loops over images and windows, explicit softmax attention: no shared reshapes with the model."""
    enc = b["encoder"]
    emb = enc["embeddings"]
    proj = emb["patch_embeddings"]["projection"]
    ps, nw, d, heads = cfg.patch_size, cfg.num_windows, cfg.vit_width, cfg.vit_heads
    bsz, _, height, width = images.shape
    hp, wp = height // ps, width // ps
    h, w = hp // nw, wp // nw
    pos = resize_pos_embed(emb["position_embeddings"], (hp, wp))
    prefix = 1 + cfg.num_registers

    def ln(p, x):
        return F.layer_norm(x, (d,), p["weight"], p["bias"], 1e-6)

    def lin(p, x):
        return x @ p["weight"].T + p["bias"]

    def attend(p, x):
        a = p["attention"]
        q, k, v = (lin(a[n], x).reshape(-1, heads, d // heads).transpose(0, 1) for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d // heads), dim=-1) @ v
        return lin(p["output"]["dense"], att.transpose(0, 1).reshape(-1, d))

    seqs = []  # seqs[b][window] = (T, D)
    for i in range(bsz):
        grid = (
            torch.stack(
                [
                    torch.stack(
                        [
                            (proj["weight"] * images[i, :, r * ps : (r + 1) * ps, c * ps : (c + 1) * ps]).sum((1, 2, 3))
                            for c in range(wp)
                        ]
                    )
                    for r in range(hp)
                ]
            )
            + proj["bias"]
        )
        grid = grid + pos[0, 1:].reshape(hp, wp, d)
        cls = emb["cls_token"][0] + pos[0, :1]
        regs = [emb["register_tokens"][0]] if cfg.num_registers else []
        seqs.append(
            [
                torch.cat([cls, *regs, grid[r * h : (r + 1) * h, c * w : (c + 1) * w].reshape(-1, d)])
                for r in range(nw)
                for c in range(nw)
            ]
        )
    states = [[list(s) for s in seqs]]
    for i in range(cfg.out_feature_indexes[-1]):
        p = enc["encoder"]["layer"][str(i)]
        full = i in cfg.out_feature_indexes
        new = []
        for wins in states[-1]:
            normed = [ln(p["norm1"], x) for x in wins]
            if full:
                out = attend(p["attention"], torch.cat(normed)).split([x.shape[0] for x in wins])
            else:
                out = [attend(p["attention"], x) for x in normed]
            wins = [x + o * p["layer_scale1"]["lambda1"] for x, o in zip(wins, out)]
            wins = [
                x + lin(p["mlp"]["fc2"], F.gelu(lin(p["mlp"]["fc1"], ln(p["norm2"], x)))) * p["layer_scale2"]["lambda1"]
                for x in wins
            ]
            new.append(wins)
        states.append(new)
    maps = []
    for stage in cfg.out_feature_indexes:
        out = torch.zeros(bsz, d, hp, wp, dtype=images.dtype)
        for i, wins in enumerate(states[stage]):
            for k, x in enumerate(wins):
                r, c = divmod(k, nw)
                out[i, :, r * h : (r + 1) * h, c * w : (c + 1) * w] = ln(enc["layernorm"], x)[prefix:].T.reshape(
                    d, h, w
                )
        maps.append(out)
    return maps


@pytest.mark.parametrize(
    ("overrides", "hw"),
    [
        ({}, (32, 32)),
        ({}, (24, 40)),
        ({"encoder": "dinov2_registers_windowed_small"}, (32, 32)),
        ({"num_windows": 1, "out_feature_indexes": (2, 3)}, (20, 28)),
    ],
)
def test_features_match_loop_reference_float64(overrides, hw):
    cfg = small_cfg(**overrides)
    b, _ = make(cfg, dtype=torch.float64)
    images = torch.randn(2, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours = backbone.features(b, images, cfg)
    ref = _reference_features(b, images, cfg)
    assert len(ours) == len(cfg.out_feature_indexes)
    for o, r in zip(ours, ref):
        assert o.dtype == torch.float64 and o.shape == (2, 32, hw[0] // 4, hw[1] // 4)
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


def test_full_attention_routing_matters():
    """With two windows, the blocks numbered like the stages attend across the whole image."""
    cfg = small_cfg()
    assert cfg.full_attention_blocks == (1, 2)
    b, _ = make(cfg, dtype=torch.float64)
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    base = backbone.features(b, images, cfg)
    # Changing the top half of the image changes stage 1 (block 0, windowed) only in the top windows.
    changed = images.clone()
    changed[:, :, :16] += 1.0
    after = backbone.features(b, changed, cfg)
    assert torch.equal(after[0][..., 4:, :], base[0][..., 4:, :])
    assert not torch.allclose(after[1][..., 4:, :], base[1][..., 4:, :])  # block 1 attends across windows


def test_one_window_windowed_and_full_attention_agree():
    cfg = small_cfg(num_windows=1)
    b, _ = make(cfg, dtype=torch.float64)
    x = torch.randn(2, 1 + 25, 32, dtype=torch.float64)
    layer = b["encoder"]["encoder"]["layer"]["0"]
    torch.testing.assert_close(
        backbone._block(layer, x, cfg, True, None, None),
        backbone._block(layer, x, cfg, False, None, None),
        rtol=0,
        atol=0,
    )
    # and through the public function: routing stage blocks to full attention is a no-op with one window
    wide = attrs.evolve(cfg, out_feature_indexes=(4,))
    assert cfg.full_attention_blocks == (1, 2) and wide.full_attention_blocks == ()
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(backbone.features(b, images, wide)[0], backbone.features(b, images, cfg)[-1])


def test_bad_image_sizes_raise_with_the_sizes():
    cfg = small_cfg()
    b, _ = make(cfg)
    with pytest.raises(ValueError, match=r"30x32 .*divisible by patch_size\*num_windows = 8"):
        backbone.features(b, torch.randn(1, 3, 30, 32), cfg)
    with pytest.raises(ValueError, match="images must be"):
        backbone.features(b, torch.randn(1, 1, 32, 32), cfg)


# ---- drop path ----


def test_drop_path_rates_match_upstream(golden_dir):
    ref = json.loads((golden_dir / "recipe" / "drop_path.json").read_text())
    rates = backbone.drop_path_rates(ref["drop_path"], ref["num_layers"])
    assert rates.tolist() == ref["per_layer_after_update_drop_path"]


def test_drop_path_off_is_deterministic_and_on_is_stochastic_depth():
    cfg = small_cfg()
    b, _ = make(cfg)
    images = torch.randn(2, 3, 32, 32)
    ref = backbone.features(b, images, cfg)
    state = torch.get_rng_state()
    for kwargs in ({"train": True, "drop_path": 0.0}, {"train": False, "drop_path": 0.5}):
        for o, r in zip(backbone.features(b, images, cfg, **kwargs), ref):
            assert torch.equal(o, r)
    a = backbone.features(b, images, cfg, train=True, drop_path=0.5, key=7)
    again = backbone.features(b, images, cfg, train=True, drop_path=0.5, key=torch.tensor(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is never used
    assert all(torch.equal(x, y) for x, y in zip(a, again))  # an int key and a tensor key draw alike
    assert not torch.allclose(a[-1], ref[-1])
    other = backbone.features(b, images, cfg, train=True, drop_path=0.5, key=8)
    assert not torch.equal(other[-1], a[-1])
    with pytest.raises(ValueError, match="drop path needs a random key"):
        backbone.features(b, images, cfg, train=True, drop_path=0.5)
    # one rate: each sample (window row) is zeroed with probability p, survivors scaled by 1/(1-p)
    out = backbone._drop_path(torch.ones(20000, 3, 2), torch.tensor(0.25), key=0, branch=0)
    per_sample = out[:, 0, 0]
    assert torch.equal(out, per_sample[:, None, None].expand_as(out))
    kept = per_sample[per_sample > 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.75))
    assert abs((per_sample > 0).float().mean().item() - 0.75) < 0.02


# ---- projector ----


def test_nano_shapes_at_384():
    cfg = presets.nano()
    gen = torch.Generator().manual_seed(0)
    b, p = backbone.init(cfg, gen), projector.init(cfg, gen)
    with torch.no_grad():
        feats = backbone.features(b, torch.randn(1, 3, 384, 384), cfg)
        out = projector.apply(p, feats, cfg)
    assert [f.shape for f in feats] == [(1, 384, 24, 24)] * 4
    assert [o.shape for o in out] == [(1, 256, 24, 24)]
    # the final channel LayerNorm (weight 1, bias 0 at init) normalises every pixel over channels
    torch.testing.assert_close(out[0].mean(1), torch.zeros(1, 24, 24), atol=1e-5, rtol=0)


def test_large_deprecated_two_levels_on_meta():
    cfg = presets.large_deprecated()
    b, p = meta_params(cfg)
    with torch.device("meta"):
        feats = backbone.features(b, torch.empty(2, 3, 560, 560), cfg)
        out = projector.apply(p, feats, cfg)
    assert [f.shape for f in feats] == [(2, 768, 40, 40)] * 4
    assert [o.shape for o in out] == [(2, 384, 80, 80), (2, 384, 20, 20)]


def _reference_projector(p, feats, cfg):
    """Module-by-module reference with torch.nn layers built from the same parameters."""

    def conv_x(q, x, stride=1, act=F.silu):
        w = q["conv"]["weight"]
        conv = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[-1], stride, w.shape[-1] // 2, bias=False).double()
        conv.weight.data = w
        y = conv(x).permute(0, 2, 3, 1)
        y = torch.nn.functional.layer_norm(y, (y.shape[-1],), q["bn"]["weight"], q["bn"]["bias"], 1e-6)
        return act(y.permute(0, 3, 1, 2))

    outs = []
    for i, level in enumerate(cfg.projector_scale):
        maps = []
        for j, x in enumerate(feats):
            if level == "P3":
                q = p["stages_sampling"][str(i)][str(j)]["0"]
                up = torch.nn.ConvTranspose2d(q["weight"].shape[0], q["weight"].shape[1], 2, 2).double()
                up.weight.data, up.bias.data = q["weight"], q["bias"]
                x = up(x)
            elif level == "P5":
                x = conv_x(p["stages_sampling"][str(i)][str(j)]["0"], x, 2, torch.relu)
            maps.append(x)
        c2f = p["stages"][str(i)]["0"]
        y0, y1 = conv_x(c2f["cv1"], torch.cat(maps, 1)).split(cfg.hidden_dim // 2, 1)
        ys = [y0, y1]
        for k in range(3):
            ys.append(conv_x(c2f["m"][str(k)]["cv2"], conv_x(c2f["m"][str(k)]["cv1"], ys[-1])))
        y = conv_x(c2f["cv2"], torch.cat(ys, 1)).permute(0, 2, 3, 1)
        fin = p["stages"][str(i)]["1"]
        outs.append(F.layer_norm(y, (y.shape[-1],), fin["weight"], fin["bias"], 1e-6).permute(0, 3, 1, 2))
    return outs


def test_projector_three_levels_match_module_reference():
    cfg = small_cfg(projector_scale=("P3", "P4", "P5"))
    _, p = make(cfg, dtype=torch.float64)
    feats = [torch.randn(2, 32, 4, 6, dtype=torch.float64) for _ in cfg.out_feature_indexes]
    ours = projector.apply(p, feats, cfg)
    assert [o.shape for o in ours] == [(2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    for o, r in zip(ours, _reference_projector(p, feats, cfg)):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
    assert "1" not in p["stages_sampling"]  # P4 resampling is an identity with no parameters


def test_projector_rejects_wrong_inputs():
    cfg = small_cfg()
    _, p = make(cfg)
    with pytest.raises(ValueError, match="projector got 2 feature maps"):
        projector.apply(p, [torch.randn(1, 32, 4, 4)] * 2, cfg)
    with pytest.raises(ValueError, match="layer_norm=False"):
        projector.init(small_cfg(layer_norm=False), torch.Generator())


# ---- dtypes, golden weights, compile ----


def test_float32_and_float64_agree():
    cfg = small_cfg()
    b64, p64 = make(cfg, dtype=torch.float64)
    b32, p32 = tree.map_(lambda t: t.float(), b64), tree.map_(lambda t: t.float(), p64)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out64 = projector.apply(p64, backbone.features(b64, images, cfg), cfg)[0]
    out32 = projector.apply(p32, backbone.features(b32, images.float(), cfg), cfg)[0]
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


def test_runs_on_golden_tiny_det_weights(golden_dir):
    from safetensors.torch import load_file

    weights = load_file(str(golden_dir / "tiny_det" / "weights.safetensors"))
    inputs = load_file(str(golden_dir / "tiny_det" / "inputs.safetensors"))
    cfg = golden_config(golden_dir / "tiny_det")
    b = tree.unflatten(
        {k[len("backbone.0.encoder.") :]: v for k, v in weights.items() if k.startswith("backbone.0.encoder.")}
    )
    p = tree.unflatten(
        {k[len("backbone.0.projector.") :]: v for k, v in weights.items() if k.startswith("backbone.0.projector.")}
    )
    b_init, p_init = meta_params(cfg)
    assert tree.shapes(b) == tree.shapes(b_init) and tree.shapes(p) == tree.shapes(p_init)
    for name, hw in (("batch1", (12, 12)), ("nonsquare", (8, 12))):
        with torch.no_grad():
            out = projector.apply(p, backbone.features(b, inputs[f"{name}.images"], cfg), cfg)
        assert out[0].shape == (2, 128, *hw) and torch.isfinite(out[0]).all()


def _compile_case():
    cfg = small_cfg()
    b, p = make(cfg)

    def run(b, p, images, train: bool, drop_path: float):
        vit = backbone.features(b, images, cfg, train=train, drop_path=drop_path, key=torch.tensor(5))
        return projector.apply(p, vit, cfg)

    return b, p, run


def test_compiles_fullgraph():
    b, p, run = _compile_case()
    images = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager", dynamic=False)
    torch.testing.assert_close(compiled(b, p, images, False, 0.0), run(b, p, images, False, 0.0))
    out = compiled(b, p, images, True, 0.3)[0]  # drop path traces too, with the same draws as eager
    torch.testing.assert_close(out, run(b, p, images, True, 0.3)[0])


@pytest.mark.slow
def test_compiles_with_dynamic_image_sizes():
    """A second (non-square) size recompiles with symbolic H and W (about 40 s on 2 cores)."""
    b, p, run = _compile_case()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    compiled(b, p, torch.randn(2, 3, 32, 32), False, 0.0)
    images = torch.randn(2, 3, 24, 40)
    torch.testing.assert_close(compiled(b, p, images, False, 0.0), run(b, p, images, False, 0.0))
