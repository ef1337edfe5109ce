"""Validation of ModelConfig field groups that would otherwise make config.py long (see tests/test_architecture)."""

from __future__ import annotations

from typing import Any


def check_keypoint_fields(cfg: Any) -> None:
    """ModelConfig's keypoint fields: a valid schema and only the settings upstream's keypoint preview uses."""
    schema = cfg.num_keypoints_per_class
    if any(k < 0 for k in schema):
        raise ValueError(f"num_keypoints_per_class={schema} must not be negative")
    if not cfg.use_grouppose_keypoints:
        return
    if not schema or sum(schema) == 0:
        raise ValueError("use_grouppose_keypoints=True needs num_keypoints_per_class with at least one keypoint")
    if len(schema) > cfg.num_classes:
        raise ValueError(f"num_keypoints_per_class has {len(schema)} classes but num_classes={cfg.num_classes}")
    if cfg.keypoint_names and len(cfg.keypoint_names) != sum(schema):
        raise ValueError(
            f"keypoint_names has {len(cfg.keypoint_names)} names but num_keypoints_per_class={schema} "
            f"has {sum(schema)} keypoints"
        )
    edges = cfg.keypoint_skeleton
    owner = [c for c, n in enumerate(schema) for _ in range(n)]
    if len(edges) % 2 or any(not 0 <= v < len(owner) for v in edges):
        raise ValueError(
            f"keypoint_skeleton={edges} must hold pairs of keypoint indices in 0..{len(owner) - 1} "
            f"(num_keypoints_per_class={schema})"
        )
    if any(owner[a] != owner[b] for a, b in zip(edges[0::2], edges[1::2])):
        raise ValueError(f"keypoint_skeleton={edges} joins keypoints of different classes")
    if cfg.inter_instance_kp_attn or cfg.grouppose_keypoint_dim_downscale != 1:
        raise ValueError(
            "inter_instance_kp_attn=True and grouppose_keypoint_dim_downscale != 1 are not supported "
            "(upstream's keypoint preview uses False and 1)"
        )
    if cfg.segmentation_head:
        raise ValueError("a keypoint model cannot also have segmentation_head=True")
    if cfg.num_decoder_registers:
        raise ValueError(
            "a keypoint model cannot also have num_decoder_registers > 0 yet: upstream's transformer has the "
            "path (registers get keypoint tokens too, dropped with them) but no upstream variant enables it and "
            "no golden fixture checks it"
        )
