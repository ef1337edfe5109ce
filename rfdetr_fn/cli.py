"""Command line: `rfdetr_fn <command>` (or `python -m rfdetr_fn <command>`) dispatches to the command modules.

    rfdetr_fn fit      [--preset NAME] [--config FILE] [--model.* --train.* --data.* --eval.*]
    rfdetr_fn validate --checkpoint FILE_OR_DIR [--data.* --eval.*]
    rfdetr_fn test     --checkpoint FILE_OR_DIR
    rfdetr_fn predict  --checkpoint FILE_OR_DIR --images a.jpg b.jpg | folder/
    rfdetr_fn average  a.pth b.pth c.pth --out soup.pth [--weights ...] [--greedy --data.*]
    rfdetr_fn export   --checkpoint FILE_OR_DIR --format onnx|pt2 --output PATH [--batch-size N|dynamic ...]

fit, validate and test are also `python -m rfdetr_fn.<command>`. `--preset` and `--config` are read first:
they pick the defaults that the other flags then override, so `--preset small --model.resolution 640` is
Small at 640. Flags are parsed by `rfdetr_fn.flags`.
"""

from __future__ import annotations

import sys
from typing import Any

COMMANDS = {
    "fit": "train a detector or segmenter (--preset NAME, --config FILE, --model.* --train.* --data.* --eval.*)",
    "validate": "score weights or a run directory on the validation split: COCO mAP, mAR, F1 (--checkpoint)",
    "test": "score weights or a run directory on the test split (--checkpoint)",
    "predict": "detect objects in images; writes predictions.json and drawings (--checkpoint, --images)",
    "average": "average weights files into one (a model soup; --greedy keeps what helps on --data.*)",
    "export": "export weights to ONNX or a compiled torch.export package, verified (--checkpoint, --format, --output)",
}


def usage() -> str:
    """The commands, one line each: what `rfdetr_fn` with no (or an unknown) command prints."""
    lines = ["usage: rfdetr_fn COMMAND [--help] [flags]", ""]
    lines += [f"  {name:<9} {what}" for name, what in COMMANDS.items()]
    lines += ["", "`rfdetr_fn COMMAND --help` lists every flag with its meaning and default."]
    return "\n".join(lines)


def console() -> Any:
    """The `rfdetr_fn` script: known errors print their message alone (see `flags.run_or_exit`)."""
    from rfdetr_fn.flags import run_or_exit

    return run_or_exit(main)


def main(argv: list[str] | None = None) -> Any:
    """`rfdetr_fn <command> ...`: dispatch to fit, validate, test, predict, average or export."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"rfdetr_fn: unknown command {argv[0]!r}\n")
        print(usage())
        if argv and argv[0] in ("-h", "--help"):
            return None
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if command == "fit":
        from rfdetr_fn.fit import main as run
    elif command == "validate":
        from rfdetr_fn.validate import main as run
    elif command == "test":
        from rfdetr_fn.test import main as run
    elif command == "average":
        from rfdetr_fn.average import main as run
    elif command == "export":
        from rfdetr_fn.deploy.command import main as run
    else:
        from rfdetr_fn.predict_cli import main as run
    return run(rest)
