"""Ctrl-C and SIGTERM during training: finish the step, save the train state, exit with the shell's code.

A signal only sets a flag; the loop checks it at the step boundary (`Interrupt.requested`), saves `last/`
and raises `Interrupted`, which the command line prints alone and exits 130 (SIGINT) or 143 (SIGTERM).
A second Ctrl-C stops at once (KeyboardInterrupt), as a user pressing it twice expects.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs

from rfdetr_fn.errors import UserError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(UserError):
    """Training stopped by a signal after saving its state; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@attrs.define
class Interrupt:
    """Which signal arrived (None: none yet)."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def catch_signals(enabled: bool = True) -> Iterator[Interrupt]:
    """Turn SIGINT/SIGTERM into a flag for the duration; the old handlers come back after. Only the main
    thread can install handlers (elsewhere, and when not `enabled`, the flag simply never rises)."""
    flag = Interrupt()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handle(signum: int, frame) -> None:
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: saving the train state after this step (Ctrl-C again stops at once)", file=sys.stderr)

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stopped(flag: Interrupt, out_dir: Path, step: int) -> Interrupted:
    """The error that ends a run stopped by `flag`'s signal after its state (step `step`) was saved."""
    name = signal.Signals(flag.signum).name if flag.signum else "a signal"
    return Interrupted(
        f"stopped by {name} at step {step}; the train state is saved in {out_dir / 'last'}. Continue with the "
        "same command plus --train.resume auto",
        exit_code=128 + int(flag.signum or signal.SIGINT),
    )
