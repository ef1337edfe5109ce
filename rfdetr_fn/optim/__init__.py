"""Optimisation: the gradient-transform chain (`chain`), upstream's AdamW recipe and parameter groups
(`recipe`), learning-rate and drop-path schedules (`schedules`), and the functional EMA (`ema`)."""
