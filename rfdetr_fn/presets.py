"""One constructor per upstream RF-DETR variant (values from upstream 1.11.2's config classes).

Each returns a frozen `ModelConfig`; keyword overrides replace any field, e.g. `nano(num_classes=3)`.
"""

from __future__ import annotations

from collections.abc import Callable

from rfdetr_fn.config import ModelConfig

_SEG = dict(segmentation_head=True, patch_size=12, num_windows=2, out_feature_indexes=(3, 6, 9, 12), dec_layers=4)
_TABLE: dict[str, dict] = {
    "nano": dict(resolution=384, dec_layers=2),
    "small": dict(resolution=512, dec_layers=3),
    "medium": dict(resolution=576, dec_layers=4),
    "large": dict(resolution=704, dec_layers=4),
    "base": dict(
        resolution=560,
        patch_size=14,
        num_windows=4,
        out_feature_indexes=(2, 5, 8, 11),
        dec_layers=3,
        positional_encoding_size=37,
    ),
    "large_deprecated": dict(
        encoder="dinov2_windowed_base",
        hidden_dim=384,
        sa_nheads=12,
        ca_nheads=24,
        dec_n_points=4,
        resolution=560,
        patch_size=14,
        num_windows=4,
        out_feature_indexes=(2, 5, 8, 11),
        dec_layers=3,
        projector_scale=("P3", "P5"),
        positional_encoding_size=37,
    ),
    "seg_preview": dict(_SEG, resolution=432, num_queries=200, num_select=200),
    "seg_nano": dict(_SEG, resolution=312, num_windows=1, num_queries=100, num_select=100),
    "seg_small": dict(_SEG, resolution=384, num_queries=100, num_select=100),
    "seg_medium": dict(_SEG, resolution=432, dec_layers=5, num_queries=200, num_select=200),
    "seg_large": dict(_SEG, resolution=504, dec_layers=5, num_queries=200, num_select=200),
    "seg_xlarge": dict(_SEG, resolution=624, dec_layers=6),
    "seg_2xlarge": dict(_SEG, resolution=768, dec_layers=6),
    "keypoint_preview": dict(
        use_grouppose_keypoints=True,
        dual_projector=True,
        dual_projector_kp_only=True,
        num_keypoints_per_class=(17,),
        patch_size=12,
        num_windows=2,
        out_feature_indexes=(3, 6, 9, 12),
        dec_layers=4,
        resolution=576,
        positional_encoding_size=48,
        num_queries=100,
        num_select=100,
    ),
}

NAMES: tuple[str, ...] = tuple(_TABLE)
"""The upstream variants; `get` also accepts "tiny" and "tiny_keypoint" (test-size models, not upstream variants)."""
_TINY = dict(
    vit_hidden_size=48,
    vit_num_layers=4,
    vit_num_heads=3,
    out_feature_indexes=(1, 2, 3, 4),
    hidden_dim=64,
    sa_nheads=4,
    ca_nheads=4,
    dim_feedforward=128,
    num_queries=20,
    num_select=20,
    group_detr=3,
    resolution=128,
    num_classes=3,
)
# The test-size keypoint model: the synthetic shapes' corners (rectangle 4, ellipse 4, triangle 3).
_TINY_KEYPOINT = dict(
    _TINY,
    use_grouppose_keypoints=True,
    dual_projector=True,
    dual_projector_kp_only=True,
    num_keypoints_per_class=(4, 4, 3),
)


def get(name: str, **overrides) -> ModelConfig:
    """The preset called `name` with `overrides` applied."""
    table = {**_TABLE, "tiny": _TINY, "tiny_keypoint": _TINY_KEYPOINT}
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(table)}")
    return ModelConfig(**{"name": name, **table[name], **overrides})


def _maker(name: str) -> Callable[..., ModelConfig]:
    def make(**overrides) -> ModelConfig:
        return get(name, **overrides)

    make.__name__ = name
    make.__doc__ = f"Upstream RF-DETR {name} config with keyword overrides."
    return make


nano = _maker("nano")
small = _maker("small")
medium = _maker("medium")
large = _maker("large")
base = _maker("base")
large_deprecated = _maker("large_deprecated")
seg_preview = _maker("seg_preview")
seg_nano = _maker("seg_nano")
seg_small = _maker("seg_small")
seg_medium = _maker("seg_medium")
seg_large = _maker("seg_large")
seg_xlarge = _maker("seg_xlarge")
seg_2xlarge = _maker("seg_2xlarge")
keypoint_preview = _maker("keypoint_preview")


tiny = _maker("tiny")
tiny_keypoint = _maker("tiny_keypoint")
