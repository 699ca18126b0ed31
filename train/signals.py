"""The signals a scheduler stops a job with, and what every vtc command does on them."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

# What a scheduler sends before it stops a job: SIGTERM at a time limit, a preemption or `kill`,
# and SIGUSR1 as SLURM's early warning (`sbatch --signal=USR1@SECONDS`), which leaves a save
# larger than the grace time after SIGTERM the seconds it needs.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_on_signal(signum, frame) -> None:
    """A stop signal ends a command through an exception, as Ctrl-C does, so that what it was
    writing is cleaned up on the way out (a half-written export or shard folder, as large as a
    model or the data) and what is done is kept (an evaluation's measured rows). A training
    stage notes it instead and saves first (`train.checkpoint.Termination`). Exit status 128 +
    the signal."""
    name = signal.Signals(signum).name
    print(f"vtc: terminated ({name}); what was being written is removed", file=sys.stderr)
    raise SystemExit(128 + signum)


def handle_stop_signals(handler) -> None:
    """`handler` for every stop signal, in the main thread (the only one that may set handlers;
    elsewhere nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, handler)


@contextmanager
def stop_signals_handled_by(handler):
    """`handle_stop_signals(handler)` for the block; after it, the handlers that were there
    before are back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    handle_stop_signals(handler)
    try:
        yield
    finally:
        for signum, was in before.items():
            signal.signal(signum, signal.SIG_DFL if was is None else was)


def stop_signals_exit():
    """`exit_on_signal` for the stop signals while the block runs."""
    return stop_signals_handled_by(exit_on_signal)
