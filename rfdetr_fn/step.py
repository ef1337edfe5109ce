"""The train step: one pure function `(state, batches) -> (state, metrics)`, compiled whole.

`TrainState` is a plain dict pytree so torch.compile, DCP checkpoints and tree utilities all see the
same structure:

    {"step": int64 0-dim, "params": tree, "opt_state": {...}, "ema_state": {...} | {}, "loss_scale": float 0-dim}

Inside one compiled graph the step runs, per micro-batch, the forward pass, the Hungarian matching (an
opaque custom op, so it does not split the graph; on CUDA it copies the cost matrix to the host, the
step's only syncs), the criterion and `torch.func.grad_and_value` (plain autograd when eager: see
`grad_and_value`); then the cross-rank gradient average (one functional all-reduce over a flat buffer),
global-norm clipping, the scheduled AdamW update and the EMA update. Gradient-accumulation micro-batches
are unrolled, so the graph depends on grad_accum_steps and on the batch shapes only; the step number,
learning rate and EMA decay are tensors and never cause a recompile.

Randomness (drop path, mask-loss point sampling) draws from torch's global generator, which the loop
reseeds from (seed, step) before every call: the step is a pure function of its inputs and that seed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from rfdetr_fn import ema as ema_lib
from rfdetr_fn import gradient_transforms as gt
from rfdetr_fn import lora, optim, schedules, transforms, tree
from rfdetr_fn.config import ModelConfig, TrainConfig
from rfdetr_fn.data.loader import TARGET_KEYS
from rfdetr_fn.loss.criterion import criterion, weight_dict
from rfdetr_fn.model import detector

TrainState = dict[str, Any]
Batch = dict[str, Tensor]


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA with compute capability >= 8, fp16 on older CUDA, fp32 elsewhere."""
    if precision != "auto":
        if precision != "fp32" and device.type != "cuda":
            raise ValueError(f"precision={precision!r} needs a CUDA device; this run is on {device.type}")
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def init_state(
    params: tree.Params,
    tcfg: TrainConfig,
    cfg: ModelConfig | None = None,
    *,
    optimizer: gt.GradientTransformation | None = None,
    trainable: transforms.Where | None = None,
) -> TrainState:
    """A fresh train state; optimizer and EMA state are copies, never aliases, of the params.

    The optimizer state covers the trainable leaves only (`optim.trainable`: freezing, LoRA); pass the
    model config when those are on, and the same `optimizer` as `make_train_step` when it is custom.
    """
    device = next(tree.leaves(params)).device
    cfg = cfg or ModelConfig()
    where = trainable if trainable is not None else optim.trainable(cfg, tcfg)
    trainable, _ = _split(params, where)
    if optimizer is None:
        optimizer = optim.make_optimizer(cfg, tcfg, tree.flatten(trainable))
    return {
        "step": torch.zeros((), dtype=torch.int64, device=device),
        "params": params,
        "opt_state": optimizer.init(trainable),
        "ema_state": ema_lib.ema_init(params) if tcfg.use_ema else {},
        "loss_scale": torch.full((), 2.0**16, device=device),
    }


def _split(params: tree.Params, where: transforms.Where | None) -> tuple[tree.Params, tree.Params]:
    """(trainable, frozen); everything trains when `where` is None."""
    return (params, {}) if where is None else transforms.partition(params, where)


def param_names(cfg: ModelConfig) -> list[str]:
    """Every leaf of the model's params tree: upstream's keys, plus the DoRA adapters with backbone_lora."""
    shapes = detector.param_shapes(cfg)
    return list(shapes) + (list(lora.adapter_shapes(shapes)) if cfg.backbone_lora else [])


def seed_for_step(seed: int, step: int, rank: int = 0) -> int:
    """The global-RNG seed used for one step; distinct per rank so drop path differs across data shards."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63)


def make_train_step(
    cfg: ModelConfig,
    tcfg: TrainConfig,
    *,
    steps_per_epoch: int,
    precision: str = "fp32",
    world_size: int = 1,
    optimizer: gt.GradientTransformation | None = None,
    trainable: transforms.Where | None = None,
) -> Callable[[TrainState, Sequence[Batch]], tuple[TrainState, dict[str, Tensor]]]:
    """Bind the static configuration and return the pure step (compile it with `compile_step`).

    `optimizer` replaces the one `train.optimizer` names (any chain of gradient transformations; it
    gets `step=` for its schedules). Only the leaves `trainable` selects (default `optim.trainable`:
    freezing, LoRA) get gradients; pass the same `trainable` and `optimizer` to `init_state`.
    """
    schedule = functools.partial(schedules.lr_factor, **schedules.lr_kwargs(tcfg, steps_per_epoch))
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    weighted = set(weight_dict(cfg, tcfg))
    where = trainable if trainable is not None else optim.trainable(cfg, tcfg)
    if optimizer is None:
        names = [n for n in param_names(cfg) if where is None or transforms.matcher(where)(n, None)]
        optimizer = optim.make_optimizer(cfg, tcfg, names, schedule)

    def loss_fn(trainable: tree.Params, frozen: tree.Params, batch: Batch, num_boxes: Tensor, scale: Tensor):
        params = transforms.combine(trainable, frozen)
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = detector.apply(params, batch["images"], batch["mask"], cfg, train=True, drop_path=tcfg.drop_path)
        out = _to_float32(out) if autocast_dtype is not None else out
        targets = {k: batch[k] for k in TARGET_KEYS if k in batch}
        total, losses = criterion(out, targets, cfg, tcfg, train=True, num_boxes=num_boxes)
        return total * scale, (total, losses)

    grad_fn = grad_and_value(loss_fn)

    def train_step(state: TrainState, batches: Sequence[Batch]) -> tuple[TrainState, dict[str, Tensor]]:
        params, step = state["params"], state["step"]
        trainable, frozen = _split(params, where)
        scale = state["loss_scale"] if precision == "fp16" else torch.ones_like(state["loss_scale"])
        grads_sum: tree.Params | None = None
        loss_sums: dict[str, Tensor] = {}
        counts = [_num_boxes(batch["labels"], cfg.group_detr, world_size) for batch in batches]
        window = _window_normaliser(counts) if cfg.keypoints else None
        for batch, count in zip(batches, counts):
            num_boxes = count if window is None else window
            grads, (_, (total, losses)) = grad_fn(trainable, frozen, batch, num_boxes, scale)
            grads_sum = grads if grads_sum is None else tree.map_(torch.add, grads_sum, grads)
            if window is not None:  # log what upstream logs: this micro-batch's terms over its own normaliser
                total, losses = _renormalise(total, losses, window / count, weighted)
            for key, value in {"loss": total, **losses}.items():
                loss_sums[key] = loss_sums.get(key, 0.0) + value.detach() / len(batches)
        grads = grads_sum
        divisor = 1 if window is not None else len(batches)  # the window normaliser already averaged
        if divisor > 1 or precision == "fp16":  # else the divisor is exactly 1: skip a pass per tensor
            grads = tree.map_(lambda g: g / (divisor * scale), grads)
        if world_size > 1:  # the logged losses ride along: the global batch's, not rank 0's shard
            averaged = all_reduce_mean({"grads": grads, "losses": loss_sums})
            grads, loss_sums = averaged["grads"], averaged["losses"]
        grads, grad_norm = optim.clip_by_global_norm(grads, tcfg.clip_max_norm)
        finite = torch.isfinite(grad_norm)  # one non-finite gradient makes the global norm non-finite
        lr_factor = schedule(step)
        updates, new_opt = optimizer.update(grads, state["opt_state"], trainable, step=step)
        new_params = transforms.replace(params, tree.flatten(gt.apply_updates(trainable, updates)))
        if precision == "fp16":  # skip the update on overflow and adapt the loss scale, like GradScaler
            new_params = tree.map_(lambda n, o: torch.where(finite, n, o), new_params, params)
            new_opt = tree.map_(lambda n, o: torch.where(finite, n, o), new_opt, state["opt_state"])
        new_state = {
            "step": step + 1,
            "params": new_params,
            "opt_state": new_opt,
            "ema_state": state["ema_state"],
            "loss_scale": _next_loss_scale(state["loss_scale"], finite, step)
            if precision == "fp16"
            else state["loss_scale"],
        }
        if tcfg.use_ema:
            new_state["ema_state"] = ema_lib.ema_maybe_update(
                state["ema_state"],
                new_params,
                step + 1,
                interval=tcfg.ema_update_interval,
                decay=tcfg.ema_decay,
                tau=tcfg.ema_tau,
            )
        metrics = {**loss_sums, "grad_norm": grad_norm.detach(), "lr_factor": lr_factor, "finite": finite}
        return new_state, metrics

    return train_step


def grad_and_value(loss_fn: Callable[..., tuple[Tensor, Any]]) -> Callable[..., tuple[tree.Params, tuple]]:
    """`torch.func.grad_and_value(loss_fn, has_aux=True)` over a params tree, by the cheaper mechanism.

    Under torch.compile it is torch.func, which Dynamo traces into the step's one graph. Run eagerly,
    torch.func wraps every op of the forward and backward; plain `torch.autograd.grad` on detached leaf
    views gives the same gradients, for Nano on CPU with a 13 % faster forward+backward and a 0.7 GiB
    lower step peak (benchmarks/RESULTS.md). Unused parameters get zero gradients, as torch.func gives them.
    """
    functional = torch.func.grad_and_value(loss_fn, has_aux=True)

    def eager(params: tree.Params, *args: Any) -> tuple[tree.Params, tuple]:
        leaves = tree.flatten(params)
        tracked = {k: v.detach().requires_grad_(True) for k, v in leaves.items()}
        with torch.enable_grad():
            value, aux = loss_fn(tree.unflatten(tracked), *args)
            grads = torch.autograd.grad(value, list(tracked.values()), allow_unused=True, materialize_grads=True)
        aux = torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, aux)
        return tree.unflatten(dict(zip(tracked, grads))), (value.detach(), aux)

    def dispatch(params: tree.Params, *args: Any) -> tuple[tree.Params, tuple]:
        return functional(params, *args) if torch.compiler.is_compiling() else eager(params, *args)

    return dispatch


def use_compile(setting: str, device: torch.device) -> bool:
    """'auto' compiles on CUDA only: on CPU each input size costs minutes of compile for little gain."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def compile_step(
    step_fn: Callable, *, enabled: bool = True, max_shapes: int = 8, backend: str = "inductor"
) -> Callable:
    """torch.compile the whole step into one graph (fullgraph: a graph break is a bug, not a slowdown).

    Every new input shape (a multi-scale size, a target-slot count) compiles one more graph, and past
    Dynamo's recompile limit (8 by default) a fullgraph function fails outright; so the process-wide
    limit is raised to `max_shapes` (never lowered). Nano's multi-scale menu alone has 11 sizes.
    """
    if not enabled:
        return step_fn
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), max_shapes))
    return torch.compile(step_fn, fullgraph=True, dynamic=False, backend=backend)


def all_reduce_mean(grads: tree.Params) -> tree.Params:
    """Average a tree of tensors (gradients, loss terms) across ranks with ONE traceable collective."""
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as fc

    flat = tree.flatten(grads)
    buffer = torch.cat([g.reshape(-1) for g in flat.values()])
    buffer = fc.all_reduce(buffer, "avg", dist.group.WORLD)
    pieces = buffer.split([g.numel() for g in flat.values()])
    return tree.unflatten({k: p.view_as(g) for (k, g), p in zip(flat.items(), pieces)})


def _num_boxes(labels: Tensor, group_detr: int, world_size: int) -> Tensor:
    """Upstream's normaliser: valid targets x groups, averaged over ranks, at least 1."""
    count = (labels >= 0).sum().to(torch.float32) * group_detr
    if world_size > 1:
        import torch.distributed as dist
        from torch.distributed import _functional_collectives as fc

        count = fc.all_reduce(count, "sum", dist.group.WORLD) / world_size
    return count.clamp(min=1.0)


def _window_normaliser(counts: list[Tensor]) -> Tensor:
    """Keypoint models (upstream's manual optimisation): every micro-batch of an accumulation window is
    normalised by the window's total box count, so the step's gradient is the gradient of the summed
    loss numerators over the whole effective batch, divided by its total count (not a mean of
    per-micro-batch means). Each count is already clamped to >= 1 and averaged over ranks, as upstream."""
    return torch.stack(counts).sum()


def _renormalise(total: Tensor, losses: dict[str, Tensor], factor: Tensor, weighted: set[str]):
    """Rescale the normalised loss terms (not the diagnostics) by `factor`."""
    scaled = {k: v * factor if k in weighted else v for k, v in losses.items()}
    return total * factor, scaled


def _next_loss_scale(scale: Tensor, finite: Tensor, step: Tensor) -> Tensor:
    grown = torch.where((step + 1) % 2000 == 0, scale * 2.0, scale)
    return torch.where(finite, grown, scale * 0.5)


def _to_float32(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    if isinstance(out, list):
        return [_to_float32(v) for v in out]
    return out
