"""Upstream options that change the model or the loop: decoder registers, and the other ported switches."""

from __future__ import annotations

import attrs
import pytest
import torch

from rfdetr_fn import presets, tree
from rfdetr_fn.model import detector, transformer


def _tiny(**changes):
    return attrs.evolve(presets.tiny(num_classes=3, resolution=64), **changes)


def test_decoder_registers_join_every_group_and_leave_the_outputs():
    cfg = _tiny(num_decoder_registers=2, group_detr=2)
    params = detector.init(cfg, 0)
    flat = tree.flatten(params)
    transformer_keys = [k for k in flat if k.startswith("transformer.")]
    assert transformer_keys[:2] == ["transformer.register_tokens", "transformer.register_ref_points"]
    assert flat["transformer.register_tokens"].shape == (2, cfg.hidden_dim) and list(flat) == list(
        detector.param_shapes(cfg)
    )
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    train = detector.apply(params, images, None, cfg, train=True)
    evaluation = detector.apply(params, images, None, cfg, train=False)
    q = cfg.num_queries
    assert train["pred_logits"].shape[1] == q * cfg.group_detr and evaluation["pred_logits"].shape[1] == q
    # groups stay apart with registers in each: changing group 1's queries leaves group 0's outputs alone
    feat = flat["query_feat.weight"].clone()
    feat[q : 2 * q] += 1.0
    shifted = detector.apply(tree.unflatten(dict(flat, **{"query_feat.weight": feat})), images, None, cfg, train=True)
    torch.testing.assert_close(shifted["pred_logits"][:, :q], train["pred_logits"][:, :q])
    assert not torch.allclose(shifted["pred_logits"][:, q : 2 * q], train["pred_logits"][:, q : 2 * q])
    # the registers take part in self-attention: other register values change the queries' outputs
    moved = dict(flat, **{"transformer.register_tokens": flat["transformer.register_tokens"] + 1.0})
    other = detector.apply(tree.unflatten(moved), images, None, cfg, train=False)
    assert not torch.allclose(other["pred_logits"], evaluation["pred_logits"])
    x = torch.randn(2, 3 * 5, 4)
    assert torch.equal(transformer.drop_registers(transformer.with_registers(x, torch.ones(2, 4), 3)[None], 3, 2)[0], x)
    # and with no registers the model is unchanged in structure
    assert "transformer.register_tokens" not in tree.flatten(detector.init(_tiny(), 0))


def test_eval_precision_and_test_loss():

    from rfdetr_fn.config import DataConfig, EvalConfig, TrainConfig
    from rfdetr_fn.eval.loop import run_split
    from rfdetr_fn.model.precision import forward, resolve_precision

    cfg = _tiny()
    params = detector.init(cfg, 0)
    images = torch.randn(1, 3, 64, 64)
    plain = detector.apply(params, images, None, cfg, train=False)
    same = forward(params, images, None, cfg, resolve_precision("auto", torch.device("cpu")), train=False)
    fp32 = forward(params, images, None, cfg, resolve_precision("fp32", torch.device("cpu")), train=False)
    assert torch.equal(plain["pred_logits"], fp32["pred_logits"])
    if resolve_precision("auto", torch.device("cpu")) == "fp32":  # a CPU without bf16 matrix units
        assert torch.equal(plain["pred_logits"], same["pred_logits"])
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision(EvalConfig(precision="fp16").precision, torch.device("cpu"))
    dcfg = DataConfig(synthetic_images=4, synthetic_size=64, num_workers=0)
    with_loss = run_split(params, cfg, dcfg, EvalConfig(), TrainConfig(batch_size=2), "test")
    assert with_loss["test/loss"] > 0 and "test/mAP_50_95" in with_loss
    without = run_split(params, cfg, dcfg, EvalConfig(), TrainConfig(batch_size=2, compute_test_loss=False), "test")
    assert "test/loss" not in without and without["test/mAP_50_95"] == with_loss["test/mAP_50_95"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 evaluation autocast needs CUDA")
def test_bf16_evaluation_on_cuda_is_close_to_fp32():
    cfg = _tiny()
    params = tree.to(detector.init(cfg, 0), torch.device("cuda"))
    images = torch.randn(2, 3, 64, 64, device="cuda")
    from rfdetr_fn.step import forward

    fp32 = forward(params, images, None, cfg, "fp32", train=False)
    bf16 = forward(params, images, None, cfg, "bf16", train=False)
    assert bf16["pred_logits"].dtype == torch.float32
    torch.testing.assert_close(bf16["pred_boxes"], fp32["pred_boxes"], atol=0.05, rtol=0.05)


def test_other_channel_counts_are_refused_by_the_dataset_readers():
    from rfdetr_fn.config import DataConfig, TrainConfig
    from rfdetr_fn.data import DatasetError, build_dataset

    with pytest.raises(DatasetError, match="num_channels=1"):
        build_dataset(DataConfig(), "train", _tiny(num_channels=1), TrainConfig(), train=True)


def test_patch_embedding_adapts_to_other_channel_counts_on_load(tmp_path):
    """Upstream's rule: 1 channel = mean kernel; more = tiled and scaled by 3/C, so C/3 copies of an RGB
    image give the same embedding as the image itself."""
    from rfdetr_fn.io import adapt, weights

    cfg = _tiny()
    params = detector.init(cfg, 0)
    path = tmp_path / "rgb.pth"
    weights.save_weights(path, params, cfg)
    kernel = tree.flatten(params)[adapt.PATCH_KEY]
    gray_cfg, gray = weights.load_weights(path, _tiny(num_channels=1))
    assert gray_cfg.num_channels == 1
    torch.testing.assert_close(tree.flatten(gray)[adapt.PATCH_KEY], kernel.mean(1, keepdim=True))
    _, six = weights.load_weights(path, _tiny(num_channels=6))
    rgb = torch.randn(1, 3, 16, 16)
    six_kernel = tree.flatten(six)[adapt.PATCH_KEY]
    embed = torch.nn.functional.conv2d(rgb, kernel, stride=16)
    torch.testing.assert_close(torch.nn.functional.conv2d(torch.cat([rgb, rgb], 1), six_kernel, stride=16), embed)
    assert adapt.adapt_input_channels(kernel, 4)[:, 3].equal(kernel[:, 0] * 0.75)
    out = detector.apply(six, torch.randn(1, 6, 64, 64), None, _tiny(num_channels=6), train=False)
    assert out["pred_logits"].shape[0] == 1


def test_decoder_registers_survive_a_weights_file(tmp_path):
    from rfdetr_fn.io import adapt, weights

    cfg = _tiny(num_decoder_registers=3, group_detr=2)
    params = detector.init(cfg, 0)
    weights.save_weights(tmp_path / "r.pth", params, cfg)
    loaded_cfg, loaded = weights.load_weights(tmp_path / "r.pth")
    assert loaded_cfg.num_decoder_registers == 3
    assert torch.equal(
        tree.flatten(loaded)["transformer.register_tokens"], tree.flatten(params)["transformer.register_tokens"]
    )
    with pytest.warns(UserWarning, match="not a stock DINOv2 width"):  # the tiny test model's ViT
        fields = adapt._fields_from_shapes(tree.flatten(params))
    assert fields["num_decoder_registers"] == 3  # read from the tensors, as for upstream files
