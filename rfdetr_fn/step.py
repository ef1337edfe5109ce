"""The train step: one pure function `(state, batches) -> (state, metrics)`, compiled piece by piece.

`TrainState` is a plain dict pytree so torch.compile, DCP checkpoints and tree utilities all see the
same structure:

    {"step": int64 0-dim, "seed": int64 0-dim, "params": tree, "opt_state": {...}, "ema_state": {...} | {},
     "loss_scale": float 0-dim, "good_steps": int64 0-dim}

The step has two pure pieces around the gradient. `loss` runs, per micro-batch, the forward pass, the
Hungarian matching (an opaque custom op, so it does not split the graph; the scipy backend copies the
costs to the host, the step's only sync) and the criterion; autograd differentiates it (see
`grad_and_value`). `update` sums the micro-batch gradients, averages them across ranks (one functional
all-reduce over a flat buffer), clips by global norm, applies the scheduled AdamW update and the EMA.
`compile_step` compiles each piece as one fullgraph function (the loss with nested regions per block
kind, its backward by AOTAutograd); gradient-accumulation micro-batches are unrolled into `update`, so
its graph depends on grad_accum_steps and on the shapes only; the step number, learning rate and EMA
decay are tensors and never cause a recompile.

Randomness (drop path, mask point sampling) is an input too: every draw is a hash of a key derived from
(state seed, step, rank, micro-batch) (`rfdetr_fn.rng`), never torch's global generator, so
`step(state, batches)` is a pure function by itself, eagerly and compiled: the same inputs give the same
outputs, and the input state is never modified.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from rfdetr_fn import compiler, rng, tree
from rfdetr_fn.config import ModelConfig, TrainConfig
from rfdetr_fn.data.loader import TARGET_KEYS
from rfdetr_fn.losses.config import LossConfig
from rfdetr_fn.losses.criterion import criterion
from rfdetr_fn.model import detector, lora
from rfdetr_fn.model.precision import forward
from rfdetr_fn.optim import chain as gt
from rfdetr_fn.optim import ema as ema_lib
from rfdetr_fn.optim import recipe, schedules

TrainState = dict[str, Any]
Batch = dict[str, Tensor]


def init_state(
    params: tree.Params,
    tcfg: TrainConfig,
    cfg: ModelConfig | None = None,
    *,
    optimizer: gt.GradientTransformation | None = None,
    trainable: tree.Where | None = None,
) -> TrainState:
    """A fresh train state; optimizer and EMA state are copies, never aliases, of the params.

    The optimizer state covers the trainable leaves only (`recipe.trainable`: freezing, LoRA); pass the
    model config when those are on, and the same `optimizer` as `make_train_step` when it is custom.
    """
    device = next(tree.leaves(params)).device
    cfg = cfg or ModelConfig()
    where = trainable if trainable is not None else recipe.trainable(cfg, tcfg)
    trainable, _ = _split(params, where)
    if optimizer is None:
        optimizer = recipe.make_optimizer(cfg, tcfg, tree.flatten(trainable))
    return {
        "step": torch.zeros((), dtype=torch.int64, device=device),
        "seed": rng.key_tensor(tcfg.seed, device),
        "params": params,
        "opt_state": optimizer.init(trainable),
        "ema_state": ema_lib.ema_init(params) if tcfg.use_ema else {},
        "loss_scale": torch.full((), 2.0**16, device=device),
        "good_steps": torch.zeros((), dtype=torch.int64, device=device),  # finite steps since the last overflow
    }


def _split(params: tree.Params, where: tree.Where | None) -> tuple[tree.Params, tree.Params]:
    """(trainable, frozen); everything trains when `where` is None."""
    return (params, {}) if where is None else tree.partition(params, where)


def param_names(cfg: ModelConfig) -> list[str]:
    """Every leaf of the model's params tree: upstream's keys, plus the DoRA adapters with backbone_lora."""
    shapes = detector.param_shapes(cfg)
    return list(shapes) + (list(lora.adapter_shapes(shapes)) if cfg.backbone_lora else [])


def make_train_step(
    cfg: ModelConfig,
    tcfg: TrainConfig,
    *,
    steps_per_epoch: int,
    precision: str = "fp32",
    world_size: int = 1,
    optimizer: gt.GradientTransformation | None = None,
    trainable: tree.Where | None = None,
    rank: int = 0,
) -> Callable[[TrainState, Sequence[Batch]], tuple[TrainState, dict[str, Tensor]]]:
    """Bind the static configuration and return the pure step (compile it with `compile_step`).

    `rank` enters the random key, so drop path differs across the data shards of one step.

    `optimizer` replaces the one `train.optimizer` names (any chain of gradient transformations; it
    gets `step=` for its schedules). Only the leaves `trainable` selects (default `recipe.trainable`:
    freezing, LoRA) get gradients; pass the same `trainable` and `optimizer` to `init_state`.

    The step is two pure pieces around the gradient: `loss` (forward + criterion of one micro-batch) and
    `update` (accumulate, average across ranks, clip, optimizer, EMA). The returned function carries them
    as `.pieces`, so `compile_step` can compile each on its own (the regional structure).
    """
    schedule = functools.partial(schedules.lr_factor, **schedules.lr_kwargs(tcfg, steps_per_epoch))
    lcfg = LossConfig.resolve(cfg, tcfg)  # once per step function: the criterion reads only this
    weighted = set(lcfg.weights)
    where = trainable if trainable is not None else recipe.trainable(cfg, tcfg)
    if optimizer is None:
        names = [n for n in param_names(cfg) if where is None or tree.matcher(where)(n, None)]
        optimizer = recipe.make_optimizer(cfg, tcfg, names, schedule)

    def loss(
        trainable: tree.Params,
        frozen: tree.Params,
        batch: Batch,
        scale: Tensor,
        key: Tensor,
        window: Tensor | None = None,
    ):
        params = tree.combine(trainable, frozen)
        own = _num_boxes(batch["labels"], cfg.group_detr, world_size)
        num_boxes = own if window is None else window
        out = forward(
            params,
            batch["images"],
            batch["mask"],
            cfg,
            precision,
            train=True,
            drop_path=tcfg.drop_path,
            key=rng.mix(key, 0),
        )
        targets = {k: batch[k] for k in TARGET_KEYS if k in batch}
        total, losses = criterion(out, targets, cfg, lcfg, train=True, num_boxes=num_boxes, key=rng.mix(key, 1))
        value = total * scale
        if window is not None:  # log what upstream logs: this micro-batch's terms over its own normaliser
            total, losses = _renormalise(total, losses, window / own, weighted)
        return value, (total, losses)

    def normalisers(batches: Sequence[Batch]) -> list[Tensor]:
        window = _window_normaliser([_num_boxes(b["labels"], cfg.group_detr, world_size) for b in batches])
        return [window] * len(batches)

    def update(
        state: TrainState,
        trainable: tree.Params,
        grads_list: list[tree.Params],
        losses_list: list[dict[str, Tensor]],
    ) -> tuple[TrainState, dict[str, Tensor]]:
        params, step, count = state["params"], state["step"], len(grads_list)
        scale = state["loss_scale"] if precision == "fp16" else torch.ones_like(state["loss_scale"])
        grads = grads_list[0]
        for more in grads_list[1:]:
            grads = tree.map_(torch.add, grads, more)
        loss_sums = {k: sum(losses[k] for losses in losses_list) / count for k in losses_list[0]}
        divisor = 1 if cfg.keypoints else count  # keypoints: the window normaliser already averaged
        if divisor > 1 or precision == "fp16":  # else the divisor is exactly 1: skip a pass per tensor
            grads = tree.map_(lambda g: g / (divisor * scale), grads)
        if world_size > 1:  # the logged losses ride along: the global batch's, not rank 0's shard
            averaged = all_reduce_mean({"grads": grads, "losses": loss_sums})
            grads, loss_sums = averaged["grads"], averaged["losses"]
        grads, grad_norm = gt.global_norm_clip(grads, tcfg.clip_max_norm)
        finite = torch.isfinite(grad_norm)  # one non-finite gradient makes the global norm non-finite
        lr_factor = schedule(step)
        updates, new_opt = optimizer.update(grads, state["opt_state"], trainable, step=step)
        del grads  # eager memory: each of these trees is the model's size; drop it as soon as it is used
        new_params = tree.replace(params, tree.flatten(gt.apply_updates(trainable, updates)))
        del updates
        if precision == "fp16":  # skip the update on overflow and adapt the loss scale, like GradScaler
            new_params = tree.map_(lambda n, o: torch.where(finite, n, o), new_params, params)
            new_opt = tree.map_(lambda n, o: torch.where(finite, n, o), new_opt, state["opt_state"])
        new_state = {**state, "step": step + 1, "params": new_params, "opt_state": new_opt}
        if precision == "fp16":
            new_state["loss_scale"], new_state["good_steps"] = _next_loss_scale(
                state["loss_scale"], state["good_steps"], finite, tcfg.loss_scale_growth_interval
            )
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

    return assemble_step(
        StepPieces(
            loss=loss,
            update=update,
            split=functools.partial(_split, where=where),
            fp16=precision == "fp16",
            rank=rank,
            normalisers=normalisers if cfg.keypoints else None,
        )
    )


@attrs.frozen
class StepPieces:
    """The step's pure pieces: `loss(trainable, frozen, batch, scale, key[, window])`, `update(state,
    trainable, grads_list, losses_list)` and `split(params) -> (trainable, frozen)`; `rank` enters the random key.
    `normalisers(batches)`, when set (keypoint models), gives each micro-batch's loss normaliser (the
    accumulation window's total box count), passed to `loss` as `window`."""

    loss: Callable
    update: Callable
    split: Callable
    fp16: bool = False
    rank: int = 0
    normalisers: Callable | None = None


def assemble_step(pieces: StepPieces) -> Callable[[TrainState, Sequence[Batch]], tuple[TrainState, dict]]:
    """The step from its pieces: per micro-batch loss and gradient, then one update.

    Gradient-accumulation micro-batches are unrolled into the update, so its graph depends on
    grad_accum_steps and the shapes only; the step number, learning rate and EMA decay are tensors.
    """
    grad_fn = grad_and_value(pieces.loss)

    def train_step(state: TrainState, batches: Sequence[Batch]) -> tuple[TrainState, dict[str, Tensor]]:
        scale = state["loss_scale"] if pieces.fp16 else torch.ones_like(state["loss_scale"])
        trainable, frozen = pieces.split(state["params"])
        key = rng.mix(state["seed"], state["step"], pieces.rank)
        grads_list, losses_list = [], []
        windows = pieces.normalisers(batches) if pieces.normalisers is not None else None
        for i, batch in enumerate(batches):
            extra = () if windows is None else (windows[i],)
            grads, (_, (total, losses)) = grad_fn(trainable, frozen, batch, scale, rng.mix(key, i), *extra)
            grads_list.append(grads)
            losses_list.append({"loss": total.detach(), **{k: v.detach() for k, v in losses.items()}})
        return pieces.update(state, trainable, grads_list, losses_list)  # the split above, not a second one

    train_step.pieces = pieces  # type: ignore[attr-defined]
    return train_step


def grad_and_value(loss_fn: Callable[..., tuple[Tensor, Any]]) -> Callable[..., tuple[tree.Params, tuple]]:
    """`torch.func.grad_and_value(loss_fn, has_aux=True)` over a params tree, by the cheaper mechanism.

    Under torch.compile (the whole-step mode of `compile_step`) it is torch.func, which Dynamo traces into
    the step's one graph. The regional mode calls it eagerly around a compiled loss, so autograd runs
    AOTAutograd's compiled forward and backward. Run eagerly,
    torch.func wraps every op of the forward and backward; plain `torch.autograd.grad` on detached leaf
    views gives the same gradients with a faster backward and a lower peak (measured in
    benchmarks/RESULTS.md). Unused parameters get zero gradients, as torch.func gives them.
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


def compile_step(
    step_fn: Callable,
    *,
    enabled: bool = True,
    max_shapes: int = 8,
    backend: str = "inductor",
    regional: bool = True,
    mode: str | None = None,
    update: bool = True,
    regions: bool | None = None,
) -> Callable:
    """torch.compile a step from `make_train_step`, by default piece by piece (loss, update).

    regional (default): `loss` and `update` are each one fullgraph compiled function and autograd runs
    between them; AOTAutograd compiles the loss's backward. `regions` turns on the nested compile regions
    (each block kind traced and compiled once); None = only for backends other than inductor: with inductor
    (torch 2.13, CPU) the regions' backward returns wrong LayerNorm weight gradients for repeated ViT blocks
    (up to 110 % off, tiny preset; benchmarks/RESULTS.md), so the inductor step compiles every block inline.
    whole: one fullgraph function with torch.func inside (the markers are
    switched off process-wide: they do not compose with torch.func under compile); slower to compile.
    update=False (regional only) keeps the optimizer/clip/EMA piece eager: a first compile about half as
    long (its per-tensor Python traces slowly), but the step loses what the fused update wins (RESULTS.md).
    Every new input shape (a multi-scale size) compiles once more; `max_shapes` raises Dynamo's limit.
    """
    if not enabled:
        return step_fn
    compiler.raise_recompile_limit(max_shapes)
    pieces = getattr(step_fn, "pieces", None)
    if regional and pieces is not None:
        compiler.set_regions(backend, regions)
        loss = compiler.compile_fn(pieces.loss, backend=backend, mode=mode)
        compiled_update = compiler.compile_fn(pieces.update, backend=backend, mode=mode) if update else pieces.update
        return assemble_step(attrs.evolve(pieces, loss=loss, update=compiled_update))
    compiler.SWITCH.regions = False
    return compiler.compile_fn(step_fn, backend=backend, mode=mode)


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


def _next_loss_scale(scale: Tensor, good_steps: Tensor, finite: Tensor, interval: int) -> tuple[Tensor, Tensor]:
    """GradScaler's rule: halve on overflow; double after `interval` finite steps in a row (then count anew)."""
    good = torch.where(finite, good_steps + 1, torch.zeros_like(good_steps))
    grow = good >= interval
    scale = torch.where(finite, torch.where(grow, scale * 2.0, scale), scale * 0.5)
    return scale, torch.where(grow, torch.zeros_like(good), good)
