# ruff: noqa: F811  (the shared fixtures are imported from test_reliability and named as arguments)
"""Nothing lost, nobody in (issue 23, items 5-14): bad inputs, faults and signals, each through the CLI where
a user meets it. Items 1-4 are at the end of test_reliability.py; faults are injected by tests/faults.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

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
