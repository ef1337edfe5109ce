"""Command-line parsing: presets, experiment files and flags compose as documented."""

from __future__ import annotations

import pytest

from rfdetr_fn import presets
from rfdetr_fn.fit import FitArgs
from rfdetr_fn.flags import parse
from rfdetr_fn.validate import EvalArgs


def test_resolution_flag_as_written_in_the_design():
    args = parse(FitArgs, ["--model.resolution", "640"])
    assert args.model == presets.nano(resolution=640) and args.model.pe_size == 40


def test_preset_then_flags_override_it():
    args = parse(FitArgs, ["--preset", "small", "--model.resolution", "640", "--train.lr", "2e-4"])
    assert args.model.name == "small" and args.model.dec_layers == 3 and args.model.resolution == 640
    assert args.train.lr == 2e-4


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("preset: seg_nano\nmodel:\n  num_queries: 50\n  num_select: 50\ntrain:\n  epochs: 7\n")
    args = parse(FitArgs, ["--config", str(path), "--train.epochs", "9"])
    assert args.model.segmentation_head and args.model.num_queries == 50
    assert args.train.epochs == 9 and args.config == str(path)


def test_config_file_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        parse(FitArgs, ["--config", str(path)])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse(FitArgs, ["--config", str(tmp_path / "missing.yaml")])


def test_impossible_config_is_rejected_with_the_field():
    with pytest.raises(SystemExit):  # tyro reports the validator's message and exits
        parse(FitArgs, ["--model.resolution", "500"])
    with pytest.raises(ValueError, match="resolution=500"):
        presets.nano(resolution=500)


def test_eval_args_nest_data_and_eval_flags_and_reject_unknown_splits():
    args = parse(
        EvalArgs,
        [
            "--checkpoint",
            "w.pth",
            "--split",
            "test",
            "--data.dataset-dir",
            "d",
            "--eval.per-class",
            "--batch-size",
            "2",
        ],
    )
    assert (args.checkpoint, args.split, args.batch_size) == ("w.pth", "test", 2)
    assert args.data.dataset_dir == "d" and args.eval.per_class and args.eval.backend == "pycocotools"
    with pytest.raises(SystemExit):
        parse(EvalArgs, ["--split", "train"])  # only valid and test are scored


def test_no_command_prints_the_commands(capsys):
    from rfdetr_fn import cli

    with pytest.raises(SystemExit) as stop:
        cli.main([])
    assert stop.value.code == 2
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert [words[0] for words in lines] == ["fit", "validate", "test", "predict", "average", "export"] and all(
        len(w) > 3 for w in lines
    )
    assert cli.main(["--help"]) is None and "unknown" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["trian"])
    assert "unknown command 'trian'" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict", "average"])
def test_help_names_the_command_as_typed(command, capsys):
    """`rfdetr_fn predict --help` says `usage: rfdetr_fn predict`, not the path of a module file."""
    from rfdetr_fn import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(f"usage: rfdetr_fn {command} ")
