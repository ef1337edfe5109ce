"""RF-DETR's transformer (upstream prefix `transformer.`): two-stage proposals and the deformable decoder.

There is no transformer encoder: the projector output is the memory. The two-stage step scores every
memory position with per-group encoder heads, keeps the top `num_queries` positions per group, and
turns their boxes into the decoder's reference boxes. The decoder runs post-norm layers of
group-restricted self-attention, multi-scale deformable cross-attention and a ReLU FFN, all around
one initial reference box per query ("lite" refinement). Supported: two_stage, bbox_reparam and
lite_refpoint_refine all True (every upstream variant).

Every function is pure and shape-static for a fixed input size, so the whole forward traces under
torch.compile(fullgraph=True): no .item(), no branching on tensor values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn.compiler import region
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.model import keypoints, nn
from rfdetr_fn.model.attention import Shapes, deformable_attention, msda_init, self_attention, xavier_linear
from rfdetr_fn.model.position import sine_for_boxes
from rfdetr_fn.tree import Params

# ---------------------------------------------------------------- flattening and proposals


def flatten_levels(feats: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor, Shapes]:
    """Per-level (B, d, h, w) maps and (B, h, w) masks -> memory (B, S, d), mask (B, S), [(h, w)]."""
    memory = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
    mask = torch.cat([m.flatten(1) for m in masks], 1)
    return memory, mask, [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]


def valid_ratios(masks: list[Tensor]) -> Tensor:
    """(B, levels, 2) fraction of each map that is image, as (w, h); float32 like upstream."""
    out = []
    for m in masks:
        h, w = m.shape[-2:]
        valid_h = (~m[:, :, 0]).sum(1).float() / h
        valid_w = (~m[:, 0, :]).sum(1).float() / w
        out.append(torch.stack([valid_w, valid_h], -1))
    return torch.stack(out, 1)


def encoder_proposals(memory: Tensor, mask: Tensor, shapes: Shapes) -> tuple[Tensor, Tensor]:
    """Grid-cell proposal boxes (cxcywh, relative to the valid region); memory with invalid rows zeroed.

    A proposal is valid when all four coordinates lie in (0.01, 0.99); padded and invalid positions get
    proposal 0 and memory 0. The grid is float32 (upstream's island), cast to the memory dtype.
    """
    batch = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        m = mask[:, start : start + h * w].reshape(batch, h, w)
        scale = torch.stack([(~m[:, 0, :]).sum(1), (~m[:, :, 0]).sum(1)], -1).reshape(batch, 1, 1, 2).float()
        gy, gx = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
            torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        centres = (torch.stack([gx, gy], -1)[None] + 0.5) / scale
        sizes = torch.ones_like(centres) * 0.05 * (2.0**lvl)
        proposals.append(torch.cat([centres, sizes], -1).reshape(batch, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    keep = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True) & ~mask[..., None]
    proposals = proposals.masked_fill(~keep, 0.0)
    return memory.masked_fill(~keep, 0.0), proposals.to(memory.dtype)


def apply_deltas(deltas: Tensor, boxes: Tensor) -> Tensor:
    """Box reparameterisation: centre moves by delta * size, size scales by exp(delta)."""
    cxcy = deltas[..., :2] * boxes[..., 2:] + boxes[..., :2]
    wh = deltas[..., 2:].exp() * boxes[..., 2:]
    return torch.cat([cxcy, wh], -1)


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _group_proposals(p: Params, g_key: str, memory: Tensor, proposals: Tensor, k: int) -> tuple[Tensor, ...]:
    """One group's top-k memory rows: (selected memory, their boxes, their logits, indices)."""
    m = nn.layer_norm(p["enc_output_norm"][g_key], nn.linear(p["enc_output"][g_key], memory))
    scores = nn.linear(p["enc_out_class_embed"][g_key], m).max(-1).values
    idx = torch.topk(scores, k, dim=1).indices
    deltas = nn.mlp(p["enc_out_bbox_embed"][g_key], m, 3)
    sel = _gather_rows(m, idx)
    return sel, _gather_rows(apply_deltas(deltas, proposals), idx), nn.linear(p["enc_out_class_embed"][g_key], sel), idx


def two_stage(
    p: Params,
    memory: Tensor,
    mask: Tensor,
    shapes: Shapes,
    cfg: ModelConfig,
    groups: int,
    checkpointed: bool = False,
):
    """Select `num_queries` encoder positions per group with that group's heads.

    Returns (memory_ts, boxes_ts, logits_ts, indices), each concatenated over groups along the query
    axis: memory_ts (B, k*G, d) the selected normalised memory, boxes_ts (B, k*G, 4) the encoder boxes
    (not detached: the encoder loss trains them), logits_ts their class logits and indices the
    flattened memory positions picked. Query slot i of a group takes its i-th best position
    (torch.topk order, like upstream). `checkpointed` recomputes each group's projections in the
    backward pass (every group projects the whole memory).
    """
    out_memory, proposals = encoder_proposals(memory, mask, shapes)
    k = min(cfg.num_queries, memory.shape[1])
    mems, boxes, logits, picks = [], [], [], []
    for g in range(groups):
        args = (p, str(g), out_memory, proposals, k)
        sel, box, logit, idx = (
            nn.checkpoint_for_call()(_group_proposals, *args, use_reentrant=False)
            if checkpointed
            else _group_proposals(*args)
        )
        mems.append(sel)
        boxes.append(box)
        logits.append(logit)
        picks.append(idx)
    return torch.cat(mems, 1), torch.cat(boxes, 1), torch.cat(logits, 1), torch.cat(picks, 1)


# ---------------------------------------------------------------- decoder


@region
def decoder_layer(
    p: Params,
    tgt: Tensor,
    query_pos: Tensor,
    ref: Tensor,
    memory: Tensor,
    mask: Tensor,
    shapes: Shapes,
    cfg: ModelConfig,
    groups: int,
) -> Tensor:
    """Post-norm layer: group self-attention, deformable cross-attention, ReLU FFN (dropout is 0)."""
    tgt = nn.layer_norm(p["norm1"], tgt + self_attention(p["self_attn"], tgt, query_pos, cfg.sa_nheads, groups))
    cross = deformable_attention(p["cross_attn"], tgt + query_pos, ref, memory, mask, shapes, cfg)
    tgt = nn.layer_norm(p["norm2"], tgt + cross)
    ffn = nn.linear(p["linear2"], F.relu(nn.linear(p["linear1"], tgt)))
    return nn.layer_norm(p["norm3"], tgt + ffn)


def decoder(
    p: Params,
    tgt: Tensor,
    ref: Tensor,
    memory: Tensor,
    mask: Tensor,
    shapes: Shapes,
    ratios: Tensor,
    cfg: ModelConfig,
    groups: int,
    kp: Tensor | None = None,
    kp_memory: Tensor | None = None,
    checkpointed: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Run every layer around the same initial reference boxes; hs (L, B, N, d) after the shared norm.

    With keypoint tokens `kp` (B, N, K, d), each layer is followed by the GroupPose block (reading
    `kp_memory`); their states after every layer come back as (L, B, N, K, d), else None.
    `checkpointed` recomputes each layer in the backward pass (it keeps only the layer's inputs: the
    FFN over every query group is the largest activation of a train step); the layer draws nothing
    random, so the numbers are identical.
    """
    ref_input = ref[:, :, None] * torch.cat([ratios, ratios], -1)[:, None]
    query_pos = nn.mlp(p["ref_point_head"], sine_for_boxes(ref_input[:, :, 0], cfg.hidden_dim // 2), 2)
    hs, kp_hs = [], []
    for i in range(cfg.dec_layers):
        layer = p["layers"][str(i)]
        args = (layer, tgt, query_pos, ref_input, memory, mask, shapes, cfg, groups)
        tgt = (
            nn.checkpoint_for_call()(decoder_layer, *args, use_reentrant=False)
            if checkpointed
            else decoder_layer(*args)
        )
        if kp is not None:
            pos = p["keypoint_pos_embed"]
            tgt, kp = keypoints.block(layer, tgt, kp, pos, query_pos, ref_input, kp_memory, mask, shapes, cfg)
            kp_hs.append(kp)
        hs.append(nn.layer_norm(p["norm"], tgt))
    return torch.stack(hs), (torch.stack(kp_hs) if kp_hs else None)


def with_registers(x: Tensor, rows: Tensor, groups: int) -> Tensor:
    """Append the register rows (R, c) to every query group of x (B, G*Q, c) -> (B, G*(Q+R), c), so group
    self-attention sees them in each group (upstream's num_decoder_registers)."""
    b, n, c = x.shape
    per_group = x.reshape(b, groups, n // groups, c)
    extra = rows.to(x.dtype)[None, None].expand(b, groups, -1, -1)
    return torch.cat([per_group, extra], 2).reshape(b, -1, c)


def drop_registers(hs: Tensor, groups: int, registers: int) -> Tensor:
    """Remove the register rows from decoder states (L, B, G*(Q+R), d) -> (L, B, G*Q, d)."""
    layers, b, n, d = hs.shape
    return hs.reshape(layers, b, groups, n // groups, d)[:, :, :, : n // groups - registers].reshape(layers, b, -1, d)


def check_supported(cfg: ModelConfig) -> None:
    for field in ("two_stage", "bbox_reparam", "lite_refpoint_refine"):
        if not getattr(cfg, field):
            raise ValueError(f"ModelConfig.{field}=False is not supported (every upstream variant uses True)")
    if cfg.keypoints and cfg.num_decoder_registers:
        raise ValueError("num_decoder_registers with keypoint models is not supported (no upstream variant has both)")


def apply(
    p: Params,
    feats: list[Tensor],
    masks: list[Tensor],
    refpoint_embed: Tensor,
    query_feat: Tensor,
    cfg: ModelConfig,
    groups: int,
    cross_feats: list[Tensor] | None = None,
    checkpointed: bool = False,
) -> dict[str, Tensor]:
    """Projector maps + level masks -> decoder states and two-stage outputs.

    `refpoint_embed` (N, 4) and `query_feat` (N, d) are the rows of the groups in use (N = Q*groups);
    `cross_feats` are the dual projector's maps (same shapes as `feats`). Returns hs (L, B, N, d), ref
    (B, N, 4) the initial reference boxes, and `two_stage`'s memory_ts, boxes_ts, logits_ts and
    indices; keypoint models add kp_hs (L, B, N, K, d) and enc_keypoints (B, N, K, 8), compact.
    `checkpointed`: gradient checkpointing of the decoder layers and the two-stage groups.
    """
    check_supported(cfg)
    memory, mask, shapes = flatten_levels(feats, masks)
    ratios = valid_ratios(masks).to(memory.dtype)
    memory_ts, boxes_ts, logits_ts, indices = two_stage(p, memory, mask, shapes, cfg, groups, checkpointed)
    b = memory.shape[0]
    tgt = query_feat[None].expand(b, -1, -1)
    learned = refpoint_embed[None].expand(b, -1, -1)
    n_ts = boxes_ts.shape[1]
    ref = torch.cat([apply_deltas(learned[:, :n_ts], boxes_ts.detach()), learned[:, n_ts:]], 1)
    out = {"memory_ts": memory_ts, "boxes_ts": boxes_ts, "logits_ts": logits_ts, "indices": indices, "ref": ref}
    cross = flatten_levels(cross_feats, masks)[0] if cross_feats is not None else None
    kp = kp_memory = None
    if not cfg.keypoints:
        dec_memory = memory if cross is None else cross
    else:  # kp_only: detection reads the main projector, keypoints the second one; else both read the second
        dec_memory = memory if cross is None or cfg.dual_projector_kp_only else cross
        kp_memory = dec_memory if cross is None else cross
        kp = keypoints.query_initializer(p["keypoint_query_initializer"], tgt)
    registers = cfg.num_decoder_registers
    if registers:  # check_supported: no keypoint tokens here
        tgt_r = with_registers(tgt, p["register_tokens"], groups)
        ref_r = with_registers(ref, p["register_ref_points"], groups)
        hs = decoder(
            p["decoder"], tgt_r, ref_r, dec_memory, mask, shapes, ratios, cfg, groups, checkpointed=checkpointed
        )[0]
        out["hs"] = drop_registers(hs, groups, registers)
        return out
    hs, kp_hs = decoder(
        p["decoder"], tgt, ref, dec_memory, mask, shapes, ratios, cfg, groups, kp, kp_memory, checkpointed
    )
    out["hs"] = hs
    if cfg.keypoints:
        out["kp_hs"] = kp_hs
        out["enc_keypoints"] = keypoints.encoder_keypoints(p, memory_ts, boxes_ts, groups)
    return out


# ---------------------------------------------------------------- parameters


def _layer_init(cfg: ModelConfig, gen: torch.Generator) -> Params:
    d, ff = cfg.hidden_dim, cfg.dim_feedforward
    layer = {
        "self_attn": {
            "in_proj_weight": nn.xavier_uniform((3 * d, d), gen),
            "in_proj_bias": torch.zeros(3 * d),
            "out_proj": {"weight": nn.xavier_uniform((d, d), gen), "bias": torch.zeros(d)},
        },
        "norm1": nn.norm_init(d),
        "cross_attn": msda_init(cfg, gen),
        "linear1": xavier_linear(ff, d, gen),
        "linear2": xavier_linear(d, ff, gen),
        "norm2": nn.norm_init(d),
        "norm3": nn.norm_init(d),
    }
    return keypoints.layer_params(layer, cfg, gen) if cfg.keypoints else layer


def init(cfg: ModelConfig, gen: torch.Generator) -> Params:
    """Decoder and per-group encoder projections; the encoder class/box heads are added by the detector
    (upstream makes them deep copies of `class_embed` / `bbox_embed`)."""
    d = cfg.hidden_dim
    registers = {}
    if cfg.num_decoder_registers:
        registers = {
            "register_tokens": torch.randn(cfg.num_decoder_registers, d, generator=gen),
            "register_ref_points": torch.zeros(cfg.num_decoder_registers, 4),
        }
    dec: Params = {}
    if cfg.keypoints:
        dec["keypoint_pos_embed"] = nn.xavier_uniform((sum(cfg.num_keypoints_per_class), d), gen)
    dec["layers"] = {str(i): _layer_init(cfg, gen) for i in range(cfg.dec_layers)}
    dec["norm"] = nn.norm_init(d)
    dec["ref_point_head"] = {"layers": {"0": xavier_linear(d, 2 * d, gen), "1": xavier_linear(d, d, gen)}}
    return {
        **registers,
        "decoder": dec,
        "enc_output": {str(g): xavier_linear(d, d, gen) for g in range(cfg.group_detr)},
        "enc_output_norm": {str(g): nn.norm_init(d) for g in range(cfg.group_detr)},
    }
