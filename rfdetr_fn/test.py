"""Score weights on the test split: `python -m rfdetr_fn.test --checkpoint output/checkpoint_best_total.pth`.

The same evaluation as `validate`, on `test/` (upstream's test_step with the best weights).
"""

from __future__ import annotations

from rfdetr_fn.validate import main as _validate_main


def main(argv: list[str] | None = None) -> dict[str, float]:
    return _validate_main(argv, split="test")


if __name__ == "__main__":
    from rfdetr_fn.flags import run_or_exit

    run_or_exit(main)
