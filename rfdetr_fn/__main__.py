"""`python -m rfdetr_fn <command> ...`: the same as the `rfdetr_fn` console script."""

from rfdetr_fn.cli import console

if __name__ == "__main__":
    console()
