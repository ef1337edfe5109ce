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
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch

from rfdetr_fn import compiler, presets, tree
from rfdetr_fn.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from rfdetr_fn.data import (
    DatasetError,
    build_dataset,
    multi_scale_scales,
    per_batch_scale,
    resize_batch,
    target_slots,
    train_loader,
)
from rfdetr_fn.errors import TrainingDiverged
from rfdetr_fn.eval.loop import evaluate, run_split
from rfdetr_fn.flags import parse, run_or_exit
from rfdetr_fn.io import checkpoint, dirlock, distributed, formats, imageio, loggers, rundir, runlog, weights
from rfdetr_fn.io.weights import load_weights
from rfdetr_fn.model import detector, lora
from rfdetr_fn.model.precision import explain_precision, resolve_precision
from rfdetr_fn.step import compile_step, init_state, make_train_step
from rfdetr_fn.train import autobatch, grids, summary, trackers
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
        return _fit(args, held)


def _fit(args: FitArgs, held: contextlib.ExitStack) -> dict[str, Any]:
    tcfg, dcfg, ecfg = args.train, args.data, args.eval
    world = distributed.setup(args.device)
    threads = distributed.set_threads(world)
    out_dir = Path(tcfg.output_dir)
    resume_dir = checkpoint.resume_dir(tcfg.resume, out_dir)
    if resume_dir is None and not tcfg.overwrite:
        rundir.refuse_used_dir(out_dir)
    torch.manual_seed(tcfg.seed)

    # ---- data: the train split fixes the label space for every split ----
    train_ds = build_dataset(dcfg, "train", args.model, tcfg, train=True)
    cfg = _align_classes(args.model, train_ds.num_classes)
    cfg = _align_keypoints(cfg, train_ds)
    if tcfg.batch_size == "auto":
        tcfg = _auto_batch(cfg, tcfg, world)
        args = attrs.evolve(args, train=tcfg)
    val_ds = build_dataset(dcfg, "valid", cfg, tcfg, train=False)
    test_ds = _test_split(dcfg, cfg, tcfg) if tcfg.run_test else None
    if dcfg.check_images:
        _check_images([train_ds, val_ds, test_ds])
    class_names = list(dcfg.class_names or train_ds.class_names)
    if tcfg.save_dataset_grids and world.main:
        written = grids.write_dataset_grids(train_ds, val_ds, cfg, tcfg, dcfg, class_names, out_dir)
        print(f"dataset grids: {len(written)} PNG files in {out_dir / 'dataset_grids'}")
    compiled = compiler.use_compile(tcfg.compile, world.device)
    # A compiled or graphed step specialises on input shapes: fix the target axis for the run, leaving image
    # sizes (one per multi-scale entry) as the only shapes that vary.
    slots = target_slots(train_ds) if compiled or tcfg.cuda_graphs else None
    loader = train_loader(train_ds, tcfg, dcfg, world_size=world.size, rank=world.rank, seed=tcfg.seed, slots=slots)
    steps_per_epoch = max(1, len(loader) // tcfg.grad_accum_steps)
    if world.main:  # only now that the data is known to load
        out_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(dirlock.exclusive(out_dir))
        if resume_dir is None and tcfg.overwrite:
            rundir.clear_run(out_dir)

    # ---- weights and state ----
    if tcfg.pretrain_weights:
        _, params = load_weights(tcfg.pretrain_weights, cfg)
    else:
        params = detector.init(cfg, tcfg.seed)
    if cfg.backbone_lora:  # fresh DoRA adapters, unless the weights file brought trained ones
        params = lora.add_upstream_adapters(params, seed=tcfg.seed)
    params = tree.to(params, world.device)
    state = init_state(params, tcfg, cfg)
    loop = {"epoch": 0, "batch": 0, "eval_pending": -1, "best": trackers.BestState(), "stop": trackers.EarlyStopState()}
    if resume_dir is not None:
        state, loop = _restore(resume_dir, state, loop)
        if world.main:
            print(f"resumed from {resume_dir} at epoch {loop['epoch']}, step {int(state['step'])}")
    sinks = []
    if world.main:
        record = _config_record(args, cfg, class_names)
        if resume_dir is not None:
            rundir.check_resume_changes(out_dir, record, tcfg, int(state["step"]))
        rundir.write_json(out_dir / "training_config.json", record)
        sinks = loggers.make_loggers(tcfg, out_dir, record)

    precision = resolve_precision(tcfg.precision, world.device)
    scales = multi_scale_scales(cfg.resolution, tcfg.expanded_scales, cfg.patch_size, cfg.num_windows)
    step_fn = compile_step(
        make_train_step(
            cfg, tcfg, steps_per_epoch=steps_per_epoch, precision=precision, world_size=world.size, rank=world.rank
        ),
        enabled=compiled,
        max_shapes=len(scales) + 1,
        update=world.device.type == "cuda",  # CPU: the update's compile took 63 % of Nano's cold time, won nothing
    )
    step_fn = graphed_step(
        step_fn,
        tcfg,
        world.device,
        world_size=world.size,
        max_graphs=len(scales) + 1,
        log=print if world.main else None,
    )
    cache = None
    if compiled:  # every rank loads the artifacts of this exact graph-shaping configuration
        cache = compiler.CompileCache(
            Path(tcfg.compile_cache) if tcfg.compile_cache else compiler.default_cache_dir(),
            compiler.cache_key(
                cfg,
                tcfg,
                device=world.device,
                precision=precision,
                steps=steps_per_epoch,
                world=world.size,
                slots=slots,
            ),
        )
        loaded = cache.load()
        if world.main:
            sizes = len(scales) if tcfg.multi_scale != "off" else 1
            compiler.announce(f"the train step ({sizes} input size(s))", world.device, cache, loaded)
    log = runlog.RunLog(out_dir, tensorboard=tcfg.tensorboard, enabled=world.main, sinks=sinks)
    if resume_dir is not None:  # rows a killed run logged after its last save are replayed: drop them
        log.rewind(int(state["step"]), evaluated=loop["eval_pending"] < 0)
    run = _Run(cfg, tcfg, dcfg, ecfg, val_ds, world, log, out_dir, class_names, compiled)
    record: dict[str, Any] = {}
    times = {"train": 0.0, "eval": 0.0, "save": 0.0}
    if world.main:
        print(
            summary.start_summary(
                model=f"{cfg.model_name} ({cfg.resolution} px)",
                num_params=tree.num_params(state["params"]),
                num_classes=cfg.num_classes,
                train_images=len(train_ds),
                val_images=len(val_ds),
                batch_size=tcfg.batch_size,
                grad_accum_steps=tcfg.grad_accum_steps,
                world_size=world.size,
                steps_per_epoch=steps_per_epoch,
                epochs=tcfg.epochs,
                max_steps=tcfg.max_steps,
                device=f"{world.device} ({threads} threads)" if world.device.type == "cpu" else str(world.device),
                precision=explain_precision(tcfg.precision, world.device),
                compiled=compiled,
                output_dir=out_dir,
                resumed_epoch=loop["epoch"] if resume_dir is not None else None,
            )
        )

    step = int(state["step"])  # a Python mirror of state["step"]: reading the tensor every step would sync
    stopped = False
    if loop["eval_pending"] >= 0:  # the saved run stopped before (or while) evaluating that epoch
        record, stopped = _evaluate_and_track(run, state, loop, step, saved=None)
    for epoch in range(loop["epoch"], 0 if stopped else tcfg.epochs):
        # Resuming mid-epoch skips the samples the saved run consumed without decoding them.
        loader.sampler.set_epoch(epoch, skip=loop["batch"] * tcfg.batch_size)
        bar = _progress(tcfg, world, steps_per_epoch, epoch)
        micro: list[dict] = []
        started, seen = time.perf_counter(), 0
        epoch_started = started
        for index, batch in enumerate(loader, start=loop["batch"]):
            micro.append(tree.to(batch, world.device))
            if len(micro) < tcfg.grad_accum_steps:
                continue
            if tcfg.multi_scale == "per-batch":
                size = per_batch_scale(step, scales)
                micro = [resize_batch(b, size) for b in micro]
            new_state, metrics = step_fn(state, micro)
            if not _finite_step(metrics, precision):  # the pure step left `state` intact: keep it
                _save_state(out_dir / "last", state, loop)
                raise TrainingDiverged(_divergence_message(metrics, step, tcfg, out_dir))
            state = new_state
            if cache is not None:
                cache.save_if_new()  # a counter check; writes only after a step that compiled
            seen += sum(len(b["images"]) for b in micro)
            micro = []
            step, loop["batch"] = step + 1, index + 1
            if bar is not None:
                bar.update(1)
            if step % tcfg.log_every_n_steps == 0 or step == 1:
                row = _train_row(metrics, step, epoch, tcfg)
                log.log(row)
                if bar is not None:
                    rate = seen / (time.perf_counter() - started)
                    bar.set_postfix(loss=f"{row['train/loss']:.3f}", img_s=f"{rate:.1f}")
            if tcfg.max_steps and step >= tcfg.max_steps:
                break
            if tcfg.save_every_n_steps and step % tcfg.save_every_n_steps == 0 and index + 1 < len(loader):
                _save_state(out_dir / "last", state, loop)  # mid-epoch: the epoch end saves anyway
        else:  # the epoch ran to its end: the next run starts the next epoch
            loop["epoch"], loop["batch"] = epoch + 1, 0
        if bar is not None:
            bar.close()
        times["train"] += time.perf_counter() - epoch_started
        last_epoch = epoch + 1 >= tcfg.epochs or bool(tcfg.max_steps and step >= tcfg.max_steps)
        evaluating = trackers.should_evaluate(epoch, eval_interval=tcfg.eval_interval, epochs=tcfg.epochs)

        # ---- save first (all ranks take part in DCP): a failing evaluation must not cost the epoch ----
        loop["eval_pending"] = epoch if evaluating or last_epoch else -1
        numbered = trackers.should_checkpoint(epoch, checkpoint_interval=tcfg.checkpoint_interval, epochs=tcfg.epochs)
        save_started = time.perf_counter()
        _save_state(out_dir / "last", state, loop, keep=f"checkpoint_{epoch:04d}" if numbered else None)
        times["save"] += time.perf_counter() - save_started

        # ---- evaluate, track the best weights, decide on stopping ----
        record = {"step": step, "epoch": epoch}
        if loop["eval_pending"] >= 0:
            eval_started = time.perf_counter()
            record, stop = _evaluate_and_track(run, state, loop, step, saved=out_dir / "last")
            times["eval"] += time.perf_counter() - eval_started
            last_epoch = last_epoch or stop
        if last_epoch:
            break

    if world.main:
        save_started = time.perf_counter()
        _finish(state, cfg, tcfg, _last_epoch(loop), class_names, out_dir, loop["best"])
        times["save"] += time.perf_counter() - save_started
        runlog.plot(log.rows, out_dir)
        print(_end_summary(loop, tcfg, log.rows, out_dir, times))
    log.close()
    if tcfg.run_test and world.main:
        _, best = load_weights(out_dir / "checkpoint_best_total.pth", cfg)
        record.update(run_split(best, cfg, dcfg, ecfg, tcfg, "test", world))
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


def _check_images(datasets: list) -> None:
    """Every image header of every split, all problems in one error (an epoch must not end on a bad file)."""
    items: dict[Path, tuple[Path, int, int]] = {}
    for ds in datasets:
        if ds is not None and ds.render is None and ds.image_dir is not None:
            for i, entry in enumerate(ds.images):
                path = ds.image_path(i)
                items.setdefault(path, (path, entry["width"], entry["height"]))
    bad, odd = imageio.check_headers(list(items.values()))
    if odd:
        shown = "\n  ".join(odd[:10]) + (f"\n  ... and {len(odd) - 10} more" if len(odd) > 10 else "")
        warnings.warn(
            f"{len(odd)} image(s) differ in size from their annotation (boxes may be in another frame):\n  {shown}",
            stacklevel=3,
        )
    if bad:
        shown = "\n  ".join(bad[:200]) + (f"\n  ... and {len(bad) - 200} more" if len(bad) > 200 else "")
        raise DatasetError(f"{len(bad)} unusable image(s) found before training (all splits checked):\n  {shown}")


def _auto_batch(cfg: ModelConfig, tcfg: TrainConfig, world) -> TrainConfig:
    """Resolve batch_size auto on rank 0 (a probe of real steps on a synthetic worst-case batch) for all ranks."""
    choice = None
    if world.main:
        params = detector.init(cfg, tcfg.seed)
        if cfg.backbone_lora:
            params = lora.add_upstream_adapters(params, seed=tcfg.seed)
        params = tree.to(params, world.device)
        choice = autobatch.resolve(cfg, tcfg, params, world.device, world.size)
        print(choice.describe())
    choice = distributed.broadcast_object(choice, world)
    return attrs.evolve(tcfg, batch_size=choice.micro_batch, grad_accum_steps=choice.grad_accum_steps)


def _state_tree(state: dict, loop: dict) -> dict:
    return {
        "state": state,
        "loop": {"epoch": loop["epoch"], "batch": loop["batch"], "eval_pending": loop["eval_pending"]},
        "best": trackers.to_dict(loop["best"]),
        "stop": trackers.to_dict(loop["stop"]),
    }


def _save_state(path: Path, state: dict, loop: dict, keep: str | None = None) -> None:
    """One save per epoch: `last/`, plus a hard-linked numbered copy when `keep` names one."""
    checkpoint.save_state(path, _state_tree(state, loop), keep=keep)


def _restore(path: Path, state: dict, loop: dict) -> tuple[dict, dict]:
    template = _state_tree(state, loop)
    try:
        restored = checkpoint.load_state(path, template)
    except formats.CheckpointError as err:  # saved before evaluations were tracked: none was pending
        if "missing loop/eval_pending" not in str(err):
            raise
        del template["loop"]["eval_pending"]
        restored = checkpoint.load_state(path, template)
        restored["loop"]["eval_pending"] = -1
    loop = {
        "epoch": int(restored["loop"]["epoch"]),
        "batch": int(restored["loop"]["batch"]),
        "eval_pending": int(restored["loop"]["eval_pending"]),
        "best": trackers.from_dict(trackers.BestState, restored["best"]),
        "stop": trackers.from_dict(trackers.EarlyStopState, restored["stop"]),
    }
    return restored["state"], loop


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


@attrs.frozen
class _Run:
    """What the evaluation and best-model bookkeeping of a run read."""

    cfg: ModelConfig
    tcfg: TrainConfig
    dcfg: DataConfig
    ecfg: EvalConfig
    val_ds: Any
    world: Any
    log: runlog.RunLog
    out_dir: Path
    class_names: list[str]
    step_compiled: bool = False


def _evaluate_and_track(run: _Run, state: dict, loop: dict, step: int, saved: Path | None) -> tuple[dict, bool]:
    """Evaluate the epoch `loop["eval_pending"]`, update the best-model and early-stopping records (also in
    the state directory `saved`, when given), write the best weights and the metrics row; -> (record, stop)."""
    tcfg, epoch = run.tcfg, loop["eval_pending"]
    record = {"step": step, "epoch": epoch}
    record.update(_evaluate_epoch(state, run.cfg, tcfg, run.dcfg, run.ecfg, run.val_ds, run.world, run.step_compiled))
    regular, ema = _monitored(record, tcfg)
    loop["best"], decisions = trackers.update_best(
        loop["best"],
        epoch=epoch,
        regular=regular,
        ema=ema,
        skip_best_epochs=tcfg.skip_best_epochs,
        smooth_alpha=tcfg.smooth_alpha,
    )
    loop["stop"], stop = trackers.update_early_stop(
        loop["stop"],
        epoch=epoch,
        regular=regular,
        ema=ema,
        use_ema=tcfg.early_stopping_use_ema,
        patience=tcfg.early_stopping_patience,
        min_delta=tcfg.early_stopping_min_delta,
        skip_best_epochs=tcfg.skip_best_epochs,
    )
    loop["eval_pending"] = -1
    if run.world.main:
        _save_best(decisions, state, run.cfg, tcfg, epoch, run.class_names, run.out_dir)
        run.log.log(record)
        print(summary.epoch_line(record, summary.scored_weights(tcfg.eval_base_model, tcfg.use_ema)))
        if saved is not None:  # saved before this evaluation: give it the new records (a small JSON rewrite)
            records = _state_tree(state, loop)
            checkpoint.update_values(saved, {k: v for k, v in records.items() if k != "state"})
    stop = bool(tcfg.early_stopping and distributed.broadcast_object(stop, run.world))
    if stop and run.world.main:
        print(f"early stopping at epoch {epoch}: no improvement in {tcfg.early_stopping_patience} evaluations")
    return record, stop


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


def _write_weights(name: str, params, cfg, tcfg, epoch: int, class_names, out_dir: Path, source=None) -> None:
    """One upstream-layout weights file (checkpoint_best_*.pth, last_ema.pth); never non-finite weights."""
    bad = [k for k, v in tree.flatten(params).items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainingDiverged(f"{out_dir / name}: not written: non-finite weights in {bad[:5]}")
    args = {**attrs.asdict(tcfg), "class_names": class_names}
    weights.write_upstream_best(
        out_dir / name, params, cfg, epoch=epoch, class_names=class_names, train_args=args, source=source
    )


def _save_best(decisions, state, cfg, tcfg, epoch, class_names, out_dir: Path) -> None:
    if "regular" in decisions:
        _write_weights("checkpoint_best_regular.pth", state["params"], cfg, tcfg, epoch, class_names, out_dir)
    if "ema" in decisions:
        _write_weights("checkpoint_best_ema.pth", state["ema_state"]["params"], cfg, tcfg, epoch, class_names, out_dir)


def _last_epoch(loop: dict) -> int:
    return max(0, loop["epoch"] - 1)


def _finish(state, cfg, tcfg, epoch, class_names, out_dir: Path, best) -> None:
    """Upstream's end-of-fit files: best EMA backfill, best_total (strict > rule) and last_ema."""
    final = state["ema_state"]["params"] if tcfg.use_ema else state["params"]
    if tcfg.use_ema and not (out_dir / "checkpoint_best_ema.pth").exists():
        _write_weights("checkpoint_best_ema.pth", final, cfg, tcfg, epoch, class_names, out_dir)
    source = trackers.best_total_source(best, evaluates_base_model=tcfg.eval_base_model or not tcfg.use_ema)
    winner = out_dir / f"checkpoint_best_{source}.pth"
    if winner.exists():
        _, params = load_weights(winner, cfg)
        _write_weights("checkpoint_best_total.pth", params, cfg, tcfg, epoch, class_names, out_dir, source=source)
    _write_weights("last_ema.pth", final, cfg, tcfg, epoch, class_names, out_dir)


def _end_summary(loop: dict, tcfg: TrainConfig, rows: list[dict], out_dir: Path, times: dict) -> str:
    best = loop["best"]
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
    return fit(parse(FitArgs, argv))


if __name__ == "__main__":
    run_or_exit(main)
