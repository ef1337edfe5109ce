"""rfdetr_fn: RF-DETR as pure functions over parameter pytrees, with a compiled functional trainer.

import rfdetr_fn as rf
cfg = rf.presets.nano(num_classes=3)
params = rf.init(cfg, seed=0)
out = rf.apply(params, images, mask, cfg, train=False)
total, terms = rf.loss(params, batch, cfg)  # the training loss of a loader batch
"""

from rfdetr_fn import presets, tree
from rfdetr_fn.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from rfdetr_fn.deploy import export, predict
from rfdetr_fn.io.weights import load_weights, save_weights
from rfdetr_fn.losses.objective import loss
from rfdetr_fn.model.detector import apply, init, param_shapes
from rfdetr_fn.model.postprocess import postprocess

__all__ = [
    "presets",
    "tree",
    "load_weights",
    "save_weights",
    "ModelConfig",
    "TrainConfig",
    "DataConfig",
    "EvalConfig",
    "init",
    "apply",
    "loss",
    "param_shapes",
    "postprocess",
    "predict",
    "export",
]
