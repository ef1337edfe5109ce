"""Keypoint model (upstream's GroupPose keypoint preview): parity with the golden tiny_kp model, layout.

Tolerances as in test_model_parity: 1e-4 in float32, 1e-6 in float64.
"""

from __future__ import annotations

import json
import math

import attrs
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rfdetr_fn import presets, tree
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.io.weights import KP_CLASS_MASK, KP_MASK, class_names, load_weights, save_weights
from rfdetr_fn.losses.config import LossConfig
from rfdetr_fn.losses.criterion import criterion
from rfdetr_fn.losses.matcher import MatchCosts, match, match_costs
from rfdetr_fn.model import backbone, detector, keypoints, postprocess, projector, transformer
from rfdetr_fn.step import grad_and_value, make_train_step
from tests.golden import golden_config, golden_params, golden_targets
from tests.test_model_parity import FP32_TOL, FP64_TOL, flat_outputs, worst_deltas


@pytest.fixture(scope="module")
def kp(golden_dir):
    d = golden_dir / "tiny_kp"
    return {
        "dir": d,
        "cfg": golden_config(d),
        "params": golden_params(d),
        "inputs": load_file(d / "inputs.safetensors"),
        "info": json.loads((d / "config.json").read_text()),
    }


def _eval(kp, batch: str, dtype=torch.float32, train: bool = False):
    x = kp["inputs"]
    params = tree.map_(lambda t: t.to(dtype), kp["params"])
    with torch.no_grad():
        return detector.apply(params, x[f"{batch}.images"].to(dtype), x[f"{batch}.mask"], kp["cfg"], train=train)


@pytest.mark.parametrize(
    "dtype,tol,file",
    [(torch.float32, FP32_TOL, ""), pytest.param(torch.float64, FP64_TOL, "_float64", marks=pytest.mark.slow)],
)
def test_keypoint_eval_parity(kp, dtype, tol, file):
    ref = load_file(kp["dir"] / f"outputs_eval{file}.safetensors")
    for batch in ("batch1", "padded"):
        out = _eval(kp, batch, dtype)
        assert out["pred_keypoints"].shape == (2, 20, 8, 8) and out["pred_keypoints"].dtype == dtype
        deltas = worst_deltas(flat_outputs(out), ref, f"{batch}.")
        worst = max(deltas.values())
        print(f"tiny_kp {dtype} eval {batch}: worst |delta| {worst:.3g}")
        assert worst <= tol, f"{batch}: worst {worst:.3g} ({deltas})"
        assert not out["pred_keypoints"][..., 7, :].any(), "the unused slot (class 1, k=3) must stay zero"


def test_keypoint_train_parity(kp):
    ref = load_file(kp["dir"] / "outputs_train.safetensors")
    out = _eval(kp, "batch1", train=True)
    assert out["pred_keypoints"].shape == (2, 260, 8, 8)
    deltas = worst_deltas(flat_outputs(out), ref, "")
    assert max(deltas.values()) <= FP32_TOL, deltas
    sel = load_file(kp["dir"] / "two_stage_selection.safetensors")
    cfg, p, x = kp["cfg"], kp["params"], kp["inputs"]
    bb = p["backbone"]["0"]
    with torch.no_grad():
        feats = projector.apply(bb["projector"], backbone.features(bb["encoder"], x["batch1.images"], cfg), cfg)
        masks = detector._level_masks(x["batch1.mask"], feats)
        picked = transformer.two_stage(p["transformer"], *transformer.flatten_levels(feats, masks), cfg, 13)[3]
    assert torch.equal(picked, sel["train.batch1.topk_indices"])


def test_keypoint_intermediates(kp):
    """The keypoint path piece by piece (first divergence), from the eval forward's own inputs."""
    ref = load_file(kp["dir"] / "intermediates_eval.safetensors")
    cfg, p, x = kp["cfg"], kp["params"], kp["inputs"]
    bb = p["backbone"]["0"]
    with torch.no_grad():
        vit = backbone.features(bb["encoder"], x["batch1.images"], cfg)
        feats = projector.apply(bb["projector"], vit, cfg)
        cross = projector.apply(bb["cross_attn_projector"], vit, cfg)
        masks = detector._level_masks(x["batch1.mask"], feats)
        q = p["query_feat"]["weight"][:20]
        tr = transformer.apply(p["transformer"], feats, masks, p["refpoint_embed"]["weight"][:20], q, cfg, 1, cross)
        init = keypoints.query_initializer(p["transformer"]["keypoint_query_initializer"], q[None].expand(2, -1, -1))
    ours = {
        "projector": feats[0],
        "cross_attn_projector": cross[0],
        "keypoint_queries_init": init,
        "decoder_hs": tr["hs"],
        "decoder_keypoint_hs": tr["kp_hs"],
        "enc_keypoint_predictions_compact": tr["enc_keypoints"],
    }
    for key, value in ours.items():
        golden = ref[f"batch1.{key}"]
        assert value.shape == golden.shape, key
        assert (value - golden).abs().max() <= FP32_TOL * max(1.0, golden.abs().max().item()), key


def test_keypoint_schema_buffers_match_golden(kp):
    w = load_file(kp["dir"] / "weights.safetensors")
    for key, value in zip((KP_MASK, KP_CLASS_MASK), keypoints.buffers(kp["cfg"])):
        assert value.dtype == torch.bool and torch.equal(value, w[key]), key
    assert keypoints.class_mask((2, 0, 1)).int().tolist() == [
        [0, 0, 0, 0],
        [0, 0, 0, 1],
        [0, 0, 0, 1],
        [0, 1, 1, 0],
    ]


def test_keypoint_param_layout_matches_golden(kp):
    upstream = {k: tuple(v[0]) for k, v in kp["info"]["state_dict_keys"].items() if v[1] != "bool"}
    ours = detector.param_shapes(kp["cfg"])
    assert ours == upstream
    assert list(ours) == list(upstream), "key order differs from upstream's state dict"
    assert sum(math.prod(s) for s in ours.values()) == kp["info"]["derived"]["num_params"]


def test_keypoint_preview_preset_is_upstreams():
    """Its parameter total is checked with the other presets' in test_model_parity."""
    cfg = presets.keypoint_preview()
    assert cfg.model_name == "RFDETRKeypointPreview" and cfg.num_keypoints_per_class == (17,)
    assert (cfg.resolution, cfg.patch_size, cfg.pe_size, cfg.dec_layers, cfg.num_queries) == (576, 12, 48, 4, 100)
    assert cfg.dual_projector and cfg.dual_projector_kp_only and cfg.keypoint_cross_attn


def test_keypoint_init_and_apply_shapes():
    cfg = presets.tiny_keypoint()
    params = detector.init(cfg, seed=1)
    flat = tree.flatten(params)
    assert [(k, tuple(v.shape)) for k, v in flat.items()] == list(detector.param_shapes(cfg).items())
    assert not params["keypoint_embed"]["layers"]["2"]["weight"].any()
    assert params["transformer"]["decoder"]["layers"]["0"]["instance_kp_layer_scale"].item() == pytest.approx(1e-6)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ev = detector.apply(params, x, None, cfg, train=False)
        tr = detector.apply(params, x, None, cfg, train=True)
    slots = len(cfg.num_keypoints_per_class) * max(cfg.num_keypoints_per_class)
    assert ev["pred_keypoints"].shape == (2, cfg.num_queries, slots, 8)
    assert tr["enc_outputs"]["pred_keypoints"].shape == (2, cfg.num_queries * cfg.group_detr, slots, 8)
    assert all(a["pred_keypoints"].shape == ev["pred_keypoints"].shape for a in ev["aux_outputs"])
    # a fresh head puts every keypoint on its reference box centre
    active = keypoints.active_mask(cfg.num_keypoints_per_class).flatten()
    centres = ev["pred_boxes"][:, :, None, :2].expand(-1, -1, int(active.sum()), -1)
    torch.testing.assert_close(ev["pred_keypoints"][:, :, active, :2], centres)
    assert not ev["pred_keypoints"][:, :, ~active].any()
    torch.testing.assert_close(tr["pred_logits"][:, : cfg.num_queries], ev["pred_logits"], rtol=0, atol=1e-5)


def test_keypoint_config_errors():
    with pytest.raises(ValueError, match="needs num_keypoints_per_class"):
        presets.tiny(use_grouppose_keypoints=True)
    with pytest.raises(ValueError, match="num_classes=3"):
        presets.tiny_keypoint(num_keypoints_per_class=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="keypoint_names has 2 names"):
        presets.tiny_keypoint(keypoint_names=("a", "b"))
    with pytest.raises(ValueError, match="inter_instance_kp_attn"):
        presets.tiny_keypoint(inter_instance_kp_attn=True)
    with pytest.raises(ValueError, match="num_decoder_registers > 0 yet: .* no golden fixture"):
        presets.tiny_keypoint(num_decoder_registers=2)


# ---------------------------------------------------------------- checkpoints


def test_keypoint_upstream_checkpoint_loads_with_inferred_schema(kp):
    with pytest.warns(UserWarning, match="vit_num_heads=1 is assumed"):
        cfg, params = load_weights(kp["dir"] / "checkpoint.pth")
    assert cfg.keypoints and cfg.num_keypoints_per_class == (4, 3) and cfg.dual_projector_kp_only
    assert attrs.evolve(cfg, name="nano", vit_num_heads=2, positional_encoding_size=12) == kp["cfg"]
    assert class_names(kp["dir"] / "checkpoint.pth") == ["quad", "tri"]
    golden = tree.flatten(kp["params"])
    ours = tree.flatten(params)
    assert list(ours) == list(detector.param_shapes(cfg)) and all(torch.equal(ours[k], golden[k]) for k in golden)


def test_keypoint_missing_dual_projector_is_cloned_from_projector(kp, tmp_path):
    sd = {k: v for k, v in tree.flatten(kp["params"]).items() if not k.startswith("backbone.0.cross_attn_projector.")}
    path = tmp_path / "no_dual.pth"
    torch.save({"model": {KP_MASK: keypoints.active_mask((4, 3)), **sd}}, path)
    _, params = load_weights(path, kp["cfg"])
    bb = params["backbone"]["0"]
    for key, value in tree.flatten(bb["projector"]).items():
        assert torch.equal(tree.flatten(bb["cross_attn_projector"])[key], value), key


def test_keypoint_saved_pth_has_upstreams_layout(kp, tmp_path):
    """Our .pth holds upstream's exact state-dict keys, order and dtypes (both bool buffers included)."""
    path = tmp_path / "kp.pth"
    flat = tree.flatten(kp["params"])
    params = tree.unflatten({k: flat[k] for k in detector.param_shapes(kp["cfg"])})  # model order
    save_weights(path, params, kp["cfg"], class_names=["quad", "tri"])
    raw = torch.load(path, weights_only=True)
    expected = kp["info"]["state_dict_keys"]
    assert list(raw["model"]) == list(expected)
    assert all(str(v.dtype).removeprefix("torch.") == expected[k][1] for k, v in raw["model"].items())
    for key in ("use_grouppose_keypoints", "dual_projector", "dual_projector_kp_only", "num_keypoints_per_class"):
        assert raw["args"][key] == kp["info"]["checkpoint_args"][key], key
    w = load_file(kp["dir"] / "weights.safetensors")
    assert all(torch.equal(raw["model"][k], w[k]) for k in w)
    cfg, back = load_weights(path)
    assert cfg == kp["cfg"] and tree.shapes(back) == detector.param_shapes(cfg)


def test_keypoint_schema_change_resizes_keypoint_rows(kp):
    cfg = attrs.evolve(kp["cfg"], num_keypoints_per_class=(4, 4))
    _, params = load_weights(kp["dir"] / "checkpoint.pth", cfg)  # strict: every key still fits
    rows = params["transformer"]["decoder"]["keypoint_pos_embed"]
    golden = kp["params"]["transformer"]["decoder"]["keypoint_pos_embed"]
    assert rows.shape == (8, 32) and torch.equal(rows[:7], golden) and torch.equal(rows[7], golden[0])


# ---------------------------------------------------------------- matcher, losses, gradients, step


KP_LAYERS = {"final": "", "aux_0": "_0", "enc": "_enc"}


@pytest.fixture(scope="module")
def kp_train(kp):
    d = kp["dir"]
    flat = load_file(d / "outputs_train.safetensors")

    def layer(prefix: str) -> dict:
        return {k: flat[prefix + k] for k in ("pred_logits", "pred_boxes", "pred_keypoints")}

    outputs = {**layer(""), "aux_outputs": [layer("aux_outputs.0.")], "enc_outputs": layer("enc_outputs.")}
    return {
        "outputs": outputs,
        "layers": {"final": outputs, "aux_0": outputs["aux_outputs"][0], "enc": outputs["enc_outputs"]},
        "targets": golden_targets(d),
        "loss": json.loads((d / "loss.json").read_text()),
        "matcher": json.loads((d / "matcher.json").read_text()),
        "costs": load_file(d / "matcher_costs.safetensors"),
    }


def _costs(layer: dict, targets: dict, tcfg: TrainConfig) -> dict:
    return match_costs(
        layer, targets, MatchCosts.from_loss(LossConfig.resolve(presets.tiny_keypoint(), tcfg), keypoint_schema=(4, 3))
    )


@pytest.mark.parametrize("name", list(KP_LAYERS))
def test_keypoint_matcher_costs_and_indices_equal_golden(kp_train, name):
    tcfg = TrainConfig()
    costs = _costs(kp_train["layers"][name], kp_train["targets"], tcfg)
    for term in ("class", "bbox", "giou", "kp_l1", "kp_findable", "kp_visible", "kp_nll", "total"):
        ref = kp_train["costs"][f"{name}.{term}"]
        for b, cols in ((0, slice(0, 2)), (1, slice(2, 4))):  # golden columns: every target of the batch
            torch.testing.assert_close(costs[term][b, :, :2], ref[b, :, cols], rtol=1e-5, atol=1e-5 * ref.abs().max())
    costs = MatchCosts(
        keypoint_schema=(4, 3), keypoint_coefs=LossConfig.resolve(presets.tiny_keypoint(), tcfg).keypoint_coefs
    )  # upstream's cost weights
    idx = match(kp_train["layers"][name], kp_train["targets"], costs, group_detr=13)
    for b, image in enumerate(kp_train["matcher"]["layers"][name]):
        for g, group in enumerate(image["groups"]):
            got = sorted((int(q), t) for t, q in enumerate(idx[b, g].tolist()) if q >= 0)
            assert [q for q, _ in got] == group["pred"] and [t for _, t in got] == group["tgt"], (b, g)


def test_keypoint_losses_equal_golden(kp, kp_train):
    tcfg = TrainConfig()
    ref = kp_train["loss"]
    assert (
        LossConfig.resolve(kp["cfg"], tcfg).weights == ref["weight_dict"]
    )  # class weight 2: upstream's KeypointTrainConfig
    total, losses = criterion(
        kp_train["outputs"], kp_train["targets"], kp["cfg"], LossConfig.resolve(kp["cfg"], tcfg), train=True
    )
    assert set(losses) == set(ref["loss_dict_unweighted"])
    for key, value in ref["loss_dict_unweighted"].items():
        assert losses[key].item() == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert total.item() == pytest.approx(ref["loss_for_backward"], rel=1e-6)
    assert LossConfig.resolve(presets.tiny(), tcfg).weights["loss_ce"] == 1.0  # detection keeps 1
    assert LossConfig.resolve(kp["cfg"], TrainConfig(cls_loss_coef=3.0)).weights["loss_ce_enc"] == 3.0


def test_keypoint_gradients_equal_golden(kp):
    """Every parameter's gradient within 1e-4 of upstream's, relative to that tensor's max |g|."""
    cfg, x = kp["cfg"], kp["inputs"]
    targets = golden_targets(kp["dir"])

    def loss(p):
        out = detector.apply(p, x["batch1.images"], x["batch1.mask"], cfg, train=True)
        return criterion(out, targets, cfg, LossConfig.resolve(cfg, TrainConfig()), train=True)[0]

    grads = tree.flatten(grad_and_value(lambda p: (loss(p), None))(kp["params"])[0])
    expected = load_file(kp["dir"] / "grads.safetensors")
    assert set(grads) == set(expected)
    for key, ref in expected.items():
        delta = (grads[key] - ref).abs().max().item()
        if key.endswith("attention.key.bias"):  # mathematically zero; upstream stores rounding noise
            assert delta < 1e-9, key
            continue
        assert delta <= 1e-4 * max(ref.abs().max().item(), 1e-12), f"{key}: {delta:.3e}"
    norm = torch.stack([g.norm() for g in grads.values()]).norm().item()
    assert norm == pytest.approx(kp_train_norm(kp), rel=1e-5)


def kp_train_norm(kp) -> float:
    return json.loads((kp["dir"] / "loss.json").read_text())["grad_global_l2_norm"]


@pytest.mark.slow
def test_keypoint_step_accumulation_equals_golden(kp):
    """Two micro-batches (image 0, then image 1) give the one-batch gradient: grad of the summed loss
    numerators over the window's total box count (upstream's manual optimisation), not a mean of means;
    the logged loss is the mean of each micro-batch's own normalised loss, as upstream logs it."""
    cfg, x = kp["cfg"], kp["inputs"]
    targets = golden_targets(kp["dir"])
    batch = {"images": x["batch1.images"], "mask": x["batch1.mask"], **targets}
    halves = [{k: v[i : i + 1] for k, v in batch.items()} for i in (0, 1)]
    tcfg = TrainConfig(clip_max_norm=0.0, use_ema=False, grad_accum_steps=2, batch_size=1)
    step = make_train_step(cfg, tcfg, steps_per_epoch=10)
    _, metrics = step(step.init(kp["params"]), halves)
    accum = json.loads((kp["dir"] / "loss.json").read_text())["gradient_accumulation"]["micro_batches"]
    logged = [m["raw_weighted_numerator"] / m["normalizer"] for m in accum]
    assert metrics["loss"].item() == pytest.approx(sum(logged) / 2, rel=1e-5)
    assert metrics["grad_norm"].item() == pytest.approx(kp_train_norm(kp), rel=1e-5)


def _kp_batch(labels: list[list[int]], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, slots = len(labels), 8
    lab = torch.full((n, slots), -1, dtype=torch.int64)
    boxes = torch.zeros(n, slots, 4)
    kps = torch.zeros(n, slots, 4, 3)
    for i, row in enumerate(labels):
        lab[i, : len(row)] = torch.tensor(row)
        boxes[i, : len(row)] = torch.cat(
            [0.3 + 0.4 * torch.rand(len(row), 2, generator=g), 0.2 + 0.2 * torch.rand(len(row), 2, generator=g)], 1
        )
        kps[i, : len(row), :, :2] = torch.rand(len(row), 4, 2, generator=g)
        kps[i, : len(row), :, 2] = torch.randint(0, 3, (len(row), 4), generator=g).float()
    images = torch.randn(n, 3, 64, 64, generator=g)
    return {
        "images": images,
        "mask": torch.zeros(n, 64, 64, dtype=torch.bool),
        "labels": lab,
        "boxes": boxes,
        "keypoints": kps,
    }


def test_keypoint_step_normalises_over_the_whole_accumulation_window():
    """Micro-batches with 3 and 1 targets: the step's gradient is the one-batch gradient (summed loss
    numerators over the window's 4 x G boxes, upstream's manual optimisation), not the mean of the two
    micro-batch means; each micro-batch logs its own normalised loss, as upstream does."""
    cfg = presets.tiny_keypoint(
        resolution=64, group_detr=2, vit_num_layers=1, out_feature_indexes=(1,), hidden_dim=32, dim_feedforward=64
    )
    params = detector.init(cfg, seed=0)
    tcfg = TrainConfig(clip_max_norm=0.0, use_ema=False, batch_size=1)
    whole = _kp_batch([[0, 2, 1], [1]])
    halves = [{k: v[i : i + 1] for k, v in whole.items()} for i in (0, 1)]
    step = make_train_step(cfg, tcfg, steps_per_epoch=10)
    torch.manual_seed(0)
    _, one = step(step.init(params), [whole])
    _, two = step(step.init(params), halves)
    assert two["grad_norm"].item() == pytest.approx(one["grad_norm"].item(), rel=1e-5)
    logged = []
    for half in halves:  # each micro-batch's own loss: its numerators over its own box count
        out = detector.apply(params, half["images"], half["mask"], cfg, train=True)
        targets = {k: half[k] for k in ("labels", "boxes", "keypoints")}
        logged.append(criterion(out, targets, cfg, LossConfig.resolve(cfg, tcfg), train=True)[0].item())
    assert two["loss"].item() == pytest.approx(sum(logged) / 2, rel=1e-5)
    assert abs(two["loss"].item() - one["loss"].item()) > 1e-3  # they differ: 3 vs 1 boxes


# ---------------------------------------------------------------- postprocess


def test_keypoint_postprocess_equals_golden(kp):
    """From golden eval outputs (exact ranking) and from ours end to end; NaN positions included."""
    ref = load_file(kp["dir"] / "postprocess.safetensors")
    eval_ref = load_file(kp["dir"] / "outputs_eval.safetensors")
    golden_out = {k[len("batch1.") :]: v for k, v in eval_ref.items() if k.startswith("batch1.") and k.count(".") == 1}
    sizes = kp["inputs"]["batch1.target_sizes"]
    for label, out in (("golden", golden_out), ("ours", _eval(kp, "batch1"))):
        results = postprocess.postprocess(out, sizes, 20, keypoint_schema=(4, 3), trace_alpha=0.2)
        for i, res in enumerate(results):
            assert torch.equal(res["labels"], ref[f"{i}.labels"]), (label, i)
            for key, tol in (
                ("scores", 1e-6),
                ("boxes", 1e-3),
                ("keypoints", 1e-3),
                ("keypoint_precision_cholesky", 1e-5),
            ):
                torch.testing.assert_close(
                    res[key], ref[f"{i}.{key}"], rtol=0, atol=tol, equal_nan=True, msg=f"{label} {i} {key}"
                )
        plain = postprocess.postprocess(out, sizes, 20, keypoint_schema=(4, 3), trace_alpha=0.0)
        torch.testing.assert_close(plain[0]["scores"], ref["0.scores_before_keypoint_fusion"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- predict


def test_keypoint_predict_json_and_skeleton_drawing(tmp_path):
    """rf.predict returns keypoints; predictions.json lists [x, y, score] per keypoint of the label; the
    drawing marks the keypoints (white dots) on the image."""
    import rfdetr_fn as rf
    from rfdetr_fn.predict_cli import main

    cfg = presets.tiny_keypoint(resolution=64, group_detr=1, vit_num_layers=1, out_feature_indexes=(1,))
    params = detector.init(cfg, seed=0)
    params["keypoint_embed"]["layers"]["2"]["bias"][2] = 5.0  # every keypoint confidently findable
    weights = tmp_path / "kp.pth"
    save_weights(weights, params, cfg, class_names=["rect", "ellipse", "tri"])
    image = np.full((48, 64, 3), 90, np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    (det,) = rf.predict(params, cfg, [image], threshold=0.0)
    assert det["keypoints"].shape == (cfg.num_select, 4, 3)
    records = main(["--checkpoint", str(weights), "--images", str(tmp_path / "a.png"), "--output-dir",
                    str(tmp_path / "out"), "--threshold", "0.0"])  # fmt: skip
    for d in records[0]["detections"]:
        points = d["keypoints"]
        assert len(points) == cfg.num_keypoints_per_class[d["label"]] if d["label"] < 3 else points == []
        assert all(s >= 0.99 for _, _, s in points)  # sigmoid(findable logit 5), rounded to 2 places
    drawn = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert (drawn == 255).all(-1).any(), "keypoint dots are drawn"


def test_drawing_a_box_with_negative_height_draws_its_extent():
    """An untrained model predicted y2 < y1 (seen in test_cli_fit_validate_test_predict_short); Pillow
    refused such a rectangle and predict crashed."""
    from rfdetr_fn.eval.drawing import class_colour, draw_detections

    det = {"boxes": torch.tensor([[10.0, 30.0, 40.0, 20.0]]), "labels": torch.tensor([0]), "scores": torch.ones(1)}
    drawn = np.asarray(draw_detections(np.zeros((50, 50, 3), np.uint8), det, ["a"]))
    assert drawn[25, 10].tolist() == list(class_colour(0))  # the left side, between y 20 and 30


def test_keypoint_skeleton_edges_are_drawn_and_nothing_else():
    """Only the skeleton's edges are drawn: class 1 of schema (4, 3) with skeleton [4, 6] (flat indices:
    its keypoints 0 and 2) joins (20, 20)-(60, 20) but not (20, 20)-(20, 60); a keypoint below
    KEYPOINT_MIN_SCORE is neither dotted nor joined. Weights files keep the skeleton in the config."""
    from rfdetr_fn.eval.drawing import class_colour, draw_detections
    from rfdetr_fn.io.formats import config_from_dict, config_to_dict

    image = np.zeros((100, 100, 3), np.uint8)
    points = torch.tensor([[[20.0, 20.0, 0.9], [20.0, 60.0, 0.9], [60.0, 20.0, 0.9], [0.0, 0.0, 0.0]]])
    det = {"boxes": torch.tensor([[90.0, 90.0, 99.0, 99.0]]), "labels": torch.tensor([1]), "keypoints": points}
    drawn = np.asarray(draw_detections(image, det, ["a", "b"], schema=(4, 3), skeleton=(0, 1, 4, 6)))
    colour = list(class_colour(1))
    assert drawn[20, 40].tolist() == colour  # on the edge 0-2
    assert drawn[40, 20].tolist() == [0, 0, 0]  # 0-1 is class 0's edge, not class 1's
    assert drawn[60, 20].tolist() == [255, 255, 255]  # the dot on keypoint 1
    faint = {**det, "keypoints": points * torch.tensor([1.0, 1.0, 0.0])[None, None].expand(1, 4, 3).clone()}
    faint["keypoints"][0, 0, 2] = 0.9
    drawn = np.asarray(draw_detections(image, faint, ["a", "b"], schema=(4, 3), skeleton=(4, 6)))
    assert drawn[20, 40].tolist() == [0, 0, 0] and drawn[20, 60].tolist() == [0, 0, 0]
    cfg = presets.tiny_keypoint(num_classes=2, num_keypoints_per_class=(4, 3), keypoint_skeleton=(0, 1, 4, 6))
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="different classes"):
        attrs.evolve(cfg, keypoint_skeleton=(0, 4))
    with pytest.raises(ValueError, match=r"0\.\.6"):
        attrs.evolve(cfg, keypoint_skeleton=(0, 7))


@pytest.mark.slow
def test_keypoint_model_and_loss_trace_fullgraph():
    """Keypoint forward + matcher + losses: one graph (backend="eager" checks tracing without codegen)."""
    torch._dynamo.reset()
    cfg = presets.tiny_keypoint(resolution=64, group_detr=2, vit_num_layers=1, out_feature_indexes=(1,))
    params = detector.init(cfg, seed=0)
    batch = _kp_batch([[0, 2, 1], [1]])
    targets = {k: batch[k] for k in ("labels", "boxes", "keypoints")}
    tcfg = TrainConfig()

    def loss(p, images):
        out = detector.apply(p, images, None, cfg, train=True)
        return criterion(out, targets, cfg, LossConfig.resolve(cfg, tcfg), train=True)[0]

    fn = torch.compile(loss, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(fn(params, batch["images"]), loss(params, batch["images"]))


@pytest.mark.slow
def test_keypoint_train_step_compiles_and_equals_eager():
    """The keypoint step through compile_step (regional; aot_eager traces the graphs inductor would
    compile): no graph break, no recompile on the second step, losses and the new state equal eager."""
    from tests.test_compile import assert_compiled_step_equals_eager

    cfg = presets.tiny_keypoint(
        resolution=64, group_detr=2, vit_num_layers=1, out_feature_indexes=(1,), hidden_dim=32, dim_feedforward=64
    )
    tcfg = TrainConfig(batch_size=2, multi_scale="off")
    step = make_train_step(cfg, tcfg, steps_per_epoch=10)

    def fresh():
        return step.init(detector.init(cfg, seed=0))

    assert_compiled_step_equals_eager(step, fresh, _kp_batch([[0, 2, 1], [1]]), steps=2)


@pytest.mark.slow
def test_keypoint_fit_validate_on_synthetic_corners(tmp_path):
    """fit with a keypoint preset runs out of the box on the synthetic shapes: the schema follows the
    data, val/kp_* are logged, and the best checkpoint validates with keypoint AP."""
    from rfdetr_fn import cli

    out = tmp_path / "run"
    data = ["--data.synthetic-images", "8", "--data.synthetic-size", "64", "--data.num-workers", "0"]
    cli.main(["fit", "--preset", "tiny_keypoint", "--model.resolution", "64", *data, "--train.batch-size", "2",
              "--train.epochs", "1", "--train.multi-scale", "off", "--train.no-progress-bar",
              "--train.best-model-metric", "kp_map", "--train.output-dir", str(out)])  # fmt: skip
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "val/kp_mAP_50_95" in header and "val/kp_mAR" in header  # EMA scored alone: the primary names
    cfg, _ = load_weights(out / "checkpoint_best_total.pth")
    assert cfg.keypoints and cfg.num_keypoints_per_class == (4, 4, 3)
    assert cfg.keypoint_names[:4] == ("top_left", "top_right", "bottom_right", "bottom_left")
    val = cli.main(["validate", "--checkpoint", str(out), *data])
    assert 0.0 <= val["val/kp_mAP_50_95"] <= 1.0
