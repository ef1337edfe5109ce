"""Upstream's GroupPose keypoint branch (RFDETRKeypointPreview) as pure functions.

Each query carries one token per keypoint of the schema ("compact" order: class 0's keypoints, then
class 1's, ...). After every decoder layer a keypoint block lets each instance token and its keypoint
tokens attend to each other (keypoints of different classes never do), lets the keypoint tokens
cross-attend to the image around the instance's reference box, and runs a keypoint FFN. A shared MLP
turns every layer's keypoint tokens into 8 channels per keypoint:

    [x, y, findable logit, visible logit, log_l11, l21, log_l22, class logit]

x/y are deltas scaled by the reference box (normalised to the unpadded image like boxes); the three
Cholesky channels parameterise the 2x2 precision L·Lᵀ of the location; the class channel of a class's
keypoints is summed into that class's detection logit (the "class-logit boost"). Outputs use the
class-padded slot layout: num_classes_with_keypoints x max(schema) slots, unused slots all zero.

The two schema-derived bool buffers of upstream's state dict (`_kp_active_mask`,
`transformer.decoder.keypoint_class_mask`) are not parameters here: `active_mask` / `class_mask`
rebuild them from the config, and checkpoint I/O writes and drops them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn import tree
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.model import attention, nn
from rfdetr_fn.tree import Params

CHANNELS = 8  # x, y, findable, visible, log_l11, l21, log_l22, class
_LAYER_SCALE_INIT = 1e-6


# ---------------------------------------------------------------- schema


def active_mask(schema: tuple[int, ...]) -> Tensor:
    """(classes, max keypoints) bool, True where class c has keypoint k (upstream's `_kp_active_mask`)."""
    if not schema:
        return torch.zeros((0, 0), dtype=torch.bool)
    return torch.arange(max(schema))[None] < torch.tensor(schema)[:, None]


def class_mask(schema: tuple[int, ...]) -> Tensor:
    """(1+K, 1+K) bool, True = blocked: keypoints of different classes; the instance token (0) sees all."""
    owner = torch.tensor([-1] + [c for c, n in enumerate(schema) for _ in range(n)])
    blocked = owner[:, None] != owner[None, :]
    return blocked & (owner[:, None] >= 0) & (owner[None, :] >= 0)


def padded_slots(schema: tuple[int, ...]) -> int:
    return len(schema) * max(schema)


def _slot_index(schema: tuple[int, ...]) -> list[int]:
    """Compact keypoint feeding each padded slot; sum(schema) (an appended zero row) for unused slots."""
    total, width, out, start = sum(schema), max(schema), [], 0
    for n in schema:
        out += [start + k if k < n else total for k in range(width)]
        start += n
    return out


def pad_slots(compact: Tensor, schema: tuple[int, ...]) -> Tensor:
    """(..., K, 8) compact keypoints -> (..., classes*max(schema), 8) class-padded slots."""
    zero = compact.new_zeros(*compact.shape[:-2], 1, compact.shape[-1])
    idx = torch.tensor(_slot_index(schema), device=compact.device)
    return torch.cat([compact, zero], -2).index_select(-2, idx)


def class_boost(padded: Tensor, schema: tuple[int, ...], num_logits: int) -> Tensor:
    """Per-class sum of the active slots' class channel, zero-padded to the class-head width."""
    c, width = len(schema), max(schema)
    contrib = padded[..., 7].unflatten(-1, (c, width))
    boost = (contrib * active_mask(schema).to(contrib.device, contrib.dtype)).sum(-1)
    return F.pad(boost, (0, num_logits - c))


# ---------------------------------------------------------------- layers


def query_initializer(p: Params, cond: Tensor) -> Tensor:
    """Upstream's ConditionalQueryInitializer: (..., d) conditioning -> (..., K, d) keypoint tokens.

    Learned queries are LayerNorm'd (no affine), modulated adaLN-style by the conditioning vector
    (scale, shift, gate), projected, gated and added back to the raw queries.
    """
    queries = p["queries"]
    normed = F.layer_norm(queries, (queries.shape[-1],))
    hidden = F.gelu(nn.linear(p["adaLN_modulation"]["0"], cond[..., None, :]))
    scale, shift, gate = nn.linear(p["adaLN_modulation"]["2"], hidden).chunk(3, -1)
    return nn.linear(p["out_proj"], (scale + 1.0) * normed + shift) * gate + queries


def decode(p: Params, tokens: Tensor, boxes: Tensor) -> Tensor:
    """Keypoint MLP on (..., N, K, d) tokens; x/y decoded around (..., N, 4) cxcywh reference boxes.

    Non-finite MLP outputs become 0 before they touch the (shared) boxes, as upstream does.
    """
    delta = torch.nan_to_num(nn.mlp(p, tokens, 3), nan=0.0, posinf=0.0, neginf=0.0)
    xy = delta[..., :2] * boxes[..., None, 2:] + boxes[..., None, :2]
    return torch.cat([xy, delta[..., 2:]], -1)


def block(
    p: Params,
    tgt: Tensor,
    kp: Tensor,
    kp_pos: Tensor,
    query_pos: Tensor,
    ref_input: Tensor,
    memory: Tensor,
    mask: Tensor,
    shapes: attention.Shapes,
    cfg: ModelConfig,
) -> tuple[Tensor, Tensor]:
    """The GroupPose block after a decoder layer: instance-keypoint attention, keypoint deformable
    cross-attention around the instance's reference box, keypoint FFN (post-norm, dropout 0).

    tgt (B, N, d) instance tokens, kp (B, N, K, d) keypoint tokens, kp_pos (K, d), query_pos (B, N, d),
    ref_input (B, N, levels, 4), memory the keypoint cross-attention's value. Returns (tgt, kp).
    """
    b, n, k, d = kp.shape
    tokens = torch.cat([tgt[:, :, None], kp], 2).reshape(b * n, 1 + k, d)
    pos = torch.cat([kp_pos.new_zeros(1, d), kp_pos])[None].expand(b * n, -1, -1)
    blocked = class_mask(cfg.num_keypoints_per_class).to(tgt.device)
    bias = torch.zeros(blocked.shape, dtype=tgt.dtype, device=tgt.device).masked_fill(blocked, float("-inf"))
    out = attention.self_attention(p["kp_inst_self_attn"], tokens, pos, cfg.sa_nheads, 1, bias)
    out = out.reshape(b, n, 1 + k, d)
    tgt = nn.layer_norm(p["kp_inst_norm"], tgt + out[:, :, 0] * p["instance_kp_layer_scale"])
    kp = nn.layer_norm(p["kp_norm"], kp + out[:, :, 1:])
    if cfg.keypoint_cross_attn:
        query = (kp + query_pos[:, :, None]).reshape(b, n * k, d)
        ref = ref_input[:, :, None].expand(-1, -1, k, -1, -1).reshape(b, n * k, *ref_input.shape[2:])
        cross = attention.deformable_attention(p["kp_cross_attn"], query, ref, memory, mask, shapes, cfg)
        kp = nn.layer_norm(p["kp_cross_attn_norm"], kp + cross.reshape(b, n, k, d))
    ffn = nn.linear(p["kp_linear3"], F.relu(nn.linear(p["kp_linear1"], kp)))
    return tgt, nn.layer_norm(p["kp_norm5"], kp + ffn)


def encoder_keypoints(p: Params, memory_ts: Tensor, boxes_ts: Tensor, groups: int) -> Tensor:
    """Keypoints of the two-stage proposals: (B, k*G, d) selected memory, (B, k*G, 4) encoder boxes
    (not detached) -> (B, k*G, K, 8) compact, group g through its own `enc_out_keypoint_embed[g]`."""
    tokens = query_initializer(p["keypoint_query_initializer_enc"], memory_ts)
    chunks = zip(tokens.chunk(groups, 1), boxes_ts.chunk(groups, 1))
    return torch.cat([decode(p["enc_out_keypoint_embed"][str(g)], t, bx) for g, (t, bx) in enumerate(chunks)], 1)


# ---------------------------------------------------------------- parameters


def _mha_init(d: int, gen: torch.Generator) -> Params:
    return {
        "in_proj_weight": nn.xavier_uniform((3 * d, d), gen),
        "in_proj_bias": torch.zeros(3 * d),
        "out_proj": {"weight": nn.xavier_uniform((d, d), gen), "bias": torch.zeros(d)},
    }


def layer_params(base: Params, cfg: ModelConfig, gen: torch.Generator) -> Params:
    """A decoder layer's params with the keypoint block added, in upstream's state-dict order.

    Upstream's Transformer re-initialises every matrix xavier-uniform; the layer scale starts at 1e-6.
    """
    d = cfg.hidden_dim
    out: Params = {"instance_kp_layer_scale": torch.full((1,), _LAYER_SCALE_INIT), **base}
    out["kp_inst_self_attn"] = _mha_init(d, gen)
    out["kp_inst_norm"] = nn.norm_init(d)
    out["kp_norm"] = nn.norm_init(d)
    if cfg.keypoint_cross_attn:
        out["kp_cross_attn"] = attention.msda_init(cfg, gen)
        out["kp_cross_attn_norm"] = nn.norm_init(d)
    out["kp_linear1"] = attention.xavier_linear(4 * d, d, gen)
    out["kp_linear3"] = attention.xavier_linear(d, 4 * d, gen)
    out["kp_norm5"] = nn.norm_init(d)
    return out


def initializer_params(cfg: ModelConfig, gen: torch.Generator) -> Params:
    d, total = cfg.hidden_dim, sum(cfg.num_keypoints_per_class)
    return {
        "queries": nn.xavier_uniform((total, d), gen),
        "adaLN_modulation": {"0": attention.xavier_linear(d, d, gen), "2": attention.xavier_linear(3 * d, d, gen)},
        "out_proj": attention.xavier_linear(d, d, gen),
    }


def head_params(cfg: ModelConfig, gen: torch.Generator) -> Params:
    """`keypoint_embed`: d -> d -> d -> 8 with a zero last layer (keypoints start on the box centre)."""
    return nn.head_init(cfg.hidden_dim, CHANNELS, gen)


def transformer_params(cfg: ModelConfig, gen: torch.Generator, head: Params) -> Params:
    """The transformer-level keypoint entries: both initializers and one encoder head copy per group."""
    return {
        "keypoint_query_initializer": initializer_params(cfg, gen),
        "keypoint_query_initializer_enc": initializer_params(cfg, gen),
        "enc_out_keypoint_embed": {str(g): tree.clone(head) for g in range(cfg.group_detr)},
    }


def buffers(cfg: ModelConfig) -> tuple[Tensor, Tensor | None]:
    """Upstream's schema-derived bool buffers for `cfg`: `_kp_active_mask` (empty without keypoints)
    and `transformer.decoder.keypoint_class_mask` (None without keypoints)."""
    if not cfg.keypoints:
        return torch.zeros((0, 0), dtype=torch.bool), None
    return active_mask(cfg.num_keypoints_per_class), class_mask(cfg.num_keypoints_per_class)


# ---------------------------------------------------------------- postprocess


def log_mean_trace(kp: Tensor, active: Tensor) -> Tensor:
    """(..., K, 8) keypoints -> log of the findability-weighted mean trace of each keypoint's covariance
    (the inverse of the predicted precision), over the active keypoints; 0 where none is active."""
    log_l11, l21, log_l22 = kp[..., 4], kp[..., 5], kp[..., 6]
    t1, t2 = -2.0 * log_l11, -2.0 * log_l22
    t3 = 2.0 * l21.abs().clamp(min=1e-12).log() + t1 + t2
    log_trace = torch.stack([t1, t2, t3], -1).logsumexp(-1)
    log_w = kp[..., 2].sigmoid().clamp(min=1e-12).log()
    neg = torch.full_like(log_w, float("-inf"))
    num = torch.where(active, log_trace + log_w, neg).logsumexp(-1)
    den = torch.where(active, log_w, neg).logsumexp(-1)
    return torch.where(active.any(-1), num - den, torch.zeros_like(num))


def select_keypoints(
    pred_keypoints: Tensor,
    queries: Tensor,
    labels: Tensor,
    scores: Tensor,
    target_sizes: Tensor,
    schema: tuple[int, ...],
    trace_alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Keypoints of the selected detections, upstream's PostProcess rules, batched.

    Returns keypoints (B, K, max(schema), 3) = (x, y pixels, sigmoid(findable)) for the label's
    keypoints and zeros elsewhere (labels without keypoints get all zeros), the raw precision Cholesky
    (log_l11, l21, log_l22) with NaN where inactive, and the scores: for labels in the schema, fused with
    the keypoint uncertainty, min(sigmoid(log p - alpha * log mean trace), nextafter(1, 0)).
    """
    classes, width = len(schema), max(schema)
    picked = pred_keypoints.gather(1, queries[..., None, None].expand(-1, -1, *pred_keypoints.shape[2:]))
    per_class = picked.unflatten(2, (classes, width))  # (B, K, C, W, 8)
    valid = labels < classes
    cls = labels.clamp(max=classes - 1)
    kp = per_class.gather(2, cls[..., None, None, None].expand(-1, -1, 1, width, per_class.shape[-1]))[:, :, 0]
    active = active_mask(schema).to(kp.device)[cls] & valid[..., None]
    h, w = target_sizes.to(kp.dtype).unbind(1)
    xyf = torch.stack([kp[..., 0] * w[:, None, None], kp[..., 1] * h[:, None, None], kp[..., 2].sigmoid()], -1)
    keypoints = torch.where(active[..., None], xyf, torch.zeros_like(xyf))
    precision = torch.where(active[..., None], kp[..., 4:7], torch.full_like(kp[..., 4:7], float("nan")))
    if trace_alpha > 0:
        fused = torch.sigmoid(scores.log() - trace_alpha * log_mean_trace(kp, active))
        fused = torch.minimum(fused, torch.nextafter(torch.ones_like(fused), torch.zeros_like(fused)))
        scores = torch.where(valid, fused, scores)
    return keypoints, precision, scores
