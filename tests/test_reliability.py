"""Nothing lost, nothing silently wrong: one test per reported defect of issue 15 (fit, resume, data, predict)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from rfdetr_fn import cli, tree
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.fit import FitArgs
from rfdetr_fn.flags import parse, run_or_exit
from rfdetr_fn.io import atomic, checkpoint, weights
from rfdetr_fn.io.weights import load_weights

DATA = ["--data.synthetic-images", "4", "--data.synthetic-size", "64", "--data.num-workers", "0"]


def fit_argv(out, *extra: str) -> list[str]:
    """A few-second run of a one-layer tiny model on the built-in shapes (fewer tensors: faster saves)."""
    return [
        "fit",
        "--preset", "tiny", "--model.resolution", "64", "--model.vit-num-layers", "1",
        "--model.out-feature-indexes", "1", "--model.dec-layers", "1", *DATA,
        "--train.batch-size", "2", "--train.multi-scale", "off", "--train.compile", "off",
        "--train.no-progress-bar", "--train.no-tensorboard", "--train.output-dir", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    from rfdetr_fn.io import runlog

    monkeypatch.setattr(runlog, "plot", lambda rows, out: [])


def make_roboflow(root, counts=(("train", 4), ("valid", 2)), size=64):
    """A Roboflow-layout dataset of plain PNGs, one box each; returns the root."""
    cats = [{"id": 0, "name": "shapes", "supercategory": "none"}, {"id": 1, "name": "sq", "supercategory": "shapes"}]
    for split, n in counts:
        folder = root / split
        folder.mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            name = f"{split}{i}.png"
            Image.new("RGB", (size, size), (40 * i % 256, 80, 160)).save(folder / name)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            box = [8, 8, 24, 24]
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": box, "area": 576, "iscrowd": 0})
        coco = {"images": images, "annotations": anns, "categories": cats}
        (folder / "_annotations.coco.json").write_text(json.dumps(coco))
    return root


def rows(out) -> list[dict]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def fake_step(nan_at: int | None = None):
    """A stand-in for make_train_step: moves every weight a little (NaN from step `nan_at` on), no model run."""

    def make(cfg, tcfg, **kw):
        def step(state, batches):
            n = int(state["step"]) + 1
            bump = math.nan if nan_at is not None and n >= nan_at else 1e-3
            params = tree.map_(lambda p: p + bump, state["params"])
            ema = {**state["ema_state"], "params": params} if state["ema_state"] else {}
            loss = torch.tensor(bump)
            metrics = {"loss": loss, "grad_norm": loss, "lr_factor": torch.tensor(1.0), "finite": torch.isfinite(loss)}
            return {**state, "step": state["step"] + 1, "params": params, "ema_state": ema}, metrics

        import attrs

        from rfdetr_fn.step import make_train_step

        return attrs.evolve(make_train_step(cfg, tcfg, **kw), step=step)  # the real `init`, the fake step

    return make


@pytest.fixture
def cheap_fit(monkeypatch):
    """Swap the model step and the evaluation for stand-ins: fit's bookkeeping runs in about a second."""
    from rfdetr_fn import fit

    monkeypatch.setattr(fit, "make_train_step", fake_step())
    monkeypatch.setattr(fit, "_evaluate_epoch", lambda state, *a: {"val/mAP_50_95": 0.0, "val/ema_mAP_50_95": 0.0})
    return monkeypatch


def _all_finite(path) -> bool:
    _, params = load_weights(path)
    return all(bool(torch.isfinite(v).all()) for v in tree.flatten(params).values())


# ---------------------------------------------------------------- 2. non-finite guard


def test_2_divergence_stops_with_last_good_state_and_no_nan_weights(tmp_path, cheap_fit):
    """What --train.lr 1e6 does (NaN from step 2), with the step stubbed: the real NaN backward takes 10 s."""
    from rfdetr_fn import fit

    cheap_fit.setattr(fit, "make_train_step", fake_step(nan_at=2))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"non-finite .* at step 2.*lr"):
        cli.main(fit_argv(out, "--train.epochs", "3"))
    restored = checkpoint.load_state(out / "last", {"state": {"step": torch.zeros((), dtype=torch.int64)}})
    assert int(restored["state"]["step"]) == 1  # the last good state
    assert not (out / "checkpoint_best_total.pth").exists() and not (out / "last_ema.pth").exists()
    for wfile in out.glob("*.pth"):
        assert _all_finite(wfile), wfile


def test_2_non_finite_config_values_are_rejected():
    bad = {"lr": math.nan, "weight_decay": math.inf, "clip_max_norm": math.nan, "betas": (0.9, math.nan)}
    for field, value in bad.items():
        with pytest.raises(ValueError, match=f"{field}=.*finite"):
            TrainConfig(**{field: value})
    with pytest.raises(SystemExit):
        parse(FitArgs, ["--train.lr", "nan"])


# ---------------------------------------------------------------- 1. a fresh run into a used output dir


def test_1_fresh_run_refuses_a_used_output_dir_and_overwrite_starts_clean(tmp_path, cheap_fit):
    from rfdetr_fn import fit

    out = tmp_path / "run"
    cheap_fit.setattr(fit, "_evaluate_epoch", lambda *a: {"val/mAP_50_95": 0.5, "val/ema_mAP_50_95": 0.5})
    cli.main(fit_argv(out, "--train.epochs", "1"))  # the old run: its EMA scored 0.5
    old_rows = len((out / "metrics.csv").read_text().splitlines())
    cheap_fit.setattr(fit, "_evaluate_epoch", lambda *a: {"val/mAP_50_95": 0.0, "val/ema_mAP_50_95": 0.0})
    with pytest.raises(ValueError, match=r"run\b.*already.*--train.resume auto.*--train.overwrite"):
        cli.main(fit_argv(out, "--train.epochs", "1", "--train.seed", "5"))
    assert len((out / "metrics.csv").read_text().splitlines()) == old_rows  # nothing touched

    cli.main(fit_argv(out, "--train.epochs", "1", "--train.seed", "5", "--train.overwrite"))
    assert len((out / "metrics.csv").read_text().splitlines()) == old_rows  # the new run's rows only
    _, best = load_weights(out / "checkpoint_best_total.pth")
    _, last = load_weights(out / "last_ema.pth")  # the new run never beat 0: best = its final EMA
    assert all(torch.equal(v, tree.flatten(last)[k]) for k, v in tree.flatten(best).items())


# ---------------------------------------------------------------- 3. bad images found before training


def test_3_every_bad_image_of_every_split_is_reported_before_training(tmp_path, cheap_fit):
    data = make_roboflow(tmp_path / "data")
    (data / "valid" / "valid1.png").write_bytes(b"")  # zero bytes
    (data / "train" / "train2.png").write_text("not an image")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"2 unusable image") as err:
        cli.main(fit_argv(out, "--data.dataset-dir", str(data)))
    assert "valid1.png: empty file" in str(err.value) and "train2.png: unreadable" in str(err.value)
    assert not out.exists()  # nothing trained, nothing written


def test_3_state_is_saved_before_evaluating_and_a_resume_evaluates_first(tmp_path, cheap_fit):
    from rfdetr_fn import fit

    def broken(*a):
        raise OSError("disk hiccup while evaluating")

    out = tmp_path / "run"
    cheap_fit.setattr(fit, "_evaluate_epoch", broken)
    with pytest.raises(OSError, match="hiccup"):
        cli.main(fit_argv(out, "--train.epochs", "1"))
    template = {"state": {"step": torch.zeros((), dtype=torch.int64)}, "loop": {"epoch": 0, "eval_pending": 0}}
    saved = checkpoint.load_state(out / "last", template)
    assert int(saved["state"]["step"]) > 0 and saved["loop"] == {"epoch": 1, "eval_pending": 0}  # epoch kept

    cheap_fit.setattr(fit, "_evaluate_epoch", lambda *a: {"val/mAP_50_95": 0.25, "val/ema_mAP_50_95": 0.25})
    cli.main(fit_argv(out, "--train.epochs", "1", "--train.resume", "auto"))
    evaluated = [r for r in rows(out) if r.get("val/mAP_50_95")]
    assert [(r["epoch"], r["val/mAP_50_95"]) for r in evaluated] == [("0", "0.25")]
    assert (out / "checkpoint_best_ema.pth").exists()


# ---------------------------------------------------------------- 8. a kill between the two renames of a save


def test_8_resume_takes_the_newest_complete_copy_and_keeps_one_row_per_step(tmp_path, cheap_fit, capsys):
    import shutil

    out = tmp_path / "run"
    every = ("--train.epochs", "2", "--train.log-every-n-steps", "1")
    real_save = checkpoint.save_state

    def save_and_copy_the_first(directory, state, **kw):
        real_save(directory, state, **kw)
        if not (tmp_path / "at_step_2").exists():
            shutil.copytree(directory, tmp_path / "at_step_2")

    cheap_fit.setattr(checkpoint, "save_state", save_and_copy_the_first)
    cli.main(fit_argv(out, *every, "--train.max-steps", "4", "--train.save-every-n-steps", "2"))
    cheap_fit.setattr(checkpoint, "save_state", real_save)
    # killed mid-swap of the step-4 save: the old copy moved aside, the new one complete under its temp name
    (out / "last").rename(out / "last.tmp-999")
    (tmp_path / "at_step_2").rename(out / "last.old-999")
    logged = rows(out)
    with (out / "metrics.csv").open("a", newline="") as f:  # a row the killed run logged after its last save
        csv.DictWriter(f, fieldnames=list(logged[0])).writerow({**logged[-2], "step": "5"})
    capsys.readouterr()
    cli.main(fit_argv(out, *every, "--train.resume", "auto"))
    assert "last.tmp-999 at epoch 0, step 4" in capsys.readouterr().out
    steps = [int(r["step"]) for r in rows(out) if r.get("train/loss")]
    assert steps == list(range(1, 11))  # every step once, none replayed twice
    assert sorted(p.name for p in out.glob("last*")) == ["last", "last_ema.pth"]


# ---------------------------------------------------------------- 7. resume with a changed config


def test_7_resume_refuses_trajectory_changes_unless_allowed_and_keeps_the_history(tmp_path, cheap_fit, capsys):
    out = tmp_path / "run"
    cli.main(fit_argv(out, "--train.epochs", "2", "--train.max-steps", "2"))
    saved = (out / "training_config.json").read_text()
    changed = ("--train.epochs", "3", "--train.lr", "0.001", "--train.batch-size", "1", "--train.resume", "auto")
    refused = r"(?s)train.batch_size: 2 -> 1.*train.lr: 0.0001 -> 0.001.*allow-changes"
    with pytest.raises(ValueError, match=refused) as e:
        cli.main(fit_argv(out, *changed))
    assert "epochs" not in str(e.value)  # training longer is not a different trajectory
    assert (out / "training_config.json").read_text() == saved

    capsys.readouterr()
    cli.main(fit_argv(out, *changed, "--train.max-steps", "3", "--train.resume-allow-changes"))
    assert "train.lr: 0.0001 -> 0.001" in capsys.readouterr().out
    assert json.loads((out / "training_config.json").read_text())["train"]["lr"] == 0.001
    (history,) = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert history["step"] == 2 and history["changes"]["train.lr"] == [0.0001, 0.001]
    assert history["previous"]["train"]["lr"] == 0.0001


# ---------------------------------------------------------------- 9. config-file values typed like flags


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  use_ema: 'no'\n", "train.use_ema: expected true or false, got 'no'"),
        ("train:\n  batch_size: 2.5\n", "train.batch_size: expected an integer or auto, got 2.5"),
        ("model:\n  resolutoin: 256\n", r"model.resolutoin: unknown field \(did you mean resolution\?\)"),
        ("preset: tiny\nmodel:\n  resolutoin: 256\n", r"model.resolutoin: unknown field"),
        ("train:\n  multi_scale: sometimes\n", r"train.multi_scale: expected one of 'off', 'per-batch', 'per-sample'"),
        ("model:\n  resolution: 500\n", r"\[model\] resolution=500 must be divisible"),
        ("train:\n  lr: .nan\n", r"\[train\] lr=nan must be finite"),
    ],
)
def test_9_config_file_values_are_validated_like_flags_naming_file_and_key(tmp_path, text, message):
    from rfdetr_fn.config import ConfigError

    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"exp.yaml: {message}"):
        parse(FitArgs, ["--config", str(path)])


def test_9_config_file_values_convert_like_flags(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  multi_scale: off\n  compile: on\n  epochs: '3'\n  lr: 1e-4\n  betas: [0.8, 0.9]\n")
    train = parse(FitArgs, ["--config", str(path)]).train
    assert (train.multi_scale, train.compile, train.epochs, train.lr, train.betas) == ("off", "on", 3, 1e-4, (0.8, 0.9))


# ---------------------------------------------------------------- 4, 5. decoding: EXIF orientation, 16-bit


def _train_split(data):
    from rfdetr_fn import presets
    from rfdetr_fn.config import DataConfig
    from rfdetr_fn.data import build_dataset

    return build_dataset(DataConfig(dataset_dir=str(data)), "train", presets.tiny(), TrainConfig(), train=False)


def test_4_exif_orientation_is_applied_by_every_reader_and_sizes_are_checked(tmp_path):
    from rfdetr_fn.eval.inference import read_image
    from rfdetr_fn.io import imageio

    data = make_roboflow(tmp_path / "data", counts=(("train", 1),), size=48)
    stored = Image.new("RGB", (32, 48), (200, 30, 30))  # a phone photo stored sideways, 32 wide
    stored.paste((30, 30, 200), (0, 0, 32, 8))  # blue along the stored top edge
    exif = Image.Exif()
    exif[imageio.EXIF_ORIENTATION] = 6  # "rotate 90° clockwise to view": upright it is 48 wide, 32 tall
    path = data / "train" / "train0.png"
    stored.save(path, format="JPEG", exif=exif, quality=95)

    upright = read_image(path, "test")
    assert upright.shape == (32, 48, 3) and upright[16, -3, 2] > 150  # the blue edge is on the right now
    assert _train_split(data).load_image(0).size == (48, 32)
    assert imageio.header_size(path) == (48, 32)
    bad, odd = imageio.check_headers([(path, 32, 48)])  # annotated in the stored frame
    assert bad == [] and odd == [f"{path}: decodes as 48x32 (upright), annotated 32x48"]


def test_5_sixteen_bit_png_decodes_to_scaled_8_bit(tmp_path):
    import numpy as np

    from rfdetr_fn.eval.inference import read_image

    data = make_roboflow(tmp_path / "data", counts=(("train", 1),), size=64)
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    path = data / "train" / "train0.png"
    Image.fromarray(ramp).save(path)
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    got = read_image(path, "test")
    assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 2], expected)
    assert np.array_equal(np.asarray(_train_split(data).load_image(0))[..., 1], expected)


# ---------------------------------------------------------------- 10. predict: bad files skipped and reported


def test_10_predict_skips_and_reports_bad_files_and_writes_every_result(tmp_path, monkeypatch, capsys):
    import rfdetr_fn as rf

    cfg = rf.presets.tiny(num_classes=2, resolution=64)
    wfile = tmp_path / "w.pth"
    weights.save_weights(wfile, rf.init(cfg, 0), cfg, class_names=["a", "b"])
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(photos / "a.png")
    Image.new("RGB", (80, 80), (40, 40, 200)).save(photos / "big.png")
    (photos / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource-fork junk
    (photos / "fake.jpg").write_text("<html>not a photo</html>")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1600)  # 80x80 is a "decompression bomb" now (> 2x)
    pred = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(wfile), "--images", str(photos), "--output-dir", str(pred), "--no-draw"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 1
    records = json.loads((pred / "predictions.json").read_text())
    assert [r["image"].rsplit("/", 1)[1] for r in records] == ["._a.jpg", "a.png", "big.png", "fake.jpg"]
    assert [("error" in r) for r in records] == [True, False, True, True] and records[1]["width"] == 64
    assert "--allow-large-images" in records[2]["error"]
    err = capsys.readouterr().err
    assert "fake.jpg" in err and "._a.jpg" in err and "3 of 4 image(s) could not be read" in err
    assert len((pred / "predictions.jsonl").read_text().splitlines()) == 4  # written as it went

    records = cli.main([*argv, "--allow-large-images", "--images", str(photos / "big.png")])
    assert records[0]["width"] == 80 and "error" not in records[0]
    with pytest.raises(ValueError, match="https://x.org/a.jpg: URLs are not supported"):
        cli.main([*argv, "--images", "https://x.org/a.jpg"])


# ---------------------------------------------------------------- 6. one run per output dir


def test_6_output_dir_lock_refuses_a_second_run_and_replaces_a_stale_one(tmp_path, cheap_fit, capsys):
    import socket
    import subprocess

    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".rfdetr_fn.lock"
    other = subprocess.Popen(["sleep", "60"])  # a live run A
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": "earlier"}))
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {other.pid} on {socket.gethostname()}"):
            cli.main(fit_argv(out, "--train.epochs", "1"))
        assert sorted(p.name for p in out.iterdir()) == [lock.name]  # run A's files untouched
    finally:
        other.kill()
        other.wait()
    # run A died without releasing: its lock is stale and is taken over
    capsys.readouterr()
    cli.main(fit_argv(out, "--train.epochs", "1"))
    assert f"stale lock of pid {other.pid}" in capsys.readouterr().out
    assert not lock.exists() and (out / "last_ema.pth").exists()  # released at exit


# ---------------------------------------------------------------- also: early checks, mid-epoch saves


def test_also_run_test_and_dataset_dir_are_checked_before_anything_is_written(tmp_path, cheap_fit):
    from rfdetr_fn.data import DatasetError

    data = make_roboflow(tmp_path / "data")  # train and valid, no test split
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=r"--train.run-test needs a test split: .*test: split directory not found"):
        cli.main(fit_argv(out, "--data.dataset-dir", str(data), "--train.run-test"))
    with pytest.raises(DatasetError, match="nowhere: dataset_dir not found"):
        cli.main(fit_argv(out, "--data.dataset-dir", str(tmp_path / "nowhere")))
    assert not out.exists()


def test_also_train_state_is_saved_every_n_steps(tmp_path, cheap_fit):
    from rfdetr_fn import fit

    saved = []
    cheap_fit.setattr(fit, "_save_state", lambda path, state, loop, keep=None: saved.append(int(state["step"])))
    cheap_fit.setattr(checkpoint, "update_values", lambda *a: None)
    cli.main(fit_argv(tmp_path / "run", "--train.epochs", "2", "--train.save-every-n-steps", "2"))
    assert saved == [2, 4, 5, 6, 8, 10]  # mid-epoch every 2 steps and at each epoch end


# ---------------------------------------------------------------- also: the CLI prints known errors alone


def test_also_cli_prints_the_message_alone_with_exit_2_and_the_traceback_on_request(tmp_path, capsys, monkeypatch):
    from rfdetr_fn.data import DatasetError

    argv = fit_argv(tmp_path / "run", "--data.dataset-dir", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as exit_:
        run_or_exit(cli.main, argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[0] == f"error: {tmp_path / 'nowhere'}: dataset_dir not found"
    with pytest.raises(DatasetError):
        run_or_exit(cli.main, [*argv, "--debug"])
    monkeypatch.setenv("RFDETR_FN_DEBUG", "1")
    with pytest.raises(DatasetError):
        run_or_exit(cli.main, argv)


# ---------------------------------------------------------------- also: dropped annotations are counted


def test_also_dropped_annotations_are_counted_per_reason_once_per_split(tmp_path):
    data = make_roboflow(tmp_path / "data", counts=(("train", 2),))
    path = data / "train" / "_annotations.coco.json"
    coco = json.loads(path.read_text())
    extra = [[float("nan"), 1, 5, 5], [4, 4, 0, 6], [4, 4, 6, -2], [100, 100, 5, 5], [60, 60, 10, 10]]
    for k, box in enumerate(extra):
        coco["annotations"].append({"id": 10 + k, "image_id": 1, "category_id": 1, "bbox": box, "iscrowd": 0})
    path.write_text(json.dumps(coco))  # NaN is written as the bare NaN Python's json reads back
    with pytest.warns(UserWarning) as caught:
        ds = _train_split(data)
    (message,) = [str(w.message) for w in caught if "annotation" in str(w.message)]
    assert "dropped 4 annotation(s): 1 non-finite bbox, 2 zero or negative width/height, 1 entirely outside" in message
    assert "clipped 1 box(es) partly outside their image" in message and "id 14" in message
    assert [len(r.labels) for r in ds.records] == [2, 1]  # image 1 keeps its own box and the clipped one
    assert all(bool(torch.isfinite(torch.tensor(a["bbox"])).all()) for a in ds.coco_gt()["annotations"])


# ---------------------------------------------------------------- also: validate warns about other classes


def test_also_validate_warns_when_the_checkpoint_was_trained_on_other_classes(tmp_path):
    import rfdetr_fn as rf

    cfg = rf.presets.tiny(num_classes=2, resolution=64)
    wfile = tmp_path / "w.pth"
    weights.save_weights(wfile, rf.init(cfg, 0), cfg, class_names=["cat", "dog"])
    data = ["--data.synthetic-images", "4", "--data.synthetic-classes", "2", "--data.synthetic-size", "64"]
    with pytest.warns(UserWarning, match=r"\['cat', 'dog'\].*\['red rectangle', 'green ellipse'\]"):
        cli.main(["validate", "--checkpoint", str(wfile), *data, "--data.num-workers", "0"])


# ---------------------------------------------------------------- also: disk full


def test_also_disk_full_cleans_the_temp_and_says_so(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    import torch.distributed.checkpoint as dcp

    wfile = tmp_path / "w.pth"
    atomic.atomic_write(wfile, lambda tmp: torch.save({"v": 1}, tmp))
    state = {"a": torch.ones(3)}
    checkpoint.save_state(tmp_path / "last", state)
    before = sorted(p.name for p in tmp_path.iterdir())

    def full_torch_save(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"\0" * 4096)  # a partial file eats the last bytes
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
            "data/0: file write failed"
        )

    def full_dcp_save(tensors, *, checkpoint_id, **k):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0))
    monkeypatch.setattr(torch, "save", full_torch_save)
    with pytest.raises(atomic.DiskFullError, match=f"no space left in {tmp_path}"):
        atomic.atomic_write(wfile, lambda tmp: torch.save({"v": 2}, tmp))
    monkeypatch.setattr(dcp, "save", full_dcp_save)
    with pytest.raises(atomic.DiskFullError, match=f"no space left in {tmp_path}"):
        checkpoint.save_state(tmp_path / "last", {"a": torch.zeros(3)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp files or directories left
    assert torch.load(wfile)["v"] == 1 and torch.equal(checkpoint.load_state(tmp_path / "last", state)["a"], state["a"])


# ================================================================ issue 23: the second round (serious ones)
# Items 5-14 are in test_reliability_inputs.py; the shared fault injection is tests/faults.py.


def cli_exit(argv: list[str], capsys) -> tuple[int, str]:
    """Run a command as a person would (run_or_exit): -> (exit code, stderr)."""
    capsys.readouterr()
    try:
        run_or_exit(cli.main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


class _Marker:
    """Unpickling this runs `open(path, "w")`: what a malicious `.metadata` could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_r1_resume_refuses_a_train_state_whose_metadata_pickle_runs_code(tmp_path, cheap_fit, capsys):
    import pickle

    out = tmp_path / "run"
    cli.main(fit_argv(out, "--train.epochs", "1"))
    marker = tmp_path / "pwned"
    (out / "last" / ".metadata").write_bytes(pickle.dumps(_Marker(marker)))
    code, err = cli_exit(fit_argv(out, "--train.epochs", "2", "--train.resume", "auto"), capsys)
    assert not marker.exists()  # nothing ran
    assert code == 2 and "Traceback" not in err
    assert f"{out / 'last' / '.metadata'}: refused" in err and "io.open" in err

    (out / "last" / ".metadata").write_bytes(b"\x80\x05garbage")  # corrupt: a clear message too
    code, err = cli_exit(fit_argv(out, "--train.epochs", "2", "--train.resume", "auto"), capsys)
    assert code == 2 and f"{out / 'last' / '.metadata'}: unreadable" in err and "Traceback" not in err


def test_r1_a_real_train_state_still_loads_through_the_restricted_unpickler(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": {"c": torch.ones(2, dtype=torch.bfloat16)}, "n": 3}
    checkpoint.save_state(tmp_path / "last", state)
    back = checkpoint.load_state(tmp_path / "last", state)
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["b"]["c"], state["b"]["c"]) and back["n"] == 3


def _tiny_weights(tmp_path) -> Path:
    import rfdetr_fn as rf

    cfg = rf.presets.tiny(num_classes=2, resolution=64)
    wfile = tmp_path / "w.pth"
    weights.save_weights(wfile, rf.init(cfg, 0), cfg, class_names=["a", "b"])
    return wfile


def test_r2_predict_never_writes_over_an_input_and_drawing_names_never_collide(tmp_path, capsys):
    wfile = _tiny_weights(tmp_path)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for name, colour in (("a-2.jpg", (200, 0, 0)), ("a.jpg", (0, 200, 0)), ("a.png", (0, 0, 200))):
        Image.new("RGB", (64, 48), colour).save(pngs / name)
    before = {p.name: p.read_bytes() for p in pngs.iterdir()}
    argv = ["predict", "--checkpoint", str(wfile), "--images", str(pngs), "--compile", "off"]
    code, err = cli_exit([*argv, "--output-dir", str(pngs)], capsys)
    assert code == 2 and "Traceback" not in err and "is an input folder" in err
    assert {p.name: p.read_bytes() for p in pngs.iterdir()} == before  # inputs intact, nothing added
    code, err = cli_exit(
        [*argv[:-4], "--images", str(pngs / "a.jpg"), str(pngs / "a.png"), "--output-dir", str(pngs)], capsys
    )
    assert code == 2 and "would overwrite input image(s) a.png" in err
    assert {p.name: p.read_bytes() for p in pngs.iterdir()} == before

    out = tmp_path / "drawn"
    records = cli.main([*argv, "--output-dir", str(out)])
    drawings = sorted(p.name for p in out.glob("*.png"))
    assert len(records) == 3 and len(drawings) == 3  # one drawing per image
    assert [r["drawing"] for r in records] == ["a-2.png", "a.png", "a-3.png"]


def test_r3_average_refuses_non_finite_weights_and_parameters_and_other_class_lists(tmp_path, capsys):
    import rfdetr_fn as rf

    cfg = rf.presets.tiny(num_classes=2, resolution=64)
    files = []
    for seed, names in ((0, ["a", "b"]), (1, ["a", "b"]), (2, ["a", "c"])):
        files.append(tmp_path / f"w{seed}.pth")
        weights.save_weights(files[-1], rf.init(cfg, seed), cfg, class_names=names)
    soup = tmp_path / "soup.pth"
    for bad in ("nan", "inf"):
        code, err = cli_exit(
            ["average", str(files[0]), str(files[1]), "--weights", bad, "1", "--out", str(soup)], capsys
        )
        assert code == 2 and "--weights" in err and "finite" in err and "Traceback" not in err
    assert not soup.exists()

    code, err = cli_exit(["average", str(files[0]), str(files[2]), "--out", str(soup)], capsys)
    assert code == 2 and "['a', 'b']" in err and "['a', 'c']" in err and str(files[2]) in err
    three = rf.presets.tiny(num_classes=3, resolution=64)
    weights.save_weights(tmp_path / "w3.pth", rf.init(three, 0), three, class_names=["a", "b", "c"])
    code, err = cli_exit(["average", str(files[0]), str(tmp_path / "w3.pth"), "--out", str(soup)], capsys)
    assert code == 2 and "3 classes" in err and "2 classes" in err
    assert not soup.exists()

    params = tree.flatten(rf.init(cfg, 1))
    params[next(iter(params))] = params[next(iter(params))] * math.nan
    weights.save_weights(tmp_path / "nan.pth", tree.unflatten(params), cfg, class_names=["a", "b"])
    code, err = cli_exit(["average", str(files[0]), str(tmp_path / "nan.pth"), "--out", str(soup)], capsys)
    assert code == 2 and "nan.pth" in err and "non-finite" in err and not soup.exists()

    assert cli.main(["average", str(files[0]), str(files[1]), "--weights", "1", "3", "--out", str(soup)]) == [0, 1]
    assert _all_finite(soup)


def test_r4_resuming_another_runs_state_checks_the_config_against_that_run(tmp_path, cheap_fit, capsys):
    data = make_roboflow(tmp_path / "data")
    other = make_roboflow(tmp_path / "other")
    for split in ("train", "valid"):
        path = other / split / "_annotations.coco.json"
        path.write_text(path.read_text().replace('"sq"', '"circle"'))
    first = tmp_path / "a"
    cli.main(fit_argv(first, "--data.dataset-dir", str(data), "--train.epochs", "1"))
    second = tmp_path / "b"
    changed = ("--data.dataset-dir", str(other), "--train.lr", "0.001", "--train.seed", "7")
    code, err = cli_exit(
        fit_argv(second, *changed, "--train.epochs", "2", "--train.resume", str(first / "last")), capsys
    )
    assert code == 2 and str(first / "training_config.json") in err
    for field in ("train.lr: 0.0001 -> 0.001", "train.seed: 0 -> 7", "class_names: ['sq'] -> ['circle']"):
        assert field in err
    assert not (second / "training_config.json").exists()

    resumed = fit_argv(
        second, "--data.dataset-dir", str(data), "--train.epochs", "2", "--train.resume", str(first / "last")
    )
    cli.main(resumed)  # the same settings: resumes, into the new directory
    assert json.loads((second / "training_config.json").read_text())["train"]["output_dir"] == str(second)
