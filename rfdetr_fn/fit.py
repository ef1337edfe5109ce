"""Train a detector: `python -m rfdetr_fn.fit [--preset nano] [--config FILE] [--model.* --train.* --data.* --eval.*]`.

The loop reads top to bottom: build data, init or load weights, then for every epoch call the compiled
step on each batch, evaluate, update the best-model and early-stopping records, save, and stop early if
asked. Everything stateful lives in the train state and in small records saved with it, so a resumed run
continues exactly where the saved one stopped.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch

from rfdetr_fn import distributed, presets, runlog, trackers, train_state, tree, weights
from rfdetr_fn.adapt import load_weights
from rfdetr_fn.atomic import atomic_write
from rfdetr_fn.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from rfdetr_fn.data import (
    build_dataset,
    multi_scale_scales,
    per_batch_scale,
    resize_batch,
    target_slots,
    train_loader,
)
from rfdetr_fn.flags import parse
from rfdetr_fn.model import detector
from rfdetr_fn.step import compile_step, init_state, make_train_step, resolve_precision, seed_for_step, use_compile
from rfdetr_fn.validate import evaluate


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
    tcfg, dcfg, ecfg = args.train, args.data, args.eval
    world = distributed.setup(args.device)
    out_dir = Path(tcfg.output_dir)
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tcfg.seed)

    # ---- data: the train split fixes the label space for every split ----
    train_ds = build_dataset(dcfg, "train", args.model, tcfg, train=True)
    cfg = _align_classes(args.model, train_ds.num_classes)
    cfg = _align_keypoints(cfg, train_ds)
    val_ds = build_dataset(dcfg, "valid", cfg, tcfg, train=False)
    class_names = list(dcfg.class_names or train_ds.class_names)
    compiled = use_compile(tcfg.compile, world.device)
    # A compiled step compiles once per input shape: fix the target axis for the run, leaving image sizes
    # (one per multi-scale entry) as the only shapes that vary.
    slots = target_slots(train_ds) if compiled else None
    loader = train_loader(train_ds, tcfg, dcfg, world_size=world.size, rank=world.rank, seed=tcfg.seed, slots=slots)
    steps_per_epoch = max(1, len(loader) // tcfg.grad_accum_steps)

    # ---- weights and state ----
    if tcfg.pretrain_weights:
        _, params = load_weights(tcfg.pretrain_weights, cfg)
    else:
        params = detector.init(cfg, tcfg.seed)
    params = tree.to(params, world.device)
    state = init_state(params, tcfg)
    loop = {"epoch": 0, "batch": 0, "best": trackers.BestState(), "stop": trackers.EarlyStopState()}
    resume_dir = train_state.resume_dir(tcfg.resume, out_dir)
    if resume_dir is not None:
        state, loop = _restore(resume_dir, state, loop)
        if world.main:
            print(f"resumed from {resume_dir} at epoch {loop['epoch']}, step {int(state['step'])}")
    if world.main:
        _write_json(out_dir / "training_config.json", _config_record(args, cfg, class_names))

    precision = resolve_precision(tcfg.precision, world.device)
    scales = multi_scale_scales(cfg.resolution, tcfg.expanded_scales, cfg.patch_size, cfg.num_windows)
    step_fn = compile_step(
        make_train_step(cfg, tcfg, steps_per_epoch=steps_per_epoch, precision=precision, world_size=world.size),
        enabled=compiled,
        max_shapes=len(scales) + 1,
    )
    if compiled and world.main and tcfg.multi_scale != "off":
        print(
            f"compiling the train step: the first step at each of the {len(scales)} multi-scale sizes compiles "
            "(minutes each; inductor caches them for later runs); --train.compile off skips it"
        )
    log = runlog.RunLog(out_dir, tensorboard=tcfg.tensorboard, enabled=world.main)
    record: dict[str, Any] = {}

    step = int(state["step"])  # a Python mirror of state["step"]: reading the tensor every step would sync
    for epoch in range(loop["epoch"], tcfg.epochs):
        # Resuming mid-epoch skips the samples the saved run consumed without decoding them.
        loader.sampler.set_epoch(epoch, skip=loop["batch"] * tcfg.batch_size)
        bar = _progress(tcfg, world, steps_per_epoch, epoch)
        micro: list[dict] = []
        started, seen = time.perf_counter(), 0
        for index, batch in enumerate(loader, start=loop["batch"]):
            micro.append(tree.to(batch, world.device))
            if len(micro) < tcfg.grad_accum_steps:
                continue
            if tcfg.multi_scale == "per-batch":
                size = per_batch_scale(step, scales)
                micro = [resize_batch(b, size) for b in micro]
            torch.manual_seed(seed_for_step(tcfg.seed, step, world.rank))
            state, metrics = step_fn(state, micro)
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
        else:  # the epoch ran to its end: the next run starts the next epoch
            loop["epoch"], loop["batch"] = epoch + 1, 0
        if bar is not None:
            bar.close()
        last_epoch = epoch + 1 >= tcfg.epochs or bool(tcfg.max_steps and step >= tcfg.max_steps)

        # ---- evaluate, track the best weights, decide on stopping ----
        record = {"step": step, "epoch": epoch}
        if trackers.should_evaluate(epoch, eval_interval=tcfg.eval_interval, epochs=tcfg.epochs) or last_epoch:
            record.update(_evaluate_epoch(state, cfg, tcfg, dcfg, ecfg, val_ds, world))
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
            if world.main:
                _save_best(decisions, state, cfg, tcfg, epoch, class_names, out_dir)
                log.log(record)
                print(_summary(record))
            if tcfg.early_stopping and distributed.broadcast_object(stop, world):
                last_epoch = True
                if world.main:
                    patience = tcfg.early_stopping_patience
                    print(f"early stopping at epoch {epoch}: no improvement in {patience} evaluations")

        # ---- train-state checkpoints (all ranks take part in DCP) ----
        _save_state(out_dir / "last", state, loop)
        if trackers.should_checkpoint(epoch, checkpoint_interval=tcfg.checkpoint_interval, epochs=tcfg.epochs):
            _save_state(out_dir / f"checkpoint_{epoch:04d}", state, loop)
        if last_epoch:
            break

    if world.main:
        _finish(state, cfg, tcfg, _last_epoch(loop), class_names, out_dir, loop["best"])
        runlog.plot(log.rows, out_dir)
    log.close()
    if tcfg.run_test and world.main:
        from rfdetr_fn.validate import run_split

        _, best = load_weights(out_dir / "checkpoint_best_total.pth", cfg)
        record.update(run_split(best, cfg, dcfg, ecfg, tcfg, "test", world))
        print(_summary(record))
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
    """A keypoint model's schema and keypoint names follow the train split, like its classes."""
    if not cfg.keypoints:
        return cfg
    schema, names = dataset.keypoint_schema, dataset.keypoint_names
    flat = tuple(n for per_class in names for n in per_class)
    return attrs.evolve(cfg, num_keypoints_per_class=schema, keypoint_names=flat if len(flat) == sum(schema) else ())


def _state_tree(state: dict, loop: dict) -> dict:
    return {
        "state": state,
        "loop": {"epoch": loop["epoch"], "batch": loop["batch"]},
        "best": trackers.to_dict(loop["best"]),
        "stop": trackers.to_dict(loop["stop"]),
    }


def _save_state(path: Path, state: dict, loop: dict) -> None:
    train_state.save_state(path, _state_tree(state, loop))


def _restore(path: Path, state: dict, loop: dict) -> tuple[dict, dict]:
    restored = train_state.load_state(path, _state_tree(state, loop))
    loop = {
        "epoch": int(restored["loop"]["epoch"]),
        "batch": int(restored["loop"]["batch"]),
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


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2, default=str)))


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


def _evaluate_epoch(state, cfg, tcfg, dcfg, ecfg, val_ds, world) -> dict[str, float]:
    """EMA weights by default (spec pitfall 12); the base weights too when asked or when there is no EMA."""

    def score(params) -> dict[str, float]:
        batch_size = tcfg.eval_batch_size or tcfg.batch_size
        loss_cfg = tcfg if tcfg.compute_val_loss else None  # val/loss, like upstream's compute_val_loss
        return evaluate(
            params,
            cfg,
            val_ds,
            batch_size=batch_size,
            ecfg=ecfg,
            num_workers=dcfg.num_workers,
            world=world,
            loss_cfg=loss_cfg,
        )

    record: dict[str, float] = {}
    if tcfg.use_ema:
        record.update({f"val/ema_{k}": v for k, v in score(state["ema_state"]["params"]).items()})
    if tcfg.eval_base_model or not tcfg.use_ema:
        record.update({f"val/{k}": v for k, v in score(state["params"]).items()})
    else:  # EMA-only epochs are mirrored onto the primary keys, like upstream
        record.update({f"val/{k[len('val/ema_') :]}": v for k, v in list(record.items())})
    return record


def _monitored(record: dict, tcfg: TrainConfig) -> tuple[float | None, float | None]:
    key = {"map": "mAP_50_95", "mar": "mAR", "kp_map": "kp_mAP_50_95", "kp_mar": "kp_mAR"}[tcfg.best_model_metric]
    base_evaluated = tcfg.eval_base_model or not tcfg.use_ema
    regular = record.get(f"val/{key}") if base_evaluated else None
    ema = record.get(f"val/ema_{key}") if tcfg.use_ema else None
    return regular, ema


def _write_weights(name: str, params, cfg, tcfg, epoch: int, class_names, out_dir: Path, source=None) -> None:
    """One upstream-layout weights file (checkpoint_best_*.pth, last_ema.pth)."""
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


def _summary(record: dict) -> str:
    """The headline numbers of an evaluation (EMA twins when both models were scored)."""
    names = ("mAP_50_95", "mAP_50", "mAR", "segm_mAP_50_95", "kp_mAP_50_95", "kp_mAR", "F1")
    keys = [f"{prefix}{n}" for prefix in ("val/", "val/ema_", "test/") for n in names]
    return f"epoch {record.get('epoch')}: " + ", ".join(f"{k}={record[k]:.4f}" for k in keys if k in record)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    with warnings.catch_warnings():
        return fit(parse(FitArgs, argv))


if __name__ == "__main__":
    main()
