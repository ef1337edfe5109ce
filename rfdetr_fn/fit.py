"""Train a detector: `python -m rfdetr_fn.fit [--preset nano] [--config FILE] [--model.* --train.* --data.* --eval.*]`.

The loop reads top to bottom: build data, init or load weights, then for every epoch call the compiled
step on each batch, evaluate, update the best-model and early-stopping records, save, and stop early if
asked. Everything stateful lives in the train state and in small records saved with it, so a resumed run
continues exactly where the saved one stopped.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from rfdetr_fn import compiler, presets, tree
from rfdetr_fn.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from rfdetr_fn.data import (
    DatasetError,
    build_dataset,
    check_images,
    check_same_categories,
    multi_scale_scales,
    per_batch_scale,
    resize_batch,
    target_slots,
    train_loader,
)
from rfdetr_fn.errors import TrainingDiverged
from rfdetr_fn.eval.loop import evaluate, run_split
from rfdetr_fn.flags import parse, run_or_exit
from rfdetr_fn.io import checkpoint, dirlock, distributed, formats, loggers, rundir, runlog
from rfdetr_fn.io.weights import load_weights
from rfdetr_fn.model import detector, lora
from rfdetr_fn.model.precision import compute_kind, explain_precision, resolve_precision
from rfdetr_fn.step import TrainStep, compile_step, make_train_step
from rfdetr_fn.train import autobatch, grids, interrupt, outputs, summary, trackers
from rfdetr_fn.train.graphs import graphed_step


@attrs.frozen(kw_only=True)
class FitArgs:
    """Train an RF-DETR detector. Defaults: RF-DETR Nano on the built-in synthetic shapes, 5 epochs (a smoke run)."""

    preset: str = "nano"
    """Model variant whose defaults --model.* starts from (nano, small, medium, large, base, large_deprecated,
    seg_preview, seg_nano, seg_small, seg_medium, seg_large, seg_xlarge, seg_2xlarge, tiny)."""
    config: str | None = None
    """Experiment file (YAML or JSON, see configs/) whose values replace the defaults; flags override it."""
    model: ModelConfig = presets.nano()
    train: TrainConfig = TrainConfig(epochs=5)
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    device: str | None = None
    """cpu, cuda or cuda:N; None picks CUDA when available."""


def fit(args: FitArgs) -> dict[str, Any]:
    """Run training; returns the final metrics record (rank 0's view)."""
    with contextlib.ExitStack() as held:  # the output-dir lock, from when the directory is made until the end
        run, state, loop = _start(args, held)
        state, loop, record, times = _train(run, state, loop)
        return _end(run, state, loop, record, times)


@attrs.frozen
class Run:
    """What a run fixes before its first step and only reads afterwards: configs, splits, the loader, the
    (compiled) step, the log. The loop's changing state is the train state and a `trackers.Loop`."""

    args: FitArgs
    cfg: ModelConfig
    world: distributed.World
    out_dir: Path
    class_names: list[str]
    train_ds: Any
    val_ds: Any
    loader: Any
    steps_per_epoch: int
    scales: list
    precision: str
    compiled: bool
    slots: int | None
    train_step: TrainStep
    step_fn: Any = None
    cache: compiler.CompileCache | None = None
    log: runlog.RunLog | None = None
    signals: interrupt.Interrupt | None = None

    @property
    def tcfg(self) -> TrainConfig:
        return self.args.train


# ---------------------------------------------------------------- start: data, weights, state, step


def _start(args: FitArgs, held: contextlib.ExitStack) -> tuple[Run, dict, trackers.Loop]:
    """Everything before the first step, in the order that fails cheapest first: data, directory, state."""
    world = distributed.setup(args.device)
    threads = distributed.set_threads(world)  # the cores this process may use, not the machine's
    out_dir = Path(args.train.output_dir)
    resume_dir = checkpoint.resume_dir(args.train.resume, out_dir)
    if resume_dir is None and not args.train.overwrite:
        rundir.refuse_used_dir(out_dir, resume=args.train.resume)
    torch.manual_seed(args.train.seed)
    run = _data(args, world, out_dir)
    _open_out_dir(run, resume_dir, held)
    signals = held.enter_context(interrupt.catch_signals(enabled=world.size == 1))  # Ctrl-C: save, then exit
    state, loop = _initial_state(run, resume_dir)
    sinks = _record_config(run, resume_dir, state)
    step_fn, cache = _make_step(run)
    log = runlog.RunLog(out_dir, tensorboard=run.tcfg.tensorboard, enabled=world.main, sinks=sinks)
    if resume_dir is not None:  # rows a killed run logged after its last save are replayed: drop them
        log.rewind(int(state["step"]), evaluated=loop.eval_pending < 0)
    run = attrs.evolve(run, step_fn=step_fn, cache=cache, log=log, signals=signals)
    if world.main:
        print(_start_summary(run, state, loop, resumed=resume_dir is not None, threads=threads))
    return run, state, loop


def _data(args: FitArgs, world, out_dir: Path) -> Run:
    """The splits (the train split fixes the label space), batch size auto, the image check and the loader."""
    tcfg, dcfg = args.train, args.data
    train_ds = build_dataset(dcfg, "train", args.model, tcfg, train=True)
    cfg = _align_keypoints(_align_classes(args.model, train_ds.num_classes), train_ds)
    if tcfg.batch_size == "auto":
        tcfg = _auto_batch(cfg, tcfg, world)
        args = attrs.evolve(args, train=tcfg)
    val_ds = build_dataset(dcfg, "valid", cfg, tcfg, train=False)
    test_ds = _test_split(dcfg, cfg, tcfg) if tcfg.run_test else None
    check_same_categories(train_ds, [val_ds, test_ds])
    if dcfg.check_images:
        check_images([train_ds, val_ds, test_ds])
    class_names = list(dcfg.class_names or train_ds.class_names)
    if tcfg.save_dataset_grids and world.main:
        written = grids.write_dataset_grids(train_ds, val_ds, cfg, tcfg, dcfg, class_names, out_dir)
        print(f"dataset grids: {len(written)} PNG files in {out_dir / 'dataset_grids'}")
    precision = resolve_precision(tcfg.precision, world.device)
    compiled = compiler.use_compile(tcfg.compile, compute_kind(world.device, precision))
    # A compiled or graphed step specialises on input shapes: fix the target axis for the run, leaving image
    # sizes (one per multi-scale entry) as the only shapes that vary.
    slots = target_slots(train_ds) if compiled or tcfg.cuda_graphs else None
    loader = train_loader(train_ds, tcfg, dcfg, world_size=world.size, rank=world.rank, seed=tcfg.seed, slots=slots)
    steps_per_epoch = max(1, len(loader) // tcfg.grad_accum_steps)
    train_step = make_train_step(
        cfg,
        tcfg,
        steps_per_epoch=steps_per_epoch,
        precision=precision,
        world_size=world.size,
        rank=world.rank,
        donate=world.device.type == "cpu",  # CUDA compiles (or graphs) the update instead
    )
    return Run(
        args=args,
        cfg=cfg,
        world=world,
        out_dir=out_dir,
        class_names=class_names,
        train_ds=train_ds,
        val_ds=val_ds,
        loader=loader,
        steps_per_epoch=steps_per_epoch,
        scales=multi_scale_scales(cfg.resolution, tcfg.expanded_scales, cfg.patch_size, cfg.num_windows),
        precision=precision,
        compiled=compiled,
        slots=slots,
        train_step=train_step,
    )


def _open_out_dir(run: Run, resume_dir: Path | None, held: contextlib.ExitStack) -> None:
    """Made and locked only now that the data is known to load (rank 0 writes, the others read)."""
    if not run.world.main:
        return
    run.out_dir.mkdir(parents=True, exist_ok=True)
    held.enter_context(dirlock.exclusive(run.out_dir))
    if resume_dir is None and run.tcfg.overwrite:  # never a file this command reads
        rundir.clear_run(run.out_dir, reads=(run.tcfg.pretrain_weights, run.args.config, run.args.data.dataset_dir))
    rundir.clean_stale(run.out_dir, keep=resume_dir)


def _initial_state(run: Run, resume_dir: Path | None) -> tuple[dict, trackers.Loop]:
    """Fresh or pretrained weights (with fresh DoRA adapters for a LoRA run), or the saved state to resume."""
    cfg, tcfg = run.cfg, run.tcfg
    if tcfg.pretrain_weights:
        _, params = load_weights(tcfg.pretrain_weights, cfg)
    else:
        params = detector.init(cfg, tcfg.seed)
    if cfg.backbone_lora:  # fresh DoRA adapters, unless the weights file brought trained ones
        params = lora.add_adapters(params, cfg, seed=tcfg.seed)
    state = run.train_step.init(tree.to(params, run.world.device))
    loop = trackers.Loop()
    if resume_dir is not None:
        state, loop = _restore(resume_dir, state, loop)
        if run.world.main:
            print(f"resumed from {resume_dir} at epoch {loop.epoch}, step {int(state['step'])}")
    return state, loop


def _record_config(run: Run, resume_dir: Path | None, state: dict) -> list:
    """training_config.json (a resume is checked against it first) and the experiment loggers it starts."""
    if not run.world.main:
        return []
    record = _config_record(run.args, run.cfg, run.class_names)
    if resume_dir is not None:
        rundir.check_resume_changes(run.out_dir, record, run.tcfg, int(state["step"]), source=resume_dir)
    rundir.write_json(run.out_dir / "training_config.json", record)
    return loggers.make_loggers(run.tcfg, run.out_dir, record)


def _make_step(run: Run) -> tuple[Any, compiler.CompileCache | None]:
    """The train step, compiled and graphed as configured, with the compile cache of its exact configuration."""
    cfg, tcfg, world = run.cfg, run.tcfg, run.world
    shapes = len(run.scales) + 1
    # CPU: the update's compile took 63 % of Nano's cold time and won nothing, so only CUDA compiles it.
    step_fn = compile_step(run.train_step, enabled=run.compiled, max_shapes=shapes, update=world.device.type == "cuda")
    log = print if world.main else None
    step_fn = graphed_step(step_fn, tcfg, world.device, world_size=world.size, max_graphs=shapes, log=log)
    if not run.compiled:
        return step_fn, None
    shaping = {k: getattr(tcfg, k) for k in ("batch_size", "grad_accum_steps", "multi_scale", "expanded_scales")}
    key = compiler.cache_key(
        cfg, run.train_step.settings, device=world.device, steps=run.steps_per_epoch, slots=run.slots, inputs=shaping
    )
    cache = compiler.CompileCache(Path(tcfg.compile_cache) if tcfg.compile_cache else compiler.default_cache_dir(), key)
    loaded = cache.load()  # every rank loads the artifacts of this exact graph-shaping configuration
    if world.main:
        sizes = len(run.scales) if tcfg.multi_scale != "off" else 1
        kind = compute_kind(world.device, run.precision)
        compiler.announce(f"the train step ({sizes} input size(s))", kind, cache, loaded)
    return step_fn, cache


def _start_summary(run: Run, state: dict, loop: trackers.Loop, resumed: bool, threads: int) -> str:
    cfg, tcfg = run.cfg, run.tcfg
    return summary.start_summary(
        model=f"{cfg.model_name} ({cfg.resolution} px)",
        num_params=tree.num_params(state["params"]),
        num_classes=cfg.num_classes,
        train_images=len(run.train_ds),
        val_images=len(run.val_ds),
        batch_size=tcfg.batch_size,
        grad_accum_steps=tcfg.grad_accum_steps,
        world_size=run.world.size,
        steps_per_epoch=run.steps_per_epoch,
        epochs=tcfg.epochs,
        max_steps=tcfg.max_steps,
        device=f"cpu ({threads} threads)" if run.world.device.type == "cpu" else str(run.world.device),
        precision=explain_precision(tcfg.precision, run.world.device),
        compiled=run.compiled,
        output_dir=run.out_dir,
        resumed_epoch=loop.epoch if resumed else None,
    )


# ---------------------------------------------------------------- the loop


def _train(run: Run, state: dict, loop: trackers.Loop) -> tuple[dict, trackers.Loop, dict, dict[str, float]]:
    """Epochs until the last one, max_steps or early stopping; -> (state, loop, last record, seconds by phase)."""
    tcfg = run.tcfg
    times = {"train": 0.0, "eval": 0.0, "save": 0.0}
    record: dict[str, Any] = {}
    stopped = False
    if loop.eval_pending >= 0:  # the saved run stopped before (or while) evaluating that epoch
        loop, record, stopped = _evaluate_and_track(run, state, loop, int(state["step"]), saved=None)
    for epoch in range(loop.epoch, 0 if stopped else tcfg.epochs):
        started = time.perf_counter()
        state, loop, step = _train_epoch(run, state, loop, epoch)
        times["train"] += time.perf_counter() - started
        loop, record, seconds, stop = _end_epoch(run, state, loop, step, epoch)
        times["save"] += seconds["save"]
        times["eval"] += seconds["eval"]
        if stop:
            break
    return state, loop, record, times


def _train_epoch(run: Run, state: dict, loop: trackers.Loop, epoch: int) -> tuple[dict, trackers.Loop, int]:
    """One epoch's steps (from the saved batch when resuming); -> (state, loop, step)."""
    tcfg, world = run.tcfg, run.world
    step = int(state["step"])  # a Python mirror of state["step"]: reading the tensor every step would sync
    # Resuming mid-epoch skips the samples the saved run consumed without decoding them.
    run.loader.sampler.set_epoch(epoch, skip=loop.batch * tcfg.batch_size)
    bar = _progress(tcfg, world, run.steps_per_epoch, epoch)
    micro: list[dict] = []
    started, seen = time.perf_counter(), 0
    for index, batch in enumerate(run.loader, start=loop.batch):
        micro.append(tree.to(batch, world.device))
        if len(micro) < tcfg.grad_accum_steps:
            continue
        state, metrics = _step(run, state, loop, micro, step)
        seen += sum(len(b["images"]) for b in micro)
        micro = []
        step, loop = step + 1, attrs.evolve(loop, batch=index + 1)
        _log_step(run, bar, metrics, step, epoch, seen / (time.perf_counter() - started))
        if run.signals.requested:  # at the step boundary: save, then exit 130/143 saying how to resume
            _save_state(run.out_dir / "last", state, loop)
            raise interrupt.stopped(run.signals, run.out_dir, step)
        if tcfg.max_steps and step >= tcfg.max_steps:
            break
        if tcfg.save_every_n_steps and step % tcfg.save_every_n_steps == 0 and index + 1 < len(run.loader):
            _save_state(run.out_dir / "last", state, loop)  # mid-epoch: the epoch end saves anyway
    else:  # the epoch ran to its end: the next run starts the next epoch
        loop = attrs.evolve(loop, epoch=epoch + 1, batch=0)
    if bar is not None:
        bar.close()
    return state, loop, step


def _step(run: Run, state: dict, loop: trackers.Loop, micro: list[dict], step: int) -> tuple[dict, dict]:
    """One optimizer step; a non-finite one saves the state before it and stops the run."""
    if run.tcfg.multi_scale == "per-batch":
        size = per_batch_scale(step, run.scales)
        micro = [resize_batch(b, size) for b in micro]
    new_state, metrics = run.step_fn(state, micro)
    if not _finite_step(metrics, run.precision):  # the pure step left `state` intact: keep it
        _save_state(run.out_dir / "last", state, loop)
        raise TrainingDiverged(_divergence_message(metrics, step, run.tcfg, run.out_dir))
    if run.cache is not None:
        run.cache.save_if_new()  # a counter check; writes only after a step that compiled
    return new_state, metrics


def _log_step(run: Run, bar, metrics: dict, step: int, epoch: int, images_per_s: float) -> None:
    if bar is not None:
        bar.update(1)
    if step % run.tcfg.log_every_n_steps == 0 or step == 1:
        row = _train_row(metrics, step, epoch, run.tcfg)
        run.log.log(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['train/loss']:.3f}", img_s=f"{images_per_s:.1f}")


def _end_epoch(
    run: Run, state: dict, loop: trackers.Loop, step: int, epoch: int
) -> tuple[trackers.Loop, dict, dict[str, float], bool]:
    """Save first (all ranks take part in DCP: a failing evaluation must not cost the epoch), then evaluate,
    track the best weights and decide on stopping; -> (loop, record, seconds by phase, stop)."""
    tcfg = run.tcfg
    last_epoch = epoch + 1 >= tcfg.epochs or bool(tcfg.max_steps and step >= tcfg.max_steps)
    evaluating = trackers.should_evaluate(epoch, eval_interval=tcfg.eval_interval, epochs=tcfg.epochs)
    loop = attrs.evolve(loop, eval_pending=epoch if evaluating or last_epoch else -1)
    numbered = trackers.should_checkpoint(epoch, checkpoint_interval=tcfg.checkpoint_interval, epochs=tcfg.epochs)
    started = time.perf_counter()
    _save_state(run.out_dir / "last", state, loop, keep=f"checkpoint_{epoch:04d}" if numbered else None)
    seconds = {"save": time.perf_counter() - started, "eval": 0.0}
    if run.signals.requested:  # saved just now (an evaluation still pending runs first on resume)
        raise interrupt.stopped(run.signals, run.out_dir, step)
    record: dict[str, Any] = {"step": step, "epoch": epoch}
    if loop.eval_pending >= 0:
        started = time.perf_counter()
        loop, record, stop = _evaluate_and_track(run, state, loop, step, saved=run.out_dir / "last")
        seconds["eval"] = time.perf_counter() - started
        last_epoch = last_epoch or stop
    return loop, record, seconds, last_epoch


def _end(run: Run, state: dict, loop: trackers.Loop, record: dict, times: dict[str, float]) -> dict[str, Any]:
    """The end-of-fit weights files, plots and summary, then the test split when asked."""
    cfg, tcfg, world = run.cfg, run.tcfg, run.world
    if world.main:
        started = time.perf_counter()
        outputs.finish(state, cfg, tcfg, _last_epoch(loop), run.class_names, run.out_dir, loop.best)
        times = {**times, "save": times["save"] + time.perf_counter() - started}
        runlog.plot(run.log.rows, run.out_dir)
        print(_end_summary(loop, tcfg, run.log.rows, run.out_dir, times))
    run.log.close()
    if tcfg.run_test and world.main:
        _, best = load_weights(run.out_dir / "checkpoint_best_total.pth", cfg)
        record = {**record, **run_split(best, cfg, run.args.data, run.args.eval, tcfg, "test", world)}
        print(summary.epoch_line(record, "best total"))
    distributed.teardown(world)
    return record


# ---------------------------------------------------------------- helpers (in the order fit uses them)


def _align_classes(cfg: ModelConfig, dataset_classes: int) -> ModelConfig:
    """The head follows the dataset (upstream's RFDETR.train does the same)."""
    if cfg.num_classes != dataset_classes:
        cfg = attrs.evolve(
            cfg,
            num_classes=dataset_classes,
            num_select=min(cfg.num_select, cfg.num_queries * (dataset_classes + 1)),
        )
    return cfg


def _align_keypoints(cfg: ModelConfig, dataset) -> ModelConfig:
    """A keypoint model's schema, keypoint names and skeleton follow the train split, like its classes."""
    if not cfg.keypoints:
        return cfg
    schema, names = dataset.keypoint_schema, dataset.keypoint_names
    flat = tuple(n for per_class in names for n in per_class)
    return attrs.evolve(
        cfg,
        num_keypoints_per_class=schema,
        keypoint_names=flat if len(flat) == sum(schema) else (),
        keypoint_skeleton=dataset.keypoint_skeleton,
    )


def _test_split(dcfg: DataConfig, cfg: ModelConfig, tcfg: TrainConfig):
    """--train.run-test scores the test split after training: make sure there is one before training."""
    try:
        return build_dataset(dcfg, "test", cfg, tcfg, train=False)
    except DatasetError as err:
        raise DatasetError(f"--train.run-test needs a test split: {err}") from err


def _auto_batch(cfg: ModelConfig, tcfg: TrainConfig, world) -> TrainConfig:
    """Resolve batch_size auto on rank 0 (a probe of real steps on a synthetic worst-case batch) for all ranks."""
    choice = None
    if world.main:
        params = detector.init(cfg, tcfg.seed)
        if cfg.backbone_lora:
            params = lora.add_adapters(params, cfg, seed=tcfg.seed)
        params = tree.to(params, world.device)
        choice = autobatch.resolve(cfg, tcfg, params, world.device, world.size)
        print(choice.describe())
    choice = distributed.broadcast_object(choice, world)
    return attrs.evolve(tcfg, batch_size=choice.micro_batch, grad_accum_steps=choice.grad_accum_steps)


def _state_tree(state: dict, loop: trackers.Loop) -> dict:
    return {"state": state, **trackers.loop_to_dict(loop)}


def _save_state(path: Path, state: dict, loop: trackers.Loop, keep: str | None = None) -> None:
    """One save per epoch: `last/`, plus a hard-linked numbered copy when `keep` names one."""
    checkpoint.save_state(path, _state_tree(state, loop), keep=keep)


def _restore(path: Path, state: dict, loop: trackers.Loop) -> tuple[dict, trackers.Loop]:
    template = _state_tree(state, loop)
    try:
        restored = checkpoint.load_state(path, template)
    except formats.CheckpointError as err:  # saved before evaluations were tracked: none was pending
        if "missing loop/eval_pending" not in str(err):
            raise
        del template["loop"]["eval_pending"]
        restored = checkpoint.load_state(path, template)
        restored["loop"]["eval_pending"] = -1
    return restored["state"], trackers.loop_from_dict(restored)


def _config_record(args: FitArgs, cfg: ModelConfig, class_names: list[str]) -> dict:
    return {
        "model": attrs.asdict(cfg),
        "train": attrs.asdict(args.train),
        "data": attrs.asdict(args.data),
        "eval": attrs.asdict(args.eval),
        "class_names": class_names,
        "command": sys.argv,
    }


def _progress(tcfg: TrainConfig, world, total: int, epoch: int):
    if not (tcfg.progress_bar and world.main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True, leave=False)


def _train_row(metrics: dict, step: int, epoch: int, tcfg: TrainConfig) -> dict:
    row: dict[str, Any] = {"step": step, "epoch": epoch}
    for key, value in metrics.items():
        if key.startswith("loss") or key in ("grad_norm", "class_error", "cardinality_error"):
            row[f"train/{key}"] = float(value)
    factor = float(metrics["lr_factor"])
    row["train/lr"] = tcfg.lr * factor
    row["train/lr_encoder"] = tcfg.lr_encoder * factor
    return row


def _evaluate_epoch(state, cfg, tcfg, dcfg, ecfg, val_ds, world, step_compiled: bool) -> dict[str, float]:
    """EMA weights by default (as upstream validates); the base weights too when asked or when there is no EMA.

    The forward is compiled when --eval.compile is on, or auto and the train step is compiled."""
    compile = ecfg.compile == "on" or (ecfg.compile == "auto" and step_compiled)

    def score(params) -> dict[str, float]:
        loss_cfg = tcfg if tcfg.compute_val_loss else None  # val/loss, like upstream's compute_val_loss
        return evaluate(
            params,
            cfg,
            val_ds,
            batch_size=tcfg.eval_batch,
            ecfg=ecfg,
            num_workers=dcfg.num_workers,
            world=world,
            loss_cfg=loss_cfg,
            compile=compile,
            cache_dir=tcfg.compile_cache,
        )

    record: dict[str, float] = {}
    if tcfg.eval_base_model or not tcfg.use_ema:
        record.update({f"val/{k}": v for k, v in score(state["params"]).items()})
    if tcfg.use_ema:
        # Scored alone, the EMA weights take upstream's primary names (val/mAP_50_95 ...), logged once; beside
        # the base weights they are val/ema_*. The epoch line says which weights were scored.
        prefix = "val/ema_" if tcfg.eval_base_model else "val/"
        record.update({f"{prefix}{k}": v for k, v in score(state["ema_state"]["params"]).items()})
    return record


def _monitored(record: dict, tcfg: TrainConfig) -> tuple[float | None, float | None]:
    key = {"map": "mAP_50_95", "mar": "mAR", "kp_map": "kp_mAP_50_95", "kp_mar": "kp_mAR"}[tcfg.best_model_metric]
    if not tcfg.use_ema:
        return record.get(f"val/{key}"), None
    if tcfg.eval_base_model:
        return record.get(f"val/{key}"), record.get(f"val/ema_{key}")
    return None, record.get(f"val/{key}")  # EMA scored alone, under the primary names


def _evaluate_and_track(
    run: Run, state: dict, loop: trackers.Loop, step: int, saved: Path | None
) -> tuple[trackers.Loop, dict, bool]:
    """Evaluate the epoch `loop.eval_pending`, update the best-model and early-stopping records (also in the
    state directory `saved`, when given), write the best weights and the metrics row; -> (loop, record, stop)."""
    tcfg, epoch, world = run.tcfg, loop.eval_pending, run.world
    record = {"step": step, "epoch": epoch}
    args = run.args
    record.update(_evaluate_epoch(state, run.cfg, tcfg, args.data, args.eval, run.val_ds, world, run.compiled))
    regular, ema = _monitored(record, tcfg)
    best, decisions = trackers.update_best(
        loop.best, epoch=epoch, regular=regular, ema=ema, skip_best_epochs=tcfg.skip_best_epochs,
        smooth_alpha=tcfg.smooth_alpha,
    )  # fmt: skip
    stopping, stop = trackers.update_early_stop(
        loop.stop, epoch=epoch, regular=regular, ema=ema, use_ema=tcfg.early_stopping_use_ema,
        patience=tcfg.early_stopping_patience, min_delta=tcfg.early_stopping_min_delta,
        skip_best_epochs=tcfg.skip_best_epochs,
    )  # fmt: skip
    loop = attrs.evolve(loop, best=best, stop=stopping, eval_pending=-1)
    if world.main:
        outputs.save_best(decisions, state, run.cfg, tcfg, epoch, run.class_names, run.out_dir)
        run.log.log(record)
        print(summary.epoch_line(record, summary.scored_weights(tcfg.eval_base_model, tcfg.use_ema)))
        if saved is not None:  # saved before this evaluation: give it the new records (a small JSON rewrite)
            checkpoint.update_values(saved, trackers.loop_to_dict(loop))
    stop = bool(tcfg.early_stopping and distributed.broadcast_object(stop, world))
    if stop and world.main:
        print(f"early stopping at epoch {epoch}: no improvement in {tcfg.early_stopping_patience} evaluations")
    return loop, record, stop


def _finite_step(metrics: dict, precision: str) -> bool:
    """Loss and gradient norm finite (one host sync); fp16 overflow is skipped by the step, not an error."""
    ok = torch.isfinite(metrics["loss"])
    if precision != "fp16":
        ok = ok & metrics["finite"]
    return bool(ok)


def _divergence_message(metrics: dict, step: int, tcfg: TrainConfig, out_dir: Path) -> str:
    return (
        f"training diverged: non-finite loss ({float(metrics['loss'])}) or gradient norm "
        f"({float(metrics['grad_norm'])}) at step {step + 1}; the last good train state (step {step}) is in "
        f"{out_dir / 'last'}. Lower --train.lr ({tcfg.lr:g}) / --train.lr-encoder ({tcfg.lr_encoder:g}) or "
        "tighten --train.clip-max-norm, then resume with --train.resume auto --train.resume-allow-changes"
    )


def _last_epoch(loop: trackers.Loop) -> int:
    return max(0, loop.epoch - 1)


def _end_summary(loop: trackers.Loop, tcfg: TrainConfig, rows: list[dict], out_dir: Path, times: dict) -> str:
    best = loop.best
    source = trackers.best_total_source(best, evaluates_base_model=tcfg.eval_base_model or not tcfg.use_ema)
    epoch = best.best_ema_epoch if source == "ema" else best.best_regular_epoch
    evaluated = [r for r in rows if r.get("epoch") == epoch and any(str(k).startswith("val/") for k in r)]
    return summary.end_summary(
        best_epoch=epoch if epoch >= 0 else None,
        best_source=source,
        best_row=evaluated[-1] if evaluated else {},
        weights=sorted(out_dir.glob("*.pth")),
        times=times,
        epochs_run=_last_epoch(loop) + 1,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return fit(parse(FitArgs, argv, prog="rfdetr_fn fit"))


if __name__ == "__main__":
    run_or_exit(main)
