"""Matcher and criterion: golden parity (costs, indices, every loss term), gradients against a loop-based
reference written here, padding invariance, one-graph tracing, and the mask losses."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy.optimize import linear_sum_assignment

from rfdetr_fn import rng
from rfdetr_fn.config import ModelConfig, TrainConfig
from rfdetr_fn.losses import matcher as matcher_lib
from rfdetr_fn.losses.assignment import hungarian, sanitize_cost
from rfdetr_fn.losses.config import LossConfig, cls_loss_coef
from rfdetr_fn.losses.criterion import criterion, mask_losses, uncertain_points
from rfdetr_fn.losses.matcher import MatchCosts, match, match_costs
from rfdetr_fn.model import boxes as box_ops

TINY_DET = ModelConfig(
    name="tiny_det",
    vit_hidden_size=64,
    vit_num_layers=4,
    vit_num_heads=2,
    out_feature_indexes=(1, 2, 3, 4),
    hidden_dim=128,
    sa_nheads=4,
    ca_nheads=8,
    dim_feedforward=256,
    dec_layers=2,
    num_queries=30,
    num_select=30,
    group_detr=13,
    resolution=192,
    positional_encoding_size=10,
    num_classes=5,
)
TCFG = TrainConfig()
LCFG = LossConfig.resolve(TINY_DET, TCFG)
LAYERS = {"final": "", "aux_0": "_0", "enc": "_enc"}
ALPHA = 0.25


# ----------------------------------------------------------------------------------------------- helpers
def nest(flat: dict) -> dict:
    """Golden flat keys -> upstream's outputs dict."""

    def layer(prefix: str) -> dict:
        return {"pred_logits": flat[prefix + "pred_logits"], "pred_boxes": flat[prefix + "pred_boxes"]}

    return {**layer(""), "aux_outputs": [layer("aux_outputs.0.")], "enc_outputs": layer("enc_outputs.")}


def layer_of(outputs: dict, name: str) -> dict:
    return {"final": outputs, "aux_0": outputs["aux_outputs"][0], "enc": outputs["enc_outputs"]}[name]


def pad(target_list: list[dict], slots: int | None = None, positions: list[list[int]] | None = None) -> dict:
    """Per-image targets -> our padded batch; `positions` scatters image i's targets to those slots."""
    slots = slots or max(1, max(len(t["labels"]) for t in target_list))
    labels = torch.full((len(target_list), slots), -1, dtype=torch.int64)
    boxes = torch.zeros(len(target_list), slots, 4)
    for i, t in enumerate(target_list):
        where = positions[i] if positions else list(range(len(t["labels"])))
        labels[i, where] = t["labels"]
        boxes[i, where] = t["boxes"]
    return {"labels": labels, "boxes": boxes}


def leaves(outputs: dict) -> list[torch.Tensor]:
    return [
        t for name in LAYERS for t in (layer_of(outputs, name)["pred_logits"], layer_of(outputs, name)["pred_boxes"])
    ]


def with_grad(outputs: dict) -> dict:
    out = {k: v.clone().requires_grad_() for k, v in outputs.items() if torch.is_tensor(v)}
    out["aux_outputs"] = [{k: v.clone().requires_grad_() for k, v in a.items()} for a in outputs["aux_outputs"]]
    out["enc_outputs"] = {k: v.clone().requires_grad_() for k, v in outputs["enc_outputs"].items()}
    return out


@pytest.fixture(scope="module")
def golden(golden_dir):
    d = golden_dir / "tiny_det"
    raw = load_file(str(d / "targets.safetensors"))
    target_list = [{"labels": raw[f"{i}.labels"], "boxes": raw[f"{i}.boxes"]} for i in range(2)]
    return {
        "outputs": nest(load_file(str(d / "outputs_train.safetensors"))),
        "targets": target_list,
        "loss": json.loads((d / "loss.json").read_text()),
        "matcher": json.loads((d / "matcher.json").read_text()),
        "costs": load_file(str(d / "matcher_costs.safetensors")),
        "config": json.loads((d / "config.json").read_text())["loss_and_matcher"],
    }


def cost_kwargs(**changes) -> MatchCosts:
    return MatchCosts.from_loss(LCFG)._replace(**changes)


# ---------------------------------------------- independent loop-based reference (upstream semantics)
def _xyxy(b):
    return (b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2)


def _iou_giou(a, b):
    """IoU and GIoU of two xyxy boxes given as 4-sequences (floats or 0-dim tensors)."""
    iw = (
        max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        if not torch.is_tensor(a[0])
        else (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    )
    ih = (
        max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        if not torch.is_tensor(a[0])
        else (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    )
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hw = (
        (max(a[2], b[2]) - min(a[0], b[0]))
        if not torch.is_tensor(a[0])
        else torch.maximum(a[2], b[2]) - torch.minimum(a[0], b[0])
    )
    hh = (
        (max(a[3], b[3]) - min(a[1], b[1]))
        if not torch.is_tensor(a[0])
        else torch.maximum(a[3], b[3]) - torch.minimum(a[1], b[1])
    )
    return inter / union, inter / union - (hw * hh - union) / (hw * hh)


def ref_match(layer: dict, target_list: list[dict], groups: int) -> list[tuple[list[int], list[int]]]:
    """Per image, per group: a cost matrix filled entry by entry, solved by scipy."""
    logits, boxes = layer["pred_logits"].detach().double(), layer["pred_boxes"].detach().double()
    per_group = logits.shape[1] // groups
    result = []
    for b, tgt in enumerate(target_list):
        qs, ts = [], []
        n = len(tgt["labels"])
        for g in range(groups):
            if n == 0:
                continue
            cost = [[0.0] * n for _ in range(per_group)]
            for i in range(per_group):
                q = g * per_group + i
                pb = _xyxy(boxes[b, q].tolist())
                for j in range(n):
                    x = float(logits[b, q, int(tgt["labels"][j])])
                    p = 1 / (1 + math.exp(-x))
                    cls = ALPHA * (1 - p) ** 2 * -math.log(p) - (1 - ALPHA) * p**2 * -math.log(1 - p)
                    l1 = sum(abs(u - v) for u, v in zip(boxes[b, q].tolist(), tgt["boxes"][j].tolist()))
                    giou = _iou_giou(pb, _xyxy(tgt["boxes"][j].tolist()))[1]
                    cost[i][j] = 5 * l1 + 2 * cls - 2 * giou
            rows, cols = linear_sum_assignment(cost)
            qs += [int(r) + g * per_group for r in rows]
            ts += [int(c) for c in cols]
        result.append((qs, ts))
    return result


def ref_layer_losses(layer: dict, target_list: list[dict], pairs, num_boxes: float) -> dict[str, torch.Tensor]:
    """Upstream's loss_labels / loss_boxes written pair by pair with in-place weight writes."""
    logits, boxes = layer["pred_logits"], layer["pred_boxes"]
    prob = logits.sigmoid()
    pos_w = torch.zeros_like(logits)
    neg_w = prob**2  # keeps its gradient
    l1 = giou_loss = logits.new_zeros(())
    for b, (qs, ts) in enumerate(pairs):
        for q, j in zip(qs, ts):
            tb, c, src = target_list[b]["boxes"][j], int(target_list[b]["labels"][j]), boxes[b, q]
            iou, _ = _iou_giou(_xyxy(src.detach()), _xyxy(tb))
            t = (prob[b, q, c].detach() ** ALPHA * iou ** (1 - ALPHA)).clamp(min=0.01)
            pos_w[b, q, c] = t
            neg_w[b, q, c] = 1 - t
            l1 = l1 + (src - tb).abs().sum()
            giou_loss = giou_loss + 1 - _iou_giou(_xyxy(src), _xyxy(tb))[1]
    ce = (-pos_w * torch.log(prob) - neg_w * torch.log1p(-prob)).sum() / num_boxes
    return {"loss_ce": ce, "loss_bbox": l1 / num_boxes, "loss_giou": giou_loss / num_boxes}


def ref_total(outputs: dict, target_list: list[dict], groups: int, pairs_by_layer=None):
    num_boxes = max(1.0, float(sum(len(t["labels"]) for t in target_list) * groups))
    losses = {}
    for name, suffix in LAYERS.items():
        layer = layer_of(outputs, name)
        pairs = pairs_by_layer[name] if pairs_by_layer else ref_match(layer, target_list, groups)
        for k, v in ref_layer_losses(layer, target_list, pairs, num_boxes).items():
            losses[k + suffix] = v
    weights = LCFG.weights
    return sum(losses[k] * weights[k] for k in losses), losses


def golden_pairs(golden) -> dict:
    return {name: [(img["pred_idx"], img["tgt_idx"]) for img in golden["matcher"]["layers"][name]] for name in LAYERS}


def pairs_from_idx(idx: torch.Tensor, slot_to_target: list[dict[int, int]] | None = None):
    """(B, G, T) indices -> per image (queries, target numbers), like upstream's concatenation over groups."""
    out = []
    for b in range(idx.shape[0]):
        qs, ts = [], []
        for g in range(idx.shape[1]):
            got = sorted((int(q), s) for s, q in enumerate(idx[b, g].tolist()) if q >= 0)
            qs += [q for q, _ in got]
            ts += [slot_to_target[b][s] if slot_to_target else s for _, s in got]
        out.append((qs, ts))
    return out


# ------------------------------------------------------------------------------------------------- boxes
def test_box_conversions_and_iou_values():
    a = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(box_ops.cxcywh_to_xyxy(a), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    x = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    y = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0]])
    iou, _ = box_ops.pairwise_iou(x, y)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 0.0], [1.0, 0.0]]))
    giou = box_ops.pairwise_giou(x, y)
    assert giou[0, 0].item() == pytest.approx(1 / 7 - (9 - 7) / 9)
    assert giou[1, 1].item() == pytest.approx(0 - (12 - 5) / 12)
    torch.testing.assert_close(box_ops.elementwise_giou(x, y), torch.diagonal(giou))
    torch.testing.assert_close(box_ops.elementwise_iou(x, y)[0], torch.diagonal(iou))
    batched = box_ops.pairwise_giou(x[None].expand(3, -1, -1), y[None].expand(3, -1, -1))
    torch.testing.assert_close(batched, giou[None].expand(3, -1, -1))


# ------------------------------------------------------------------------------------------- golden parity
def test_config_matches_golden_loss_settings(golden):
    c = golden["config"]
    assert (c["focal_alpha"], c["set_cost_class"], c["set_cost_bbox"], c["set_cost_giou"]) == (
        TCFG.focal_alpha,
        TCFG.set_cost_class,
        TCFG.set_cost_bbox,
        TCFG.set_cost_giou,
    )
    assert (c["cls_loss_coef"], c["bbox_loss_coef"], c["giou_loss_coef"]) == (
        cls_loss_coef(TINY_DET, TCFG),
        TCFG.bbox_loss_coef,
        TCFG.giou_loss_coef,
    )
    assert LCFG.weights == golden["loss"]["weight_dict"]


@pytest.mark.parametrize("name", list(LAYERS))
def test_matcher_costs_equal_golden(golden, name):
    costs = match_costs(layer_of(golden["outputs"], name), pad(golden["targets"]), cost_kwargs())
    start = 0
    for b, t in enumerate(golden["targets"]):
        n = len(t["labels"])
        for term in ("class", "bbox", "giou", "total"):
            ref = golden["costs"][f"{name}.{term}"][b, :, start : start + n]
            torch.testing.assert_close(costs[term][b, :, :n], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        start += n


@pytest.mark.parametrize("name", list(LAYERS))
def test_matcher_indices_equal_golden_every_group(golden, name):
    idx = match(layer_of(golden["outputs"], name), pad(golden["targets"]), cost_kwargs(), group_detr=13)
    assert idx.shape == (2, 13, 3) and idx.dtype == torch.int64
    for b, image in enumerate(golden["matcher"]["layers"][name]):
        for g, group in enumerate(image["groups"]):
            got = sorted((int(q), t) for t, q in enumerate(idx[b, g].tolist()) if q >= 0)
            assert [q for q, _ in got] == group["pred"] and [t for _, t in got] == group["tgt"], (b, g)
        assert pairs_from_idx(idx)[b] == (image["pred_idx"], image["tgt_idx"])


def test_losses_equal_golden(golden):
    total, losses = criterion(golden["outputs"], pad(golden["targets"]), TINY_DET, LCFG, train=True)
    ref = golden["loss"]
    assert set(losses) == set(ref["loss_dict_unweighted"])
    for key, value in ref["loss_dict_unweighted"].items():
        assert losses[key].item() == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert total.item() == pytest.approx(ref["weighted_total"], rel=1e-5)
    # the normaliser: (3 + 2) x 13 = 65; halving it doubles every loss term
    assert ref["num_boxes"] == 65.0
    total_half, losses_half = criterion(
        golden["outputs"],
        pad(golden["targets"]),
        TINY_DET,
        LCFG,
        train=True,
        num_boxes=torch.tensor(32.5),
    )
    assert total_half.item() == pytest.approx(2 * ref["weighted_total"], rel=1e-5)
    assert losses_half["loss_giou_0"].item() == pytest.approx(2 * losses["loss_giou_0"].item(), rel=1e-6)


def test_gradients_match_loop_reference(golden):
    ours = with_grad(golden["outputs"])
    total, _ = criterion(ours, pad(golden["targets"]), TINY_DET, LCFG, train=True)
    grads = torch.autograd.grad(total, leaves(ours))
    ref = with_grad(golden["outputs"])
    ref_value, ref_losses = ref_total(ref, golden["targets"], 13, golden_pairs(golden))
    ref_grads = torch.autograd.grad(ref_value, leaves(ref))
    assert total.item() == pytest.approx(ref_value.item(), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * r.abs().max().item())
    # Pin the detach semantics on an unmatched query (query 1 of image 0, final layer): its loss is
    # -p^2 log(1 - p) / 65, whose gradient has the extra -2p^2(1-p)log(1-p) term only if p^2 is NOT detached.
    p = golden["outputs"]["pred_logits"][0, 1].sigmoid()
    full = (p**3 - 2 * p**2 * (1 - p) * torch.log1p(-p)) / 65
    torch.testing.assert_close(grads[0][0, 1], full, rtol=1e-4, atol=1e-9)
    assert not torch.allclose(grads[0][0, 1], p**3 / 65, rtol=1e-2)


def test_grad_and_value_over_outputs(golden):
    targets = pad(golden["targets"])
    flat = leaves(golden["outputs"])

    def loss_of(tensors):
        out = {
            "pred_logits": tensors[0],
            "pred_boxes": tensors[1],
            "aux_outputs": [{"pred_logits": tensors[2], "pred_boxes": tensors[3]}],
            "enc_outputs": {"pred_logits": tensors[4], "pred_boxes": tensors[5]},
        }
        return criterion(out, targets, TINY_DET, LCFG, train=True)[0]

    grads, value = torch.func.grad_and_value(loss_of)(flat)
    eager = with_grad(golden["outputs"])
    expected = torch.autograd.grad(loss_of(leaves(eager)), leaves(eager))
    assert value.item() == pytest.approx(golden["loss"]["weighted_total"], rel=1e-5)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_criterion_traces_as_one_graph(golden):
    targets = pad(golden["targets"], slots=6)

    def fn(outputs, targets):
        return criterion(outputs, targets, TINY_DET, LCFG, train=True)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(golden["outputs"], targets)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow
def test_criterion_compiles_fullgraph_under_grad(golden):
    """The train step's pattern: compile(grad_and_value(loss), fullgraph=True); also a new padded T works."""
    flat = leaves(golden["outputs"])

    def loss_of(tensors, targets):
        out = {
            "pred_logits": tensors[0],
            "pred_boxes": tensors[1],
            "aux_outputs": [{"pred_logits": tensors[2], "pred_boxes": tensors[3]}],
            "enc_outputs": {"pred_logits": tensors[4], "pred_boxes": tensors[5]},
        }
        return criterion(out, targets, TINY_DET, LCFG, train=True)[0]

    torch._dynamo.reset()
    compiled = torch.compile(torch.func.grad_and_value(loss_of), backend="aot_eager", fullgraph=True)
    grads, value = compiled(flat, pad(golden["targets"], slots=6))
    assert value.item() == pytest.approx(golden["loss"]["weighted_total"], rel=1e-5)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    for target_list in (golden["targets"], [golden["targets"][0], empty]):  # new target counts, same T
        grads, value = compiled(flat, pad(target_list, slots=6))
        eager_grads, eager_value = torch.func.grad_and_value(loss_of)(flat, pad(target_list, slots=6))
        assert value.item() == pytest.approx(eager_value.item(), rel=1e-6)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------- padding
def test_padding_slots_anywhere_give_the_same_loss(golden):
    base_total, base = criterion(golden["outputs"], pad(golden["targets"]), TINY_DET, LCFG, train=True)
    positions = [[5, 1, 3], [0, 6]]  # targets scattered among padding, T = 7
    targets = pad(golden["targets"], slots=7, positions=positions)
    total, losses = criterion(golden["outputs"], targets, TINY_DET, LCFG, train=True)
    assert total.item() == pytest.approx(base_total.item(), rel=1e-6)
    for key, value in base.items():
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-6), key
    idx = match(golden["outputs"], targets, cost_kwargs(), group_detr=13)
    slot_to_target = [{s: j for j, s in enumerate(p)} for p in positions]
    for b, image in enumerate(golden["matcher"]["layers"]["final"]):
        qs, ts = pairs_from_idx(idx, slot_to_target)[b]
        assert sorted(zip(qs, ts)) == sorted(zip(image["pred_idx"], image["tgt_idx"]))
    assert (idx[0, :, [0, 2, 4, 6]] == -1).all() and (idx[1, :, 1:6] == -1).all()


def test_image_without_targets_matches_reference(golden):
    target_list = [
        golden["targets"][0],
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    ours = with_grad(golden["outputs"])
    total, losses = criterion(ours, pad(target_list, slots=5), TINY_DET, LCFG, train=True)
    grads = torch.autograd.grad(total, leaves(ours))
    ref = with_grad(golden["outputs"])
    ref_value, ref_losses = ref_total(ref, target_list, 13)
    ref_grads = torch.autograd.grad(ref_value, leaves(ref))
    for key, value in ref_losses.items():
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5), key
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * r.abs().max().item())
    assert losses["cardinality_error"].item() == pytest.approx(1.5)  # |0 - 3| and |0 - 0| averaged


def test_batch_without_any_target_is_finite_and_connected(golden):
    empty = {"labels": torch.full((2, 4), -1, dtype=torch.int64), "boxes": torch.zeros(2, 4, 4)}
    ours = with_grad(golden["outputs"])
    total, losses = criterion(ours, empty, TINY_DET, LCFG, train=True)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou_enc"].item() == 0.0
    assert losses["class_error"].item() == 100.0
    grads = torch.autograd.grad(total, leaves(ours))
    assert all(torch.isfinite(g).all() for g in grads)
    # num_boxes clamps to 1: the classification loss is the plain p^2-weighted BCE sum over everything
    p = golden["outputs"]["pred_logits"].sigmoid()
    assert losses["loss_ce"].item() == pytest.approx(float((-(p**2) * torch.log1p(-p)).sum()), rel=1e-4)


def test_eval_mode_uses_one_group(golden):
    q = 30
    sliced = {k: v[:, :q] for k, v in golden["outputs"].items() if torch.is_tensor(v)}
    total, losses = criterion(sliced, pad(golden["targets"]), TINY_DET, LCFG, train=False)
    ref = ref_layer_losses(sliced, golden["targets"], ref_match(sliced, golden["targets"], 1), 5.0)
    for key, value in ref.items():
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5), key
    idx = match(sliced, pad(golden["targets"]), cost_kwargs(), group_detr=1)
    for b, image in enumerate(golden["matcher"]["layers"]["final"]):
        assert pairs_from_idx(idx)[b] == (image["groups"][0]["pred"], image["groups"][0]["tgt"])


# ---------------------------------------------------------------------------------------------- hungarian
def test_hungarian_sanitises_non_finite_costs():
    cost = torch.tensor([[[float("nan"), 1.0, 5.0], [2.0, float("inf"), 0.5], [3.0, 4.0, -float("inf")]]])
    out = hungarian(cost, torch.tensor([3]))
    assert out.tolist() == [[2, 0, 1]]  # the cheaper of the two assignments avoiding every non-finite entry
    assert sanitize_cost(cost[0].numpy()).max() == pytest.approx(5.0 + 5.0 + 1.0)
    all_bad = torch.full((1, 2, 2), float("nan"))
    assert sorted(hungarian(all_bad, torch.tensor([2]))[0].tolist()) == [0, 1]


def test_hungarian_padding_and_more_targets_than_queries():
    cost = torch.tensor([[[0.0, 9.0, 9.0, 7.0], [9.0, 0.0, 9.0, 7.0]], [[1.0, 0.0, 5.0, 5.0], [0.0, 1.0, 5.0, 5.0]]])
    out = hungarian(cost, torch.tensor([3, 0]))
    assert out.tolist() == [[0, 1, -1, -1], [-1, -1, -1, -1]]
    torch.library.opcheck(hungarian, (cost, torch.tensor([2, 1])), test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------- masks
def _seg_case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w, groups, per_group, slots = 2, 4, 6, 8, 2, 3, 3
    pred = {
        "spatial_features": torch.randn(b, c, h, w, generator=gen),
        "query_features": torch.randn(b, groups * per_group, c, generator=gen),
        "bias": torch.randn(1, generator=gen),
    }
    masks = torch.rand(b, slots, 4 * h, 4 * w, generator=gen) > 0.5
    idx = torch.tensor([[[2, -1, 0], [4, -1, 3]], [[-1, 1, -1], [-1, 5, -1]]])  # slot 1 of image 0 is padding
    return pred, masks, idx


def test_mask_losses_match_dense_reference():
    pred, masks, idx = _seg_case()
    pred = {k: v.requires_grad_() for k, v in pred.items()}
    num_boxes = torch.tensor(6.0)
    got = mask_losses(pred, masks, idx, num_boxes, point_ratio=16, key=123)
    # the same points: the same key on the same stacked logits
    b, groups, slots = idx.shape
    h, w = pred["spatial_features"].shape[-2:]
    points = max(h, h * w // 16)
    flat_q = idx.reshape(b, -1).clamp(min=0)
    stacked = torch.stack(
        [
            torch.einsum("chw,c->hw", pred["spatial_features"][i], pred["query_features"][i, q]) + pred["bias"]
            for i in range(b)
            for q in flat_q[i].tolist()
        ]
    )[:, None]
    coords = uncertain_points(stacked.detach(), points, key=123)
    ce = dice = 0.0
    for i in range(b):
        for g in range(groups):
            for t in range(slots):
                q = int(idx[i, g, t])
                if q < 0:
                    continue
                dense = (
                    torch.einsum("chw,c->hw", pred["spatial_features"][i], pred["query_features"][i, q]) + pred["bias"]
                )
                pts = coords[i * groups * slots + g * slots + t][None, :, None, :] * 2 - 1
                x = F.grid_sample(dense[None, None], pts, padding_mode="border", align_corners=False).flatten()
                y = F.grid_sample(masks[i, t][None, None].float(), pts, mode="nearest", align_corners=False).flatten()
                ce = ce + F.binary_cross_entropy_with_logits(x, y)
                s = x.sigmoid()
                dice = dice + 1 - (2 * (s * y).sum() + 1) / (s.sum() + y.sum() + 1)
    assert got["loss_mask_ce"].item() == pytest.approx(ce.item() / 6, rel=1e-5)
    assert got["loss_mask_dice"].item() == pytest.approx(dice.item() / 6, rel=1e-5)
    ours = torch.autograd.grad(got["loss_mask_ce"] + got["loss_mask_dice"], list(pred.values()))
    ref = torch.autograd.grad((ce + dice) / 6, list(pred.values()))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_mask_losses_without_matches_are_connected_zeros():
    pred, masks, _ = _seg_case()
    pred = {k: v.requires_grad_() for k, v in pred.items()}
    got = mask_losses(pred, masks, torch.full((2, 2, 3), -1), torch.tensor(1.0), point_ratio=16)
    assert got["loss_mask_ce"].item() == 0.0 and got["loss_mask_dice"].item() == 0.0
    grads = torch.autograd.grad(got["loss_mask_ce"] + got["loss_mask_dice"], list(pred.values()))
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


def test_matcher_mask_costs_match_direct_computation():
    pred, masks, _ = _seg_case(1)
    layer = {
        "pred_logits": torch.randn(2, 6, 4),
        "pred_boxes": torch.rand(2, 6, 4) * 0.5 + 0.25,
        "pred_masks": pred,
    }
    targets = {
        "labels": torch.tensor([[0, 1, 2], [3, -1, -1]]),
        "boxes": torch.rand(2, 3, 4) * 0.5 + 0.25,
        "masks": masks,
    }
    costs = match_costs(layer, targets, cost_kwargs(mask_points=12), key=7)
    coords = rng.uniform(7, (1, 12, 2))[0]
    grid = (coords * 2 - 1)[None, :, None, :]
    for i in range(2):
        for q in range(6):
            dense = torch.einsum("chw,c->hw", pred["spatial_features"][i], pred["query_features"][i, q]) + pred["bias"]
            x = F.grid_sample(dense[None, None], grid, padding_mode="border", align_corners=False).flatten()
            for t in range(3):
                y = F.grid_sample(masks[i, t][None, None].float(), grid, mode="nearest", align_corners=False).flatten()
                ce = F.binary_cross_entropy_with_logits(x, y)
                s = x.sigmoid()
                dice = 1 - (2 * (s * y).sum() + 1) / (s.sum() + y.sum() + 1)
                assert costs["mask_ce"][i, q, t].item() == pytest.approx(ce.item(), rel=1e-5, abs=1e-6)
                assert costs["mask_dice"][i, q, t].item() == pytest.approx(dice.item(), rel=1e-5, abs=1e-6)
    expected = (
        5 * costs["bbox"] + 2 * costs["class"] + 2 * costs["giou"] + 5 * costs["mask_ce"] + 5 * costs["mask_dice"]
    )
    torch.testing.assert_close(costs["total"], expected)


def test_segmentation_criterion_end_to_end():
    pred, masks, _ = _seg_case(2)
    cfg = ModelConfig(
        name="seg_t",
        segmentation_head=True,
        dec_layers=2,
        num_queries=3,
        num_select=3,
        group_detr=2,
        num_classes=3,
        resolution=128,
    )
    gen = torch.Generator().manual_seed(3)

    def layer():
        return {
            "pred_logits": torch.randn(2, 6, 4, generator=gen),
            "pred_boxes": torch.rand(2, 6, 4, generator=gen) * 0.5 + 0.25,
            "pred_masks": {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in pred.items()},
        }

    outputs = {**layer(), "aux_outputs": [layer()], "enc_outputs": layer()}
    targets = {
        "labels": torch.tensor([[0, 1, 2], [2, -1, -1]]),
        "boxes": torch.rand(2, 3, 4, generator=gen) * 0.5 + 0.25,
        "masks": masks,
    }
    total, losses = criterion(outputs, targets, cfg, LossConfig.resolve(cfg, TCFG), train=True, key=3)
    weights = LossConfig.resolve(cfg, TCFG).weights
    assert set(weights) <= set(losses) and len(weights) == 15
    assert {"loss_mask_ce_enc", "loss_mask_dice_0"} <= set(weights)
    assert all(torch.isfinite(v) for v in losses.values())
    assert total.item() == pytest.approx(sum(losses[k].item() * w for k, w in weights.items()), rel=1e-6)
    assert losses["loss_mask_ce"].item() > 0 and losses["loss_mask_dice_enc"].item() > 0
    with pytest.raises(ValueError, match=r"targets\['masks'\]"):
        criterion(outputs, {k: targets[k] for k in ("labels", "boxes")}, cfg, LossConfig.resolve(cfg, TCFG), train=True)


def test_bad_targets_name_the_field(golden):
    bad = pad(golden["targets"])
    with pytest.raises(ValueError, match=r"targets\['labels'\]"):
        criterion(
            golden["outputs"],
            {**bad, "labels": bad["labels"].float()},
            TINY_DET,
            LCFG,
            train=True,
        )
    with pytest.raises(ValueError, match=r"targets\['boxes'\]"):
        criterion(
            golden["outputs"],
            {**bad, "boxes": bad["boxes"][..., :2]},
            TINY_DET,
            LCFG,
            train=True,
        )
    with pytest.raises(ValueError, match="group_detr"):
        matcher_lib.assign(torch.zeros(1, 7, 2), torch.ones(1, 2, dtype=torch.bool), 2)


def test_plain_focal_loss_path(golden):
    """ia_bce_loss=False: upstream's sigmoid_focal_loss over one-hot targets (no-object column never
    positive), mean over queries times queries, over num_boxes; the box terms are unchanged."""
    import attrs

    focal_cfg = attrs.evolve(TCFG, ia_bce_loss=False)
    targets = pad(golden["targets"])
    _, focal = criterion(golden["outputs"], targets, TINY_DET, LossConfig.resolve(TINY_DET, focal_cfg), train=True)
    _, ia = criterion(golden["outputs"], targets, TINY_DET, LCFG, train=True)
    assert focal["loss_bbox_0"] == ia["loss_bbox_0"] and focal["loss_ce"] != ia["loss_ce"]
    layer = layer_of(golden["outputs"], "final")
    logits = layer["pred_logits"].double()
    onehot = torch.zeros(logits.shape[0], logits.shape[1], logits.shape[2] + 1, dtype=torch.float64)
    onehot[..., -1] = 1
    for b, (queries, tgts) in enumerate(ref_match(layer, golden["targets"], 13)):
        for q, t in zip(queries, tgts):
            onehot[b, q] = 0
            onehot[b, q, int(golden["targets"][b]["labels"][t])] = 1
    target = onehot[..., :-1]
    prob = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = (ALPHA * target + (1 - ALPHA) * (1 - target)) * ce * (1 - p_t) ** 2
    ref = loss.mean(1).sum() / 65.0 * logits.shape[1]
    assert focal["loss_ce"].item() == pytest.approx(ref.item(), rel=1e-5)
