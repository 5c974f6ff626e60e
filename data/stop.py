"""A process-wide stop request: a SIGTERM asks long loops in worker threads (a teacher's shard) to end at their
next batch. Only the main thread runs signal handlers, and the interpreter waits for the worker threads before
it exits, so without this a stopped `mmtp collect` would first finish the shard in progress.

    request_stop(signal.SIGTERM)   # a signal handler (distill.env.exit_on_sigterm's)
    check_stop()                   # a loop, between batches: raises Stopped once a stop was requested

During a Prefect flow run, Prefect's own SIGTERM handler replaces ours (it re-sends the signal to ours only after
the flow's task runner has waited for its threads). `watch_signals` therefore also has the interpreter's C-level
handler write each signal's number to a pipe (signal.set_wakeup_fd), and `check_stop` reads a SIGTERM from there,
whichever Python handler owns it.

`Stopped` is a SystemExit with the shell's code for the signal (128 + signum: 143 for SIGTERM, 130 for
SIGINT): Prefect marks the task or flow run Crashed, does not retry it, and prints no traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

log = logging.getLogger(__name__)
_requested = threading.Event()
_signum = signal.SIGTERM
_wakeup = -1  # the read end of the pipe of signal numbers (watch_signals)


class Stopped(SystemExit):
    """Stopped by a signal; `code` is 128 + signum, `signum` the signal."""

    def __init__(self, signum: int = signal.SIGTERM, message: str = ""):
        super().__init__(128 + int(signum))
        self.signum, self.message = int(signum), message

    def __str__(self) -> str:
        return self.message or f"stopped by {signal_name(self.signum)}"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def watch_signals() -> None:
    """Note every signal in a pipe that `check_stop` reads (main thread only; once; not when the wakeup fd is
    already someone else's, e.g. an asyncio loop's)."""
    global _wakeup
    if _wakeup != -1 or threading.current_thread() is not threading.main_thread():
        return
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    if old != -1:
        signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)
        return
    _wakeup = r
    os.register_at_fork(after_in_child=_unwatch)  # a forked child's signals are its own


def _unwatch() -> None:
    global _wakeup
    _wakeup = -1
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Ask every loop that calls `check_stop` to stop (safe from a signal handler)."""
    global _signum
    _signum = int(signum)
    _requested.set()


def stop_requested() -> bool:
    """Whether a stop was requested, or a SIGTERM came since the last look (watch_signals)."""
    if not _requested.is_set() and _wakeup != -1:
        with contextlib.suppress(BlockingIOError):
            if signal.SIGTERM in os.read(_wakeup, 512):
                request_stop(signal.SIGTERM)
    return _requested.is_set()


def check_stop() -> None:
    """Raise `Stopped` when a stop was requested."""
    if stop_requested():
        raise Stopped(_signum)


def clear_stop() -> None:
    """Forget a stop request, and a SIGTERM not yet looked at (tests; a process that goes on after one)."""
    stop_requested()
    _requested.clear()


@contextlib.contextmanager
def stop_signals():
    """An Event set by SIGINT/SIGTERM while a training loop runs (main thread only; elsewhere never set): the
    trainer finishes its step, checkpoints it and stops, so no half-written checkpoint is left behind."""
    stop = threading.Event()

    def handler(signum, frame):
        log.warning("%s received: stopping after this step", signal_name(signum))
        stop.signum = signum  # TrainingStopped's exit code is 128 + signum
        stop.set()
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
