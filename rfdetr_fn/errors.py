"""The error classes the command line prints without a traceback (their messages say what and where).

A leaf module, so that the command runner (`flags.run_or_exit`) can name them without importing the
commands that raise them.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment (config, data, checkpoint, output dir, full disk): the CLI prints the
    message alone and exits 2."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops, keeping the last good train state (exit 1)."""
