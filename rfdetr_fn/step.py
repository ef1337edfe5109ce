"""The train step: one pure function `(state, batches) -> (state, metrics)`, compiled piece by piece.

`make_train_step` builds it once, optax-style, as a `TrainStep` record: `init(params) -> state` and
`step(state, batches)` share one optimizer and one trainable selection (the record is callable as the step).

`TrainState` is a plain dict pytree so torch.compile, DCP checkpoints and tree utilities all see the
same structure:

    {"step": int64 0-dim, "seed": int64 0-dim, "params": tree, "opt_state": {...}, "ema_state": {...} | {},
     "loss_scale": float 0-dim, "good_steps": int64 0-dim}

The step has two pure pieces around the gradient. `loss` runs, per micro-batch, `rf.loss` (the forward
pass, the Hungarian matching: an opaque custom op, so it does not split the graph; the scipy backend copies
the costs to the host, the step's only sync; and the criterion); autograd differentiates it (see
`grad_and_value`). `update` sums the micro-batch gradients, averages them across ranks (one functional
all-reduce over a flat buffer), clips by global norm (built-in optimizers; a custom chain clips itself),
applies the optimizer's update (`apply_update`, one small function) and the EMA.
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
from rfdetr_fn.losses import objective
from rfdetr_fn.losses.config import LossConfig
from rfdetr_fn.model import detector, lora
from rfdetr_fn.optim import chain as gt
from rfdetr_fn.optim import ema as ema_lib
from rfdetr_fn.optim import inplace, recipe, schedules
from rfdetr_fn.optim.config import UpdateConfig

TrainState = dict[str, Any]
Batch = dict[str, Tensor]


@attrs.frozen
class TrainStep:
    """The step built once, optax-style: `init(params) -> state` and `step(state, batches) -> (state, metrics)`
    share one optimizer and one trainable selection. Calling the record calls `step`. `pieces` is what
    `compile_step` compiles (the pure loss and update around the gradient)."""

    init: Callable[[tree.Params], TrainState]
    step: Callable[[TrainState, Sequence[Batch]], tuple[TrainState, dict[str, Tensor]]]
    pieces: StepPieces
    optimizer: gt.GradientTransformation
    trainable: tree.Where | None
    cfg: ModelConfig | None = None
    settings: dict[str, Any] = attrs.field(factory=dict)
    """Everything the compiled pieces read besides the model config: the resolved `LossConfig` and
    `UpdateConfig`, drop path, precision, world size (the compile cache keys on it)."""

    def __call__(self, state: TrainState, batches: Sequence[Batch]) -> tuple[TrainState, dict[str, Tensor]]:
        return self.step(state, batches)


def param_names(cfg: ModelConfig) -> list[str]:
    """Every leaf of the model's params tree: upstream's keys, plus the adapters with backbone_lora."""
    shapes = detector.param_shapes(cfg)
    adapters = lora.adapter_shapes(shapes, cfg.lora_rank, cfg.lora_dora) if cfg.backbone_lora else {}
    return list(shapes) + list(adapters)


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
    donate: bool = False,
) -> TrainStep:
    """Bind the static configuration: the pure step and its `init`, sharing one optimizer and selection.

    `optimizer` replaces the one `train.optimizer` names (any chain of gradient transformations; it gets
    `step=` for its schedules). A custom chain (this argument, or a 'module:function' train.optimizer)
    owns clipping and the schedule: the step passes it the raw gradient (train.clip_max_norm is not
    applied) and logs as `lr` the learning rate the chain reports (an "lr" entry in its state, see
    `gt.report_lr`). Only the leaves `trainable` selects (default `recipe.trainable`: freezing, LoRA) get
    gradients and optimizer state; a selection matching no leaf is an error naming it.
    `rank` enters the random key, so drop path differs across the data shards of one step.

    `donate=True` (JAX's `donate_argnums`; what `fit` uses on CPU) lets the step overwrite its input
    state's buffers: clipping, upstream's AdamW and the EMA then run in place (`optim/inplace.py`), with
    the same numbers as the pure step and without a second copy of params, moments and EMA. The state
    passed in must not be used again (a second call with it raises). Donation applies to the built-in
    adamw without fp16; any other optimizer or fp16 runs the pure update.
    """
    lcfg, ucfg = LossConfig.resolve(cfg, tcfg), UpdateConfig.resolve(tcfg, steps_per_epoch)
    schedule = functools.partial(schedules.lr_factor, **ucfg.schedule)
    where = trainable if trainable is not None else recipe.trainable(cfg, tcfg)
    names = [n for n in param_names(cfg) if where is None or tree.matcher(where)(n, None)]
    custom = optimizer is not None or ":" in tcfg.optimizer
    optimizer = optimizer or recipe.make_optimizer(cfg, tcfg, names, schedule)
    donated = donate and _donatable(tcfg, precision, custom)
    pieces = StepPieces(
        loss=_loss_piece(cfg, lcfg, tcfg.drop_path, precision, world_size),
        update=_donated_update_piece(cfg, tcfg, ucfg, world_size, names, schedule)
        if donated
        else _update_piece(cfg, ucfg, precision, world_size, optimizer, None if custom else schedule),
        split=functools.partial(_split, where=where),
        fp16=precision == "fp16",
        rank=rank,
        normalisers=functools.partial(_normalisers, cfg=cfg, world_size=world_size) if cfg.keypoints else None,
    )
    init = functools.partial(_init_state, tcfg=tcfg, optimizer=optimizer, where=where)
    settings = {
        "loss": lcfg._asdict(),
        "update": attrs.asdict(ucfg),
        "drop_path": tcfg.drop_path,
        "precision": precision,
        "world_size": world_size,
        "donate": donated,
        # a 'module:function' optimizer is given the whole TrainConfig: key on all of it
        "custom": attrs.asdict(tcfg) if ":" in tcfg.optimizer else None,
    }
    step = assemble_step(pieces)
    return TrainStep(
        init=init, step=step, pieces=pieces, optimizer=optimizer, trainable=where, cfg=cfg, settings=settings
    )


def _init_state(
    params: tree.Params, *, tcfg: TrainConfig, optimizer: gt.GradientTransformation, where: tree.Where | None
) -> TrainState:
    """A fresh train state; optimizer and EMA state are copies, never aliases, of the params."""
    device = next(tree.leaves(params)).device
    if where is not None:
        tree.require(params, where, "trainable")
    trainable, _ = _split(params, where)
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


def _loss_piece(cfg: ModelConfig, lcfg: LossConfig, drop_path: float, precision: str, world_size: int) -> Callable:
    """`loss(trainable, frozen, batch, scale, key[, window])`: `rf.loss` of one micro-batch, scaled."""
    weighted = set(lcfg.weights)

    def loss(trainable, frozen, batch: Batch, scale: Tensor, key: Tensor, window: Tensor | None = None):
        params = tree.combine(trainable, frozen)
        own = _num_boxes(batch["labels"], cfg.group_detr, world_size)
        num_boxes = own if window is None else window
        total, losses = objective.loss_with(
            params, batch, cfg, lcfg, drop_path=drop_path, key=key, num_boxes=num_boxes, precision=precision
        )
        value = total * scale
        if window is not None:  # log what upstream logs: this micro-batch's terms over its own normaliser
            total, losses = _renormalise(total, losses, window / own, weighted)
        return value, (total, losses)

    return loss


def _normalisers(batches: Sequence[Batch], *, cfg: ModelConfig, world_size: int) -> list[Tensor]:
    window = _window_normaliser([_num_boxes(b["labels"], cfg.group_detr, world_size) for b in batches])
    return [window] * len(batches)


def _update_piece(
    cfg: ModelConfig,
    ucfg: UpdateConfig,
    precision: str,
    world_size: int,
    optimizer: gt.GradientTransformation,
    schedule: Callable[[Tensor], Tensor] | None,
) -> Callable:
    """`update(state, trainable, grads_list, losses_list)`: accumulate, average across ranks, clip (built-in
    optimizers only: `schedule` is None for a custom chain), optimizer, EMA."""

    def update(state: TrainState, trainable, grads_list: list, losses_list: list) -> tuple[TrainState, dict]:
        fp16, step = precision == "fp16", state["step"]
        grads, loss_sums = _gradient(grads_list, losses_list, state["loss_scale"] if fp16 else None, cfg, world_size)
        clip = ucfg.clip_max_norm if schedule is not None else 0.0  # 0: the norm only (a custom chain clips)
        grads, grad_norm = gt.global_norm_clip(grads, clip)
        finite = torch.isfinite(grad_norm)  # one non-finite gradient makes the global norm non-finite
        new_params, new_opt = apply_update(optimizer, grads, state["opt_state"], trainable, state["params"], step)
        del grads  # eager memory: each of these trees is the model's size; drop it as soon as it is used
        new_state = _next_state(state, new_params, new_opt, finite, ucfg, fp16)
        metrics = {**loss_sums, "grad_norm": grad_norm.detach(), "finite": finite}
        if schedule is not None:
            metrics["lr_factor"] = schedule(step)
        if isinstance(new_opt, dict) and "lr" in new_opt:
            metrics["lr"] = new_opt["lr"]
        return new_state, metrics

    return update


def _donatable(tcfg: TrainConfig, precision: str, custom: bool) -> bool:
    """Whether the in-place update mirrors this run's: the built-in adamw (betas/eps overrides only), no fp16
    (whose overflow skip needs the previous state)."""
    return not custom and tcfg.optimizer == "adamw" and precision != "fp16" and not recipe.adam_settings(tcfg)[2]


def _donated_update_piece(
    cfg: ModelConfig, tcfg: TrainConfig, ucfg: UpdateConfig, world_size: int, names: list[str], schedule: Callable
) -> Callable:
    """The update of a donated state: the same as `_update_piece` for adamw, in place on `state`'s buffers."""
    groups = recipe.param_groups(names, cfg, tcfg)
    betas, eps, _ = recipe.adam_settings(tcfg)

    def update(state: TrainState, trainable, grads_list: list, losses_list: list) -> tuple[TrainState, dict]:
        if state.get("donated"):
            raise ValueError(
                "this train state was donated to an earlier step (make_train_step(donate=True)), which reused "
                "its buffers: pass the state that step returned"
            )
        step = state["step"]
        grads, loss_sums = _gradient(grads_list, losses_list, None, cfg, world_size)
        grad_norm = inplace.global_norm_clip_([g for g in tree.leaves(grads) if g is not None], ucfg.clip_max_norm)
        finite = torch.isfinite(grad_norm)
        metrics = {**loss_sums, "grad_norm": grad_norm.detach(), "finite": finite, "lr_factor": schedule(step)}
        if not bool(finite):  # one host sync (fit makes it anyway): a non-finite step leaves the state intact
            return state, metrics
        with torch.no_grad():
            inplace.donated_update(state, grads, groups, ucfg, betas=betas, eps=eps, lr_factor=metrics["lr_factor"])
        new_state = {**state, "step": step + 1}
        state["donated"] = True  # the input now holds the next state's buffers
        return new_state, metrics

    return update


def _gradient(grads_list: list, losses_list: list, scale: Tensor | None, cfg: ModelConfig, world_size: int):
    """The step's gradient and logged losses: accumulated over micro-batches, then averaged over ranks (the
    losses ride along: the global batch's, not rank 0's shard)."""
    grads, loss_sums = _accumulate(grads_list, losses_list, scale, cfg)
    if world_size > 1:
        averaged = all_reduce_mean({"grads": grads, "losses": loss_sums})
        grads, loss_sums = averaged["grads"], averaged["losses"]
    return grads, loss_sums


def _accumulate(grads_list: list, losses_list: list, scale: Tensor | None, cfg: ModelConfig):
    """Sum of the micro-batch gradients over their count (and the fp16 loss scale); mean logged losses."""
    count = len(grads_list)
    grads = grads_list[0]
    for more in grads_list[1:]:
        grads = tree.map_(torch.add, grads, more)
    loss_sums = {k: sum(losses[k] for losses in losses_list) / count for k in losses_list[0]}
    divisor = 1 if cfg.keypoints else count  # keypoints: the window normaliser already averaged
    if divisor > 1 or scale is not None:  # else the divisor is exactly 1: skip a pass per tensor
        factor = divisor if scale is None else divisor * scale
        grads = tree.map_(lambda g: g / factor, grads)
    return grads, loss_sums


def apply_update(
    optimizer: gt.GradientTransformation, grads, opt_state, trainable, params, step: Tensor
) -> tuple[tree.Params, gt.State]:
    """The optimizer's update applied to the trainable leaves of `params` -> (new params, new optimizer
    state). One small function, so an in-place (donating) variant can take its place."""
    updates, new_opt = gt.deferred_update(optimizer)(grads, opt_state, trainable, step=step)
    return tree.replace(params, tree.flatten(gt.apply_updates(trainable, updates))), new_opt


def _next_state(state: TrainState, new_params, new_opt, finite: Tensor, ucfg: UpdateConfig, fp16: bool) -> TrainState:
    """The state after one update: fp16 overflow skips it and adapts the loss scale (GradScaler); EMA."""
    step = state["step"]
    if fp16:  # skip the update on overflow and adapt the loss scale, like GradScaler
        new_params = tree.map_(lambda n, o: torch.where(finite, n, o), new_params, state["params"])
        new_opt = tree.map_(lambda n, o: torch.where(finite, n, o), new_opt, state["opt_state"])
    new_state = {**state, "step": step + 1, "params": new_params, "opt_state": new_opt}
    if fp16:
        new_state["loss_scale"], new_state["good_steps"] = _next_loss_scale(
            state["loss_scale"], state["good_steps"], finite, ucfg.loss_scale_growth_interval
        )
    if ucfg.use_ema:
        new_state["ema_state"] = ema_lib.ema_maybe_update(
            state["ema_state"],
            new_params,
            step + 1,
            interval=ucfg.ema_update_interval,
            decay=ucfg.ema_decay,
            tau=ucfg.ema_tau,
        )
    return new_state


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
    """torch.compile a step from `make_train_step`, by default piece by piece (loss, update); returns the
    same record (same `init`, optimizer and selection) with the compiled `step` (a plain function compiles whole).

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
    if not isinstance(step_fn, TrainStep):
        return compiler.compile_fn(step_fn, backend=backend, mode=mode, regions=False)
    if regional:
        pieces = step_fn.pieces
        loss = compiler.compile_fn(pieces.loss, backend=backend, mode=mode, regions=regions)
        compiled_update = compiler.compile_fn(pieces.update, backend=backend, mode=mode) if update else pieces.update
        pieces = attrs.evolve(pieces, loss=loss, update=compiled_update)
        return attrs.evolve(step_fn, step=assemble_step(pieces), pieces=pieces)
    if step_fn.cfg is not None and step_fn.cfg.gradient_checkpointing:
        raise ValueError(
            "compile_step(regional=False) cannot run gradient checkpointing: the whole-step graph traces "
            "torch.func.grad, which does not support the saved-tensor hooks of torch.utils.checkpoint (torch "
            "2.13). Use the regional step (compile_step's default), or turn off model.gradient_checkpointing."
        )
    whole = compiler.compile_fn(step_fn.step, backend=backend, mode=mode, regions=False)
    return attrs.evolve(step_fn, step=whole)


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
