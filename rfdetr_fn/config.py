"""Frozen attrs configs: everything that shapes the network, the training run, the data and evaluation.

Configs are values, not objects with behaviour: they are hashed into compile caches, written to
`training_config.json`, and turned into the command line by tyro. Every check runs at construction,
so a bad value fails early with the field's name.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import attrs

from rfdetr_fn.errors import UserError

Encoder = Literal[
    "dinov2_windowed_small",
    "dinov2_windowed_base",
    "dinov2_registers_windowed_small",
    "dinov2_registers_windowed_base",
]
Level = Literal["P3", "P4", "P5"]

_ENCODER_DEFAULTS = {"small": (384, 6), "base": (768, 12)}
# Upstream's class name per preset: "RFDETR" + the name in title case, but for the two XLarge spellings.
_PRESETS = ("nano", "small", "medium", "large", "base", "large_deprecated", "seg_preview", "seg_nano", "seg_small",
            "seg_medium", "seg_large", "seg_xlarge", "seg_2xlarge", "keypoint_preview")  # fmt: skip
_SPELLED = {"seg_xlarge": "RFDETRSegXLarge", "seg_2xlarge": "RFDETRSeg2XLarge"}
UPSTREAM_NAMES = {n: _SPELLED.get(n, "RFDETR" + n.title().replace("_", "")) for n in _PRESETS}


class ConfigError(UserError, ValueError):
    """An impossible or refused configuration; the message names the file, section and key."""


def _finite_floats(inst) -> None:
    """NaN or infinity in a float field (`--train.lr nan`) would only surface as a diverged run."""
    for att in attrs.fields(type(inst)):
        value = getattr(inst, att.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"{att.name}={value} must be finite")


def _json(value) -> str:
    import json

    return json.dumps(value)


def _positive(inst, att, value) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{att.name}={value} must be positive")


def _non_negative(inst, att, value) -> None:
    if value < 0:
        raise ValueError(f"{att.name}={value} must be >= 0")


def _positive_or_auto(inst, att, value) -> None:
    if value != "auto":
        _positive(inst, att, value)


def _aug_config(value):
    """A custom augmentation config (dict from a config file, or JSON text) -> checked JSON text."""
    return None if value is None else check_aug_config(value)


def _unit_interval(inst, att, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{att.name}={value} must lie in [0, 1]")


@attrs.frozen(kw_only=True)
class ModelConfig:
    """Detector architecture (one preset per upstream variant; every field can be overridden)."""

    name: str = "nano"
    """Preset name; upstream's model_name is derived from it when weights are saved."""
    encoder: Encoder = "dinov2_windowed_small"
    """ViT backbone family; '_registers_' adds 4 register tokens."""
    vit_hidden_size: int | None = attrs.field(default=None, validator=_positive)
    """ViT width; None takes the encoder's (384 small, 768 base)."""
    vit_num_layers: int = attrs.field(default=12, validator=_positive)
    """ViT depth."""
    vit_num_heads: int | None = attrs.field(default=None, validator=_positive)
    """ViT attention heads; None takes the encoder's (6 small, 12 base)."""
    vit_mlp_ratio: int = attrs.field(default=4, validator=_positive)
    """ViT MLP width as a multiple of its hidden size."""
    patch_size: int = attrs.field(default=16, validator=_positive)
    """ViT patch side in pixels."""
    num_windows: int = attrs.field(default=2, validator=_positive)
    """Windows per image side for windowed attention (1 = no windowing)."""
    out_feature_indexes: tuple[int, ...] = (3, 6, 9, 12)
    """ViT stages fed to the projector (stage k = output of block k-1)."""
    projector_scale: tuple[Level, ...] = ("P4",)
    """Feature levels built by the projector."""
    hidden_dim: int = attrs.field(default=256, validator=_positive)
    """Decoder width d."""
    dec_layers: int = attrs.field(default=2, validator=_positive)
    """Decoder layers."""
    sa_nheads: int = attrs.field(default=8, validator=_positive)
    """Decoder self-attention heads."""
    ca_nheads: int = attrs.field(default=16, validator=_positive)
    """Decoder deformable cross-attention heads."""
    dec_n_points: int = attrs.field(default=2, validator=_positive)
    """Sampling points per head and level in deformable attention."""
    dim_feedforward: int = attrs.field(default=2048, validator=_positive)
    """Decoder FFN width."""
    num_queries: int = attrs.field(default=300, validator=_positive)
    """Object queries per group."""
    num_select: int = attrs.field(default=300, validator=_positive)
    """Detections kept by postprocess (top-k over queries x classes)."""
    group_detr: int = attrs.field(default=13, validator=_positive)
    """Query groups used in training (1 at inference)."""
    two_stage: bool = True
    """Encoder proposals seed the decoder's reference boxes."""
    bbox_reparam: bool = True
    """Boxes are deltas relative to a reference box."""
    lite_refpoint_refine: bool = True
    """Every decoder layer predicts relative to the same initial reference."""
    layer_norm: bool = True
    """Projector uses channel LayerNorm (upstream's only supported setting)."""
    resolution: int = attrs.field(default=384, validator=_positive)
    """Square input side; must be divisible by patch_size * num_windows."""
    positional_encoding_size: int | None = attrs.field(default=None, validator=_positive)
    """ViT position table side; None = resolution // patch_size."""
    num_classes: int = attrs.field(default=90, validator=_positive)
    """Foreground classes; the class head has num_classes + 1 outputs."""
    num_channels: int = attrs.field(default=3, validator=_positive)
    """Input channels."""
    segmentation_head: bool = False
    """Adds the instance-mask head."""
    mask_downsample_ratio: int = attrs.field(default=4, validator=_positive)
    """Mask logits are predicted at 1/ratio of the input size."""
    num_decoder_registers: int = attrs.field(default=0, validator=_non_negative)
    """Learned register tokens appended to every query group in the decoder, dropped from the outputs."""
    backbone_lora: bool = False
    """Train DoRA adapters (lora_rank, lora_alpha) on the ViT's query/key/value instead of the ViT itself."""
    lora_rank: int = attrs.field(default=16, validator=_positive)
    """LoRA adapter rank (upstream 16). Adapters in params must have this rank."""
    lora_alpha: float = attrs.field(default=16.0, validator=_positive)
    """LoRA alpha: the update is scaled by lora_alpha / lora_rank (upstream 16)."""
    lora_dora: bool = True
    """DoRA (magnitude vectors, upstream) rather than plain LoRA adapters."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (ViT blocks as upstream, and the decoder layers, two-stage
    groups and heads): less memory, same numbers, slower."""
    use_grouppose_keypoints: bool = False
    """Adds upstream's GroupPose keypoint branch (needs num_keypoints_per_class)."""
    num_keypoints_per_class: tuple[int, ...] = ()
    """Keypoint schema: keypoints of class 0, 1, ... (classes past the end have none)."""
    keypoint_names: tuple[str, ...] = ()
    """Names of every keypoint, class after class (sum(num_keypoints_per_class) of them), or empty."""
    keypoint_skeleton: tuple[int, ...] = ()
    """Edges drawn between keypoints on predictions, flat [a0, b0, a1, b1, ...]: 0-based indices into the
    keypoints listed class after class (fit fills it from the COCO categories' `skeleton`)."""
    dual_projector: bool = False
    """A second projector (`backbone.0.cross_attn_projector`) feeds cross-attention."""
    dual_projector_kp_only: bool = False
    """With dual_projector: only the keypoint cross-attention reads the second projector."""
    keypoint_cross_attn: bool = True
    """Keypoint tokens cross-attend (deformable) to the image features in every decoder layer."""
    inter_instance_kp_attn: bool = False
    """Upstream's attention across instances per keypoint (not supported: upstream never enables it)."""
    grouppose_keypoint_dim_downscale: int = attrs.field(default=1, validator=_positive)
    """Keypoint token width = hidden_dim / this (only 1 is supported, upstream's only setting)."""
    postprocess_trace_alpha: float = attrs.field(default=0.2, validator=_non_negative)
    """Keypoint models: detection score fused with exp(-alpha * log trace of the keypoint covariance)."""

    def __attrs_post_init__(self) -> None:
        _finite_floats(self)
        block = self.patch_size * self.num_windows
        if self.resolution % block:
            raise ValueError(
                f"resolution={self.resolution} must be divisible by patch_size*num_windows = "
                f"{self.patch_size}*{self.num_windows} = {block}"
            )
        if self.vit_width % self.vit_heads:
            raise ValueError(f"vit_hidden_size={self.vit_width} must be divisible by vit_num_heads={self.vit_heads}")
        for heads in ("sa_nheads", "ca_nheads"):
            if self.hidden_dim % getattr(self, heads):
                raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by {heads}={getattr(self, heads)}")
        idx = self.out_feature_indexes
        if not idx or list(idx) != sorted(set(idx)) or idx[0] < 1 or idx[-1] > self.vit_num_layers:
            raise ValueError(
                f"out_feature_indexes={idx} must be strictly increasing stages in 1..{self.vit_num_layers}"
            )
        if not self.projector_scale or list(self.projector_scale) != sorted(set(self.projector_scale)):
            raise ValueError(f"projector_scale={self.projector_scale} must be distinct levels in P3<P4<P5 order")
        if self.num_select > self.num_queries * (self.num_classes + 1):
            raise ValueError(
                f"num_select={self.num_select} exceeds num_queries*(num_classes+1)="
                f"{self.num_queries * (self.num_classes + 1)}"
            )
        check_keypoint_fields(self)
        if self.segmentation_head and self.resolution % (self.mask_downsample_ratio):
            raise ValueError(
                f"resolution={self.resolution} must be divisible by mask_downsample_ratio={self.mask_downsample_ratio}"
            )

    # Derived quantities: one place for every formula that other modules need.
    @property
    def keypoints(self) -> bool:
        """The model predicts keypoints (GroupPose branch on)."""
        return self.use_grouppose_keypoints

    @property
    def vit_width(self) -> int:
        return self.vit_hidden_size or _ENCODER_DEFAULTS[self.encoder.rsplit("_", 1)[1]][0]

    @property
    def vit_heads(self) -> int:
        return self.vit_num_heads or _ENCODER_DEFAULTS[self.encoder.rsplit("_", 1)[1]][1]

    @property
    def num_registers(self) -> int:
        return 4 if "_registers_" in self.encoder else 0

    @property
    def pe_size(self) -> int:
        return self.positional_encoding_size or self.resolution // self.patch_size

    @property
    def block_size(self) -> int:
        """Input sides must be multiples of this (patch_size * num_windows)."""
        return self.patch_size * self.num_windows

    @property
    def full_attention_blocks(self) -> tuple[int, ...]:
        """Blocks numbered like the out-feature stages run full attention (upstream's off-by-one)."""
        n = self.out_feature_indexes[-1] + 1
        return tuple(i for i in range(n) if i in self.out_feature_indexes and i < self.vit_num_layers)

    @property
    def num_levels(self) -> int:
        return len(self.projector_scale)

    @property
    def num_logits(self) -> int:
        """Class-head width: num_classes + 1 (the last column is never a positive target)."""
        return self.num_classes + 1

    @property
    def model_name(self) -> str:
        """Upstream's class name, stored in checkpoints so upstream's from_checkpoint picks the variant."""
        return UPSTREAM_NAMES.get(self.name, "RFDETR" + self.name.title().replace("_", ""))


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Optimisation and loop settings (upstream's TrainConfig defaults unless noted)."""

    lr: float = attrs.field(default=1e-4, validator=_positive)
    """Peak learning rate for the decoder, heads and projector."""
    lr_encoder: float = attrs.field(default=1.5e-4, validator=_positive)
    """Base learning rate of the ViT before layer-wise decay."""
    weight_decay: float = attrs.field(default=1e-4, validator=_non_negative)
    """AdamW weight decay."""
    lr_vit_layer_decay: float = attrs.field(default=0.8, validator=_unit_interval)
    """Per-layer LR decay of the ViT (deeper layers learn faster)."""
    lr_component_decay: float = attrs.field(default=0.7, validator=_unit_interval)
    """LR factor of the decoder (and squared, of the ViT)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    optimizer: str = "adamw"
    """adamw (upstream's recipe), adam, sgd, or 'module:function' returning a GradientTransformation
    (called with cfg, tcfg, groups, schedule; see rfdetr_fn.optim.recipe.make_optimizer)."""
    optimizer_kwargs: str = attrs.field(default="{}", converter=lambda v: v if isinstance(v, str) else _json(v))
    """JSON object of extra optimizer arguments, e.g. '{"momentum": 0.9}' for sgd."""
    allow_code_import: bool = False
    """Let an experiment file's optimizer 'module:function' import Python code (command line only: a
    config file cannot set this)."""
    freeze_encoder: bool = False
    """Train everything but the ViT encoder (no gradients and no optimizer state for it)."""
    eps: float = attrs.field(default=1e-8, validator=_positive)
    """AdamW epsilon."""
    batch_size: int | Literal["auto"] = attrs.field(default=4, validator=_positive_or_auto)
    """Images per micro-batch; 'auto' probes the largest that fits (see auto_batch_*)."""
    grad_accum_steps: int = attrs.field(default=1, validator=_positive)
    """Micro-batches per optimizer step."""
    eval_batch_size: int | None = attrs.field(default=None, validator=_positive)
    """Evaluation batch size; None = batch_size."""
    epochs: int = attrs.field(default=100, validator=_positive)
    """Training epochs."""
    max_steps: int | None = attrs.field(default=None, validator=_positive)
    """Stop after this many optimizer steps (None = run all epochs)."""
    warmup_epochs: float = attrs.field(default=0.0, validator=_non_negative)
    """Linear LR warm-up length in epochs."""
    lr_scheduler: Literal["step", "cosine"] = "step"
    """LR schedule after warm-up."""
    lr_drop: int = attrs.field(default=100, validator=_positive)
    """'step' schedule: epoch at which the LR drops tenfold."""
    lr_min_factor: float = attrs.field(default=0.0, validator=_unit_interval)
    """'cosine' schedule: final LR as a fraction of the peak."""
    clip_max_norm: float = attrs.field(default=0.1, validator=_non_negative)
    """Global gradient-norm clip (0 disables)."""
    use_ema: bool = True
    """Keep an exponential moving average of the weights (evaluated by default)."""
    ema_decay: float = attrs.field(default=0.993, validator=_unit_interval)
    """EMA decay reached after warm-up."""
    ema_tau: float = attrs.field(default=100.0, validator=_positive)
    """EMA warm-up constant in optimizer steps."""
    ema_update_interval: int = attrs.field(default=1, validator=_positive)
    """Update the EMA every this many optimizer steps."""
    drop_path: float = attrs.field(default=0.0, validator=_unit_interval)
    """Stochastic depth of the last ViT layer (linear from 0 over layers)."""
    multi_scale: Literal["off", "per-batch", "per-sample"] = "per-batch"
    """Multi-scale training mode."""
    expanded_scales: bool = True
    """Use the wider scale menu (offsets -5..5 instead of -3..4)."""
    scale_jitter: bool = True
    """Randomly choose between square resize and resize-crop-resize."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on CUDA with compute capability >= 8 (fp16 below) and on a CPU with AMX-BF16 or
    AVX512-BF16, fp32 on other CPUs; bf16 runs on any CPU, fp16 on CUDA only (rfdetr_fn.model.precision)."""
    loss_scale_growth_interval: int = attrs.field(default=2000, validator=_positive)
    """fp16: double the loss scale after this many finite steps since the last overflow (GradScaler's rule)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the train step (regional: each block kind compiles once); auto = on for the device
    types where benchmarks/compile.py measured a win (rfdetr_fn.compiler.MEASURED)."""
    compile_cache: str | None = None
    """Directory of compiled artifacts reused by later runs of the same config; None = $RFDETR_FN_CACHE or
    ~/.cache/rfdetr_fn/compile."""
    cls_loss_coef: float | None = None
    """Weight of the IA-BCE classification loss; None = upstream's per task: 2 for keypoint models, else 1."""
    bbox_loss_coef: float = 5.0
    """Weight of the L1 box loss."""
    giou_loss_coef: float = 2.0
    """Weight of the GIoU loss."""
    mask_ce_loss_coef: float = 5.0
    """Weight of the mask BCE loss (segmentation)."""
    mask_dice_loss_coef: float = 5.0
    """Weight of the mask dice loss (segmentation)."""
    keypoint_l1_loss_coef: float = 1.0
    """Weight of the keypoint L1 loss (also its matcher cost weight, like upstream)."""
    keypoint_findable_loss_coef: float = 1.0
    """Weight of the keypoint 'findable' (v > 0) BCE loss and matcher cost."""
    keypoint_visible_loss_coef: float = 1.0
    """Weight of the keypoint 'visible' (v = 2) BCE loss and matcher cost."""
    keypoint_nll_loss_coef: float = 1.0
    """Weight of the keypoint Gaussian NLL (under the predicted precision) loss and matcher cost."""
    mask_point_sample_ratio: int = attrs.field(default=16, validator=_positive)
    """Mask losses sample H*W/ratio points."""
    set_cost_class: float = 2.0
    """Matcher weight of the focal class cost."""
    set_cost_bbox: float = 5.0
    """Matcher weight of the L1 box cost."""
    set_cost_giou: float = 2.0
    """Matcher weight of the GIoU cost."""
    focal_alpha: float = 0.25
    """Focal/IA-BCE alpha."""
    matcher_backend: Literal["auto", "scipy", "device"] = "auto"
    """Hungarian matching solver: scipy on the host, or the exact device solver (no host round trip,
    required by cuda_graphs); auto = device on CUDA, scipy on CPU."""
    cuda_graphs: bool = False
    """Capture the whole train step as one CUDA graph per input size and replay it (CUDA only; needs the
    device matcher; falls back to the plain step with a message where it cannot)."""
    ia_bce_loss: bool = True
    """IoU-aware BCE classification loss; false = plain sigmoid focal loss (upstream's ModelConfig field)."""
    eval_interval: int = attrs.field(default=1, validator=_positive)
    """Evaluate every this many epochs (the last epoch is always evaluated)."""
    checkpoint_interval: int = attrs.field(default=10, validator=_positive)
    """Keep a numbered train-state checkpoint every this many epochs (the last one is always kept)."""
    save_every_n_steps: int | None = attrs.field(default=None, validator=_positive)
    """Also save the train state (last/) every this many optimizer steps mid-epoch, so a kill loses minutes,
    not an epoch (None: at epoch ends only)."""
    eval_base_model: bool = False
    """Also evaluate the non-EMA weights."""
    compute_val_loss: bool = False
    """Compute the loss on the validation split."""
    early_stopping: bool = False
    """Stop when the monitored mAP stops improving."""
    early_stopping_patience: int = attrs.field(default=10, validator=_positive)
    """Evaluations without improvement before stopping."""
    early_stopping_min_delta: float = attrs.field(default=0.001, validator=_non_negative)
    """Smallest improvement that counts."""
    early_stopping_use_ema: bool = True
    """Monitor the EMA metric when available (else the max of regular and EMA)."""
    best_model_metric: Literal["map", "mar", "kp_map", "kp_mar"] = "map"
    """Metric that picks the best checkpoint (kp_*: keypoint OKS AP/AR, keypoint models)."""
    skip_best_epochs: int = attrs.field(default=0, validator=_non_negative)
    """Ignore epochs before this one for best-model and early-stopping decisions."""
    smooth_alpha: float = attrs.field(default=0.0, validator=_unit_interval)
    """EMA smoothing of the regular metric for best-model comparison (0 = off)."""
    run_test: bool = False
    """Evaluate the best model on the test split at the end."""
    compute_test_loss: bool = True
    """With run_test: also the eval-mode loss on the test split (test/loss), as upstream."""
    notes: str | None = None
    """Free-form provenance stored in training_config.json and in every weights file's args (upstream's notes)."""
    seed: int = 0
    """Seed for weights, augmentation, sampling and the step's draws (drop path, mask points; rank is mixed in)."""
    output_dir: str = "output"
    """Where checkpoints, metrics and plots are written."""
    resume: str | None = None
    """Train-state checkpoint directory to resume from ('auto' = output_dir/last)."""
    resume_allow_changes: bool = False
    """Resume even though fields that change the training trajectory (lr, batch size, seed, data, model, ...)
    differ from the saved run's; each change is printed and recorded in config_history.jsonl."""
    overwrite: bool = False
    """Start a fresh run in an output_dir that holds an earlier run's files, deleting them first (without it,
    such a run is refused: resume it or pick another output_dir)."""
    pretrain_weights: str | None = None
    """Weights file to fine-tune from (upstream .pth/.ckpt or safetensors); None trains from scratch."""
    tensorboard: bool = True
    """Write TensorBoard events when tensorboard is installed."""
    progress_bar: bool = True
    """Show a progress bar."""
    log_every_n_steps: int = attrs.field(default=10, validator=_positive)
    """Write a metrics.csv row every this many optimizer steps."""

    # ---- experiment loggers (optional extras; see rfdetr_fn/io/loggers.py)
    wandb: bool = False
    """Also log to Weights & Biases (WANDB_MODE=offline keeps it local)."""
    mlflow: bool = False
    """Also log to MLflow (MLFLOW_TRACKING_URI, else a file store in output_dir/mlruns)."""
    project: str | None = None
    """W&B project / MLflow experiment name (None = rfdetr_fn)."""
    run: str | None = None
    """W&B / MLflow run name (None = the logger's own)."""

    # ---- augmentation, dataset grids and automatic batch size (upstream's aug_config, save_dataset_grids,
    # batch_size="auto" and auto_batch_*)
    aug_preset: Literal["default", "none", "conservative", "aggressive", "aerial", "industrial"] = "default"
    """Upstream's augmentation presets after the scale jitter: default = horizontal flip; none = no flip."""
    aug_config: str | None = attrs.field(default=None, converter=_aug_config)
    """Custom augmentation instead of a preset: {name: params} in upstream's Albumentations spelling, as a
    dict in a config file or JSON text on the command line (see README)."""
    save_dataset_grids: bool = False
    """Write PNG grids of augmented training batches (boxes drawn) to output_dir at the start of fit."""
    auto_batch_target_effective: int = attrs.field(default=16, validator=_positive)
    """batch_size auto: grad_accum_steps is raised until batch x steps x ranks reaches this (global)."""
    auto_batch_max_targets_per_image: int = attrs.field(default=100, validator=_positive)
    """batch_size auto: target slots per image in the probe batch (the worst case)."""
    auto_batch_ema_headroom: float = attrs.field(default=0.7, validator=_unit_interval)
    """batch_size auto: the probed batch is scaled by this when use_ema (EMA weights need memory too)."""

    def __attrs_post_init__(self) -> None:
        _finite_floats(self)
        if self.aug_config is not None and self.aug_preset != "default":
            raise ValueError(f"aug_preset={self.aug_preset!r} and aug_config are both set: choose one")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas} must be two values in [0, 1)")
        import json

        try:
            kwargs = json.loads(self.optimizer_kwargs)
        except ValueError as err:
            raise ValueError(f"optimizer_kwargs={self.optimizer_kwargs!r} is not JSON: {err}") from err
        if not isinstance(kwargs, dict):
            raise ValueError(f"optimizer_kwargs={self.optimizer_kwargs!r} must be a JSON object")

    @property
    def eval_batch(self) -> int:
        """Images per evaluation batch: eval_batch_size, else batch_size."""
        return self.eval_batch_size or self.batch_size


@attrs.frozen(kw_only=True)
class DataConfig:
    """Where the images come from and how they are loaded."""

    dataset_dir: str | None = None
    """Dataset root; None uses the built-in synthetic shapes dataset."""
    dataset_format: Literal["auto", "roboflow", "coco", "yolo", "synthetic"] = "auto"
    """Layout of dataset_dir; auto detects Roboflow COCO, raw COCO 2017 or YOLO."""
    class_names: tuple[str, ...] | None = None
    """Explicit class names (checked against the dataset)."""
    num_workers: int = attrs.field(default=2, validator=_non_negative)
    """DataLoader worker processes."""
    check_images: bool = True
    """Read the header of every image of every split before training and report all bad files at once
    (threads, seconds for thousands of files); --data.no-check-images skips it for huge trusted datasets."""
    synthetic_images: int = attrs.field(default=32, validator=_positive)
    """Built-in dataset: training images (valid and test get a quarter each)."""
    synthetic_classes: int = attrs.field(default=3, validator=_positive)
    """Built-in dataset: number of shape classes."""
    synthetic_size: int = attrs.field(default=128, validator=_positive)
    """Built-in dataset: image side in pixels."""


@attrs.frozen(kw_only=True)
class EvalConfig:
    """How detections are scored."""

    backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools"
    """COCOeval implementation; both give identical numbers, faster_coco_eval is faster."""
    max_dets: int = attrs.field(default=500, validator=_positive)
    """Largest max-detections threshold (COCO uses 1, 10 and this)."""
    per_class: bool = False
    """Report AP per class."""
    threshold: float = attrs.field(default=0.5, validator=_unit_interval)
    """predict: keep detections scoring above this."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the forward pass (regional, cached like the train step); auto = on inside fit when the
    train step is compiled, else where rfdetr_fn.compiler.use_compile says so for the device."""

    precision: Literal["fp32", "auto", "bf16", "fp16"] = "fp32"
    """Evaluation forward: autocast by train.precision's rule (auto = bf16 on CUDA compute capability >= 8,
    else fp16 there, upstream's fp16_eval; bf16 on a CPU with AMX-BF16/AVX512-BF16, fp32 on other CPUs);
    bf16 runs on CUDA or CPU, fp16 on CUDA only."""
    keypoint_oks_sigmas: tuple[float, ...] | None = None
    """Keypoint OKS sigmas; None = COCO's person sigmas for 17 keypoints, else 0.05 each (upstream's rule)."""

    def __attrs_post_init__(self) -> None:
        _finite_floats(self)


# The augmentations a custom `aug_config` may name (rfdetr_fn.data.augment implements them), with
# Albumentations' defaults for the parameters a config leaves out.
AUGMENTATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "HorizontalFlip": {},
    "VerticalFlip": {},
    "Rotate": {"limit": 90},
    "Affine": {"scale": (1.0, 1.0), "translate_percent": 0.0, "rotate": 0.0, "shear": 0.0},
    "ColorJitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.2},
    "RandomBrightnessContrast": {"brightness_limit": 0.2, "contrast_limit": 0.2},
    "GaussianBlur": {"blur_limit": (3, 7)},
    "GaussNoise": {"std_range": (0.2, 0.44)},
    "ToGray": {},
}


def check_aug_config(config: dict[str, Any] | str) -> str:
    """Check a custom config (a dict, or its JSON text) and return it as JSON text (hashable, CLI-friendly).

    Unknown transform names or parameters raise ValueError naming them and the supported ones."""
    values = json.loads(config) if isinstance(config, str) else config
    if not isinstance(values, dict):
        raise ValueError(f"aug_config must map transform names to parameter dicts, got {type(values).__name__}")
    for name, params in values.items():
        if name not in AUGMENTATION_DEFAULTS:
            raise ValueError(f"aug_config: unknown transform {name!r}; supported: {', '.join(AUGMENTATION_DEFAULTS)}")
        if not isinstance(params, dict):
            raise ValueError(f"aug_config[{name!r}] must be a dict of parameters, got {params!r}")
        allowed = set(AUGMENTATION_DEFAULTS[name]) | {"p"}
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(
                f"aug_config[{name!r}]: unknown parameter(s) {', '.join(sorted(unknown))}; "
                f"expected {', '.join(sorted(allowed))}"
            )
        p = params.get("p", 0.5)
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"aug_config[{name!r}]: p={p} must lie in [0, 1]")
    return json.dumps(values)


# ---------------------------------------------------------------- field groups


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
