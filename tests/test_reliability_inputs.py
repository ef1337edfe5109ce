# ruff: noqa: F811  (the shared fixtures are imported from test_reliability and named as arguments)
"""Nothing lost, nobody in (issue 23, items 5-14): bad inputs, faults and signals, each through the CLI where
a user meets it. Items 1-4 are at the end of test_reliability.py; faults are injected by tests/faults.py."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
from PIL import Image

from tests import faults
from tests.test_reliability import _no_plots, cheap_fit, cli_exit, fit_argv, make_roboflow  # noqa: F401


def _edit_coco(data: Path, split: str, edit) -> None:
    path = data / split / "_annotations.coco.json"
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))


# ---------------------------------------------------------------- 5. train and valid name a category differently


def test_5_fit_refuses_train_and_valid_naming_one_category_id_differently(tmp_path, cheap_fit, capsys):
    data = make_roboflow(tmp_path / "data")
    _edit_coco(data, "valid", lambda c: c["categories"][1].update(name="circle"))
    code, err = cli_exit(fit_argv(tmp_path / "run", "--data.dataset-dir", str(data)), capsys)
    assert code == 2 and "Traceback" not in err
    assert "category id 1" in err and "'sq'" in err and "'circle'" in err and "valid" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 9. corrupt RLE masks are found before training


def test_9_corrupt_rle_masks_are_refused_before_training_naming_file_and_annotation(tmp_path, cheap_fit, capsys):
    data = make_roboflow(tmp_path / "data")

    def corrupt(coco):
        coco["annotations"][0]["segmentation"] = {"size": [64, 64], "counts": "zzz!!"}  # bad counts
        coco["annotations"][1]["segmentation"] = {"size": [32, 32], "counts": [0, 1024]}  # not the image's size
        coco["annotations"][2]["segmentation"] = {"size": [64, 64], "counts": [10, 20]}  # runs do not cover it

    _edit_coco(data, "train", corrupt)
    code, err = cli_exit(fit_argv(tmp_path / "run", "--data.dataset-dir", str(data)), capsys)
    assert code == 2 and "Traceback" not in err and "_annotations.coco.json: 3 problem(s)" in err
    assert "annotation id 1 (image train0.png)" in err and "annotation id 3 (image train2.png)" in err
    assert "size [32, 32] differs from the image's 64x64" in err


# ---------------------------------------------------------------- 12. silent data problems


def test_12_zero_train_annotations_warn(tmp_path, cheap_fit):
    from rfdetr_fn import cli

    data = make_roboflow(tmp_path / "data")
    _edit_coco(data, "train", lambda c: c.update(annotations=[]))
    with pytest.warns(UserWarning, match="train.*no annotations"):
        cli.main(fit_argv(tmp_path / "run", "--data.dataset-dir", str(data), "--train.epochs", "1"))


def test_12_coco_file_names_outside_the_dataset_are_refused(tmp_path, cheap_fit, capsys):
    data = make_roboflow(tmp_path / "data")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 64)).save(secret)

    def escape(coco):
        coco["images"][0]["file_name"] = "../../secret.png"
        coco["images"][1]["file_name"] = str(secret)

    _edit_coco(data, "train", escape)
    code, err = cli_exit(fit_argv(tmp_path / "run", "--data.dataset-dir", str(data)), capsys)
    assert code == 2 and "../../secret.png" in err and str(secret) in err and "outside the dataset" in err


def test_12_a_relative_dataset_dir_is_inside_itself(tmp_path, monkeypatch):
    """configs/coco_mini_nano.yaml names its dataset as ../shared/data/coco_mini: the escape check compared
    the relative image paths with the absolute root and refused every file name."""
    from rfdetr_fn.config import DataConfig
    from rfdetr_fn.data import load_source

    make_roboflow(tmp_path / "data")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    source = load_source(DataConfig(dataset_dir="../data"), "train")
    assert len(source.images) == 4


def test_12_yolo_label_files_without_image_or_with_upper_case_suffix_are_counted(tmp_path):
    from rfdetr_fn.config import DataConfig
    from rfdetr_fn.data import load_source

    root = tmp_path / "yolo"
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "labels").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [sq]\ntrain: train/images\nval: train/images\n")
    for stem in ("a", "b"):
        Image.new("RGB", (32, 32)).save(root / "train" / "images" / f"{stem}.png")
    (root / "train" / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "train" / "labels" / "b.TXT").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "train" / "labels" / "gone.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "train" / "labels" / "gone2.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.warns(UserWarning) as caught:
        load_source(DataConfig(dataset_dir=str(root)), "train")
    text = " ".join(str(w.message) for w in caught)
    assert "2 label file(s) have no image" in text and "gone.txt" in text
    assert "1 label file(s) end in an upper-case suffix" in text and "b.TXT" in text


def test_12_a_dangling_symlink_in_a_predict_folder_is_reported(tmp_path, capsys):
    from tests.test_reliability import _tiny_weights

    wfile = _tiny_weights(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48)).save(photos / "a.png")
    (photos / "b.jpg").symlink_to(tmp_path / "deleted.jpg")
    argv = ["predict", "--checkpoint", str(wfile), "--images", str(photos), "--no-draw", "--compile", "off"]
    code, err = cli_exit([*argv, "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 1 and "b.jpg" in err and "1 of 2 image(s) could not be read" in err
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(r["image"]).name for r in records] == ["a.png", "b.jpg"] and "error" in records[1]


# ---------------------------------------------------------------- 10, 11, 14. config files and crafted files


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "train: [epochs: 1\n", "not valid YAML"),
        ("bad.json", '{"train": {"epochs": 1,}}', "not valid JSON"),
        ("list.yaml", "- train\n- model\n", "got a list"),
        ("exp.toml", "[train]\nepochs = 1\n", "unknown extension .toml"),
        ("evil.yaml", '!!python/object/apply:os.system ["touch pwned"]\n', "python/object/apply"),
    ],
)
def test_11_14_config_parse_errors_are_one_message_naming_the_file(tmp_path, capsys, monkeypatch, name, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(text)
    code, err = cli_exit(fit_argv(tmp_path / "run", "--config", str(tmp_path / name)), capsys)
    assert code == 2 and "Traceback" not in err and err.startswith(f"error: {tmp_path / name}: ")
    assert message in err and not (tmp_path / "pwned").exists()


def test_10_a_config_file_imports_code_only_with_an_explicit_flag(tmp_path, cheap_fit, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "imported"
    (tmp_path / "evil_opt.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef make(*a, **k):\n    raise SystemExit(9)\n"
    )
    (tmp_path / "exp.yaml").write_text("train:\n  optimizer: 'evil_opt:make'\n")
    argv = fit_argv(tmp_path / "run", "--config", str(tmp_path / "exp.yaml"))
    code, err = cli_exit(argv, capsys)
    assert code == 2 and "exp.yaml: train.optimizer" in err and "--train.allow-code-import" in err
    assert not marker.exists()  # nothing imported

    (tmp_path / "sneaky.yaml").write_text("train:\n  optimizer: 'evil_opt:make'\n  allow_code_import: true\n")
    code, err = cli_exit(fit_argv(tmp_path / "run", "--config", str(tmp_path / "sneaky.yaml")), capsys)
    assert code == 2 and "allow_code_import" in err and "command line" in err and not marker.exists()

    code, _ = cli_exit([*argv, "--train.allow-code-import"], capsys)
    assert code == 9 and marker.exists()  # allowed: the factory ran


def test_14_a_malicious_checkpoint_is_refused_with_a_whole_sentence(tmp_path, capsys):
    import torch

    from tests.test_reliability import _Marker

    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.ones(1)}, "args": _Marker(marker)}, tmp_path / "evil.pth")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    code, err = cli_exit(["predict", "--checkpoint", str(tmp_path / "evil.pth"), "--images", str(tmp_path)], capsys)
    first = err.splitlines()[0]
    assert code == 2 and not marker.exists() and str(tmp_path / "evil.pth") in first
    assert "io.open" in first and first.endswith(".")  # the whole message, not cut mid-sentence


# ---------------------------------------------------------------- 6. --train.overwrite deletes only the run's own files


def test_6_overwrite_deletes_only_the_exact_files_a_run_writes_and_never_one_it_reads(tmp_path, cheap_fit):
    from rfdetr_fn import cli

    out = tmp_path / "run"
    cli.main(fit_argv(out, "--train.epochs", "1"))
    mine = {"checkpoint_from_colleague.pth": b"colleague", "last.yaml": b"notes: mine", "checkpoint_notes.txt": b"x"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    (out / "checkpoint_best_total.pth").rename(out / "pretrained.pth")  # a file this command reads
    cli.main(
        fit_argv(
            out, "--train.epochs", "1", "--train.overwrite", "--train.pretrain-weights", str(out / "pretrained.pth")
        )
    )
    assert {name: (out / name).read_bytes() for name in mine} == mine
    assert (out / "pretrained.pth").exists() and (out / "checkpoint_best_total.pth").exists()


# ---------------------------------------------------------------- 7. SIGINT, SIGTERM: save, say how to resume


@pytest.mark.parametrize(("signum", "code"), [(2, 130), (15, 143)])
def test_7_a_signal_saves_the_state_at_the_step_boundary_and_exits_cleanly(tmp_path, cheap_fit, capsys, signum, code):
    import os

    from rfdetr_fn import fit
    from rfdetr_fn.io import checkpoint
    from tests.test_reliability import fake_step

    real = fake_step()

    def make(cfg, tcfg, **kw):
        record = real(cfg, tcfg, **kw)

        def signalled_at_step_3(state, batches):
            if int(state["step"]) == 2:
                os.kill(os.getpid(), signum)  # arrives mid-step, as a Ctrl-C would
            return record.step(state, batches)

        return attrs.evolve(record, step=signalled_at_step_3)

    cheap_fit.setattr(fit, "make_train_step", make)
    out = tmp_path / "run"
    rc, err = cli_exit(fit_argv(out, "--train.epochs", "3"), capsys)  # stops mid-epoch 0
    assert rc == code and "Traceback" not in err and "--train.resume auto" in err
    template = {
        "state": {"step": __import__("torch").zeros((), dtype=__import__("torch").int64)},
        "loop": {"epoch": 0, "batch": 0},
    }
    saved = checkpoint.load_state(out / "last", template)
    assert int(saved["state"]["step"]) == 3 and saved["loop"] == {"epoch": 0, "batch": 3}

    cheap_fit.setattr(fit, "make_train_step", real)
    rc, _ = cli_exit(fit_argv(out, "--train.epochs", "3", "--train.resume", "auto"), capsys)
    assert rc == 0 and (out / "last_ema.pth").exists()


def test_7_resume_auto_in_a_dir_with_no_saved_state_says_so_plainly(tmp_path, cheap_fit, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "training_config.json").write_text("{}")  # a run killed before its first save
    (out / "metrics.csv").write_text("step,epoch\n")
    rc, err = cli_exit(fit_argv(out, "--train.resume", "auto"), capsys)
    assert rc == 2 and "no train state was saved" in err and "--train.overwrite" in err
    assert "continue it with --train.resume auto" not in err


# ---------------------------------------------------------------- 8. full disks and read-only outputs


def _torch_disk_full(tmp_path, monkeypatch, where: str):
    """What torch's writer raises on a full disk (no errno), with the disk then showing 0 bytes free."""
    import shutil
    from collections import namedtuple

    import torch.distributed.checkpoint as dcp

    def full(tensors, *, checkpoint_id, **k):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"\0" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:859] . unexpected pos 4096 vs 3893")

    usage = namedtuple("usage", "total used free")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0) if where in str(p) else real_usage(p)
    )
    monkeypatch.setattr(dcp, "save", full)


def test_8_fit_on_a_full_disk_is_one_message_and_leaves_no_temp(tmp_path, cheap_fit, capsys):
    out = tmp_path / "run"
    _torch_disk_full(tmp_path, cheap_fit, str(out))
    rc, err = cli_exit(fit_argv(out, "--train.epochs", "1"), capsys)
    assert rc == 2 and "Traceback" not in err and "no space left" in err
    assert not list(out.glob("last*"))  # no last.tmp-PID keeping the disk full


def test_8_a_full_disk_while_writing_the_state_marker_leaves_no_temp(tmp_path, cheap_fit, capsys):
    from rfdetr_fn.io import checkpoint

    out = tmp_path / "run"

    def marker_full(path, write):
        raise OSError(28, "No space left on device", str(path))

    cheap_fit.setattr(checkpoint, "atomic_write", marker_full)
    rc, err = cli_exit(fit_argv(out, "--train.epochs", "1"), capsys)
    assert rc == 2 and "no space left" in err.lower() and not list(out.glob("last*"))


@pytest.mark.parametrize("fault", [faults.disk_full, faults.read_only])
def test_8_predict_on_a_full_disk_or_read_only_dir_is_one_message(tmp_path, capsys, monkeypatch, fault):
    from tests.test_reliability import _tiny_weights

    wfile = _tiny_weights(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48)).save(photos / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    fault(monkeypatch, out)
    rc, err = cli_exit(
        ["predict", "--checkpoint", str(wfile), "--images", str(photos), "--output-dir", str(out)], capsys
    )
    assert rc == 2 and "Traceback" not in err and str(out) in err
    assert ("No space left" in err) if fault is faults.disk_full else ("Read-only" in err)


def test_8_read_only_outputs_of_fit_validate_and_average_are_one_message(tmp_path, cheap_fit, capsys):
    from tests.test_reliability import _tiny_weights

    wfile = _tiny_weights(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    faults.read_only(cheap_fit, ro)
    argvs = [
        fit_argv(ro / "run", "--train.epochs", "1"),
        ["validate", "--checkpoint", str(wfile), "--output", str(ro / "m.json"), "--data.synthetic-images", "2",
         "--data.synthetic-classes", "2", "--data.synthetic-size", "64", "--data.num-workers", "0"],
        ["average", str(wfile), str(wfile), "--out", str(ro / "soup.pth")],
    ]  # fmt: skip
    for argv in argvs:
        rc, err = cli_exit(argv, capsys)
        assert rc == 2 and "Traceback" not in err and "Read-only file system" in err and str(ro) in err, argv[0]


def test_8_stale_temp_files_from_a_kill_are_cleaned_on_resume(tmp_path, cheap_fit):
    from rfdetr_fn import cli

    out = tmp_path / "run"
    cli.main(fit_argv(out, "--train.epochs", "1"))
    stale = [out / "last.tmp-99999", out / "checkpoint_0000.tmp-99999"]
    for d in stale:
        d.mkdir()
        (d / "__0_0.distcp").write_bytes(b"\0" * 100)
    stale += [out / ".metrics.csv.abc123.tmp", out / ".checkpoint_best_ema.pth.x1y2.tmp"]
    stale[2].write_text("partial")
    stale[3].write_bytes(b"partial")
    (out / "notes.tmp").write_text("mine")  # not a name the run writes: kept
    cli.main(fit_argv(out, "--train.epochs", "2", "--train.resume", "auto"))
    assert [p.name for p in stale if p.exists()] == [] and (out / "notes.tmp").exists()


# ---------------------------------------------------------------- 13. predict edge cases


def test_13_predict_refuses_bad_threshold_batch_size_and_empty_folder(tmp_path, capsys):
    from tests.test_reliability import _tiny_weights

    wfile = _tiny_weights(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48)).save(photos / "a.png")
    base = ["predict", "--checkpoint", str(wfile), "--output-dir", str(tmp_path / "out")]
    for extra, message in [
        (["--images", str(photos), "--threshold", "nan"], "--threshold nan: expected a number from 0 to 1"),
        (["--images", str(photos), "--threshold", "1.5"], "--threshold 1.5: expected a number from 0 to 1"),
        (["--images", str(photos), "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--images", str(empty)], f"folder {empty} holds no"),
    ]:
        rc, err = cli_exit([*base, *extra], capsys)
        assert rc == 2 and "Traceback" not in err and message in err, extra
    assert not (tmp_path / "out").exists()


def test_13_a_killed_predict_never_leaves_the_previous_predictions_json_beside_new_results(tmp_path, monkeypatch):
    from rfdetr_fn import cli, predict_cli
    from tests.test_reliability import _tiny_weights

    wfile = _tiny_weights(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(3):
        Image.new("RGB", (64, 48), (60 * k, 0, 0)).save(photos / f"{k}.png")
    out = tmp_path / "out"
    argv = [
        "predict",
        "--checkpoint",
        str(wfile),
        "--images",
        str(photos),
        "--output-dir",
        str(out),
        "--batch-size",
        "1",
    ]
    cli.main([*argv, "--no-draw"])
    assert len(json.loads((out / "predictions.json").read_text())) == 3
    real = predict_cli.draw_detections
    calls = []

    def killed_on_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise faults.Killed("kill -9")
        return real(*a, **k)

    monkeypatch.setattr(predict_cli, "draw_detections", killed_on_the_second)
    with pytest.raises(faults.Killed):
        cli.main(argv)
    assert not (out / "predictions.json").exists()  # only the new run's partial predictions.jsonl
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("point", ["dcp-save", "state-marker", "state-swap"])
def test_8_a_kill_inside_a_save_leaves_a_dir_that_resumes_and_ends_clean(tmp_path, cheap_fit, point):
    from rfdetr_fn import cli
    from rfdetr_fn.io import checkpoint

    out = tmp_path / "run"
    revive = faults.kill_at(cheap_fit, point, after=1)  # the first save completes, the second dies inside
    with pytest.raises(faults.Killed):
        cli.main(fit_argv(out, "--train.epochs", "3"))
    revive()
    debris = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert bool(debris) == (point != "state-marker")  # killed mid-write or before the swap: a temp copy is left
    cli.main(fit_argv(out, "--train.epochs", "3", "--train.resume", "auto"))
    assert sorted(p.name for p in out.iterdir() if ".tmp" in p.name or ".old-" in p.name) == []
    saved = checkpoint.load_state(out / "last", {"loop": {"epoch": 0}})
    assert saved["loop"]["epoch"] == 3
