"""Command line: `rfdetr_fn <command>` (or `python -m rfdetr_fn <command>`) dispatches to the command modules.

    rfdetr_fn fit      [--preset NAME] [--config FILE] [--model.* --train.* --data.* --eval.*]
    rfdetr_fn validate --checkpoint FILE_OR_DIR [--data.* --eval.*]
    rfdetr_fn test     --checkpoint FILE_OR_DIR
    rfdetr_fn predict  --checkpoint FILE_OR_DIR --images a.jpg b.jpg | folder/
    rfdetr_fn average  a.pth b.pth c.pth --out soup.pth [--weights ...] [--greedy --data.*]

fit, validate and test are also `python -m rfdetr_fn.<command>`. `--preset` and `--config` are read first:
they pick the defaults that the other flags then override, so `--preset small --model.resolution 640` is
Small at 640. Flags are parsed by `rfdetr_fn.flags`.
"""

from __future__ import annotations

import sys
from typing import Any

COMMANDS = ("fit", "validate", "test", "predict", "average")


def console() -> Any:
    """The `rfdetr_fn` script: known errors print their message alone (see `flags.run_or_exit`)."""
    from rfdetr_fn.flags import run_or_exit

    return run_or_exit(main)


def main(argv: list[str] | None = None) -> Any:
    """`rfdetr_fn <command> ...`: dispatch to fit, validate, test or predict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip())
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
    else:
        from rfdetr_fn.predict_cli import main as run
    return run(rest)
