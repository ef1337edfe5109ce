"""The whole RF-DETR detector (upstream's LWDETR) as `init` / `param_shapes` / `apply`.

`params` is a nested dict whose flattened dotted keys are exactly upstream's state-dict keys, in
upstream's order: `transformer.*`, `class_embed.*`, `bbox_embed.*`, [`segmentation_head.*`],
`refpoint_embed.weight`, `query_feat.weight`, `backbone.0.encoder.*`, `backbone.0.projector.*`
[, `backbone.0.cross_attn_projector.*`, `keypoint_embed.*` for keypoint models, see `keypoints`].
The upstream entries we do not store are the non-learned bool buffers derived from the keypoint schema:
`_kp_active_mask` (empty, shape (0, 0), without keypoints) and `transformer.decoder.keypoint_class_mask`;
checkpoint I/O rebuilds them on save and drops them on load.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn import tree
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.model import backbone, keypoints, lora, nn, projector, segmentation, transformer
from rfdetr_fn.tree import Params

_PRIOR_PROB = 0.01  # class biases start at -log((1 - p) / p): every sigmoid score starts near 0.01


def _class_head(cfg: ModelConfig, gen: torch.Generator) -> Params:
    head = nn.linear_init(cfg.num_logits, cfg.hidden_dim, gen)
    head["bias"] = torch.full((cfg.num_logits,), -math.log((1 - _PRIOR_PROB) / _PRIOR_PROB))
    return head


def _box_head(cfg: ModelConfig, gen: torch.Generator) -> Params:
    return nn.head_init(cfg.hidden_dim, 4, gen)  # first boxes = the reference boxes


def init(cfg: ModelConfig, seed: int | torch.Generator = 0, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh parameters with upstream's initialisation scheme (not its random stream).

    Transformer weights are xavier-uniform; deformable attention starts with zero offset weights, the
    direction-pattern offset bias and uniform attention; class biases are -log(99); the last box
    layer and `refpoint_embed` are 0; `query_feat` is N(0, 1). Each encoder head (one per group) starts
    as a copy of `class_embed` / `bbox_embed`, as upstream deep-copies them.
    """
    transformer.check_supported(cfg)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    tr = transformer.init(cfg, gen)
    class_embed, bbox_embed = _class_head(cfg, gen), _box_head(cfg, gen)
    kp_head = keypoints.head_params(cfg, gen) if cfg.keypoints else None
    if kp_head is not None:
        tr.update(keypoints.transformer_params(cfg, gen, kp_head))
    tr["enc_out_bbox_embed"] = {str(g): tree.clone(bbox_embed) for g in range(cfg.group_detr)}
    tr["enc_out_class_embed"] = {str(g): tree.clone(class_embed) for g in range(cfg.group_detr)}
    params: Params = {"transformer": tr, "class_embed": class_embed, "bbox_embed": bbox_embed}
    if cfg.segmentation_head:
        params["segmentation_head"] = segmentation.init(cfg, gen)
    rows = cfg.num_queries * cfg.group_detr
    params["refpoint_embed"] = {"weight": torch.zeros(rows, 4)}
    params["query_feat"] = {"weight": torch.randn(rows, cfg.hidden_dim, generator=gen)}
    params["backbone"] = {"0": {"encoder": backbone.init(cfg, gen), "projector": projector.init(cfg, gen)}}
    if cfg.dual_projector:
        params["backbone"]["0"]["cross_attn_projector"] = projector.init(cfg, gen)
    if kp_head is not None:
        params["keypoint_embed"] = kp_head
    return tree.map_(lambda t: t.to(dtype), params)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's dotted key and shape, in `init`'s (= upstream's state-dict) order.

    `init` itself runs on the meta device, so the shapes follow the code with no storage allocated."""
    return dict(_param_shapes(cfg))


@functools.lru_cache(maxsize=32)
def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return tree.shapes(init(cfg, torch.Generator()))


def _level_masks(mask: Tensor, feats: list[Tensor]) -> list[Tensor]:
    """Nearest-resize the pixel padding mask to every feature map (upstream's Backbone)."""
    m = mask[None].float()
    return [F.interpolate(m, size=f.shape[-2:]).to(torch.bool)[0] for f in feats]


def _heads(params: Params, hs: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Shared class/box heads on every layer: logits (L, B, N, C) and boxes (L, B, N, 4) cxcywh."""
    boxes = transformer.apply_deltas(nn.mlp(params["bbox_embed"], hs, 3), ref)
    return nn.linear(params["class_embed"], hs), boxes


def _add_keypoints(out: dict, compact: Tensor, cfg: ModelConfig) -> None:
    """pred_keypoints in the class-padded layout, and their class-logit boost added to pred_logits."""
    padded = keypoints.pad_slots(compact, cfg.num_keypoints_per_class)
    out["pred_logits"] = out["pred_logits"] + keypoints.class_boost(padded, cfg.num_keypoints_per_class, cfg.num_logits)
    out["pred_keypoints"] = padded


def _has_adapters(params: Params) -> bool:
    """Adapters sit beside the encoder's linears (PEFT's layout): look only there."""
    encoder = params.get("backbone", {}).get("0", {}).get("encoder", {})
    return any(lora.is_adapter(k) for k in tree.flatten(encoder, "x."))


def apply(
    params: Params,
    images: Tensor,
    mask: Tensor | None,
    cfg: ModelConfig,
    *,
    train: bool,
    drop_path: float = 0.0,
    key: Tensor | int | None = None,
) -> dict:
    """Forward pass. images (B, C, H, W) normalised; mask (B, H, W) bool, True = padding, or None.

    train=True uses all `group_detr` query groups (Q*G queries, self-attention within a group) and
    returns the segmentation factors; train=False uses group 0 only and dense masks. Returns
    pred_logits (B, N, num_classes+1), pred_boxes (B, N, 4) normalised cxcywh (last layer),
    aux_outputs (one dict per earlier layer), enc_outputs (two-stage proposals) and, with a
    segmentation head, pred_masks. LoRA/DoRA adapters in `params` are merged into the ViT weights first,
    at the config's scaling lora_alpha / lora_rank (adapters of another rank are refused). `key` (see
    `rfdetr_fn.rng`) drives drop path, the only random draw.
    """
    if _has_adapters(params):
        params = lora.merge_for(params, cfg)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if mask is None:
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
    elif mask.shape != (images.shape[0], *images.shape[-2:]) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool {(images.shape[0], *images.shape[-2:])}, got {mask.dtype} {tuple(mask.shape)}"
        )
    groups = cfg.group_detr if train else 1
    rows = cfg.num_queries * groups

    bb = params["backbone"]["0"]
    vit = backbone.features(bb["encoder"], images, cfg, train=train, drop_path=drop_path, key=key)
    feats = projector.apply(bb["projector"], vit, cfg)
    cross_feats = projector.apply(bb["cross_attn_projector"], vit, cfg) if cfg.dual_projector else None
    masks = _level_masks(mask, feats)

    tr = transformer.apply(
        params["transformer"],
        feats,
        masks,
        params["refpoint_embed"]["weight"][:rows],
        params["query_feat"]["weight"][:rows],
        cfg,
        groups,
        cross_feats,
        checkpointed=train and cfg.gradient_checkpointing,
    )
    heads = {k: params[k] for k in ("bbox_embed", "class_embed")}
    if train and cfg.gradient_checkpointing:  # every layer's outputs over every query group
        logits, boxes = nn.checkpoint_for_call()(_heads, heads, tr["hs"], tr["ref"], use_reentrant=False)
    else:
        logits, boxes = _heads(heads, tr["hs"], tr["ref"])
    layers = [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(cfg.dec_layers)]
    enc = {"pred_logits": tr["logits_ts"], "pred_boxes": tr["boxes_ts"]}
    if cfg.keypoints:
        per_layer = keypoints.decode(params["keypoint_embed"], tr["kp_hs"], tr["ref"])
        for layer, kp in zip(layers, per_layer):
            _add_keypoints(layer, kp, cfg)
        _add_keypoints(enc, tr["enc_keypoints"], cfg)
    if cfg.segmentation_head:
        seg, hw = params["segmentation_head"], tuple(images.shape[-2:])
        for layer, m in zip(layers, segmentation.apply(seg, feats[0], list(tr["hs"]), hw, cfg, train=train)):
            layer["pred_masks"] = m
        enc["pred_masks"] = segmentation.apply(
            seg, feats[0], [tr["memory_ts"]], hw, cfg, train=train, skip_blocks=True
        )[0]
    return {**layers[-1], "aux_outputs": layers[:-1], "enc_outputs": enc}
