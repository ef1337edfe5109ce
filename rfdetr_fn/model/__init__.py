"""The RF-DETR network as pure functions: backbone, projector, transformer, heads, postprocess."""
