"""`python -m rfdetr_fn <command> ...`: the same as the `rfdetr_fn` console script."""

from rfdetr_fn.cli import main

if __name__ == "__main__":
    main()
