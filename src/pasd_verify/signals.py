"""How a command stops: SIGINT, SIGTERM and SIGHUP become an exception where the command is, so that every
``finally`` runs (staging folders, temporary caches and HTP children go, and no partial output is left), except while
the libraries import, when a signal ends the process at once with one line."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from typing import NoReturn

from .io import clear_stop_request, interrupt

_ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_working = False  # see begin_work


def interrupted_line(signum: int) -> str:
    return f"pasd-verify: interrupted by {signal.Signals(signum).name}: stopped; no output was written"


def begin_work(*preload: str) -> None:
    """Import ``preload`` ("module" or "module:attribute", attributes of lazy modules such as diffusers'), then let
    signals raise :class:`Interrupted` from here on.

    Before this point a signal ends the process at once (one line, exit 128+signal): nothing is written and no child
    is started while the libraries import, and an exception raised in the middle of an import leaves numpy, scipy
    and diffusers half-initialised, so that even the error's own handling fails with a RecursionError."""
    global _working
    for name in preload:
        module, _, attribute = name.partition(":")
        loaded = importlib.import_module(module)
        if attribute:
            getattr(loaded, attribute)
    _working = True


@contextlib.contextmanager
def signals_as_interrupts():
    """While the command runs, SIGINT, SIGTERM and SIGHUP (a closed terminal, a parent shell that ends) stop it: at
    once while it imports, by :class:`Interrupted` once :func:`begin_work` was called. After one signal the next
    ones are ignored, so that the cleanup it started can finish. Outside the main thread (a caller's worker) signals
    cannot be handled, and nothing changes."""
    global _working
    if threading.current_thread() is not threading.main_thread():
        _working = True
        yield
        return

    def on_signal(signum, frame):
        if not _working:
            print(interrupted_line(signum), file=sys.stderr, flush=True)
            os._exit(128 + signum)
        for ending in _ENDING:
            signal.signal(ending, signal.SIG_IGN)
        interrupt(signum)

    previous = {s: signal.getsignal(s) for s in _ENDING}
    _working = False
    clear_stop_request()
    for s in _ENDING:
        signal.signal(s, on_signal)
    try:
        yield
    finally:
        _working = False
        clear_stop_request()  # reported by main(); the process may run more (a caller's script, a test session)
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def exit_after_verdict(code: int) -> NoReturn:
    """End the process with the command's exit ``code`` once its outputs are written and its verdict printed.

    The interpreter's shutdown after that (torch's and AIMET's teardown) takes seconds: a signal then would end the
    process as an unexplained 128+signal with no line. It ends it with the verdict's code and a line saying the
    signal came after the work was complete."""
    def after(signum, frame):
        sys.stdout.flush()
        print(f"pasd-verify: {signal.Signals(signum).name} after the run had finished; its outputs and verdict "
              "stand", file=sys.stderr, flush=True)
        os._exit(code)

    if threading.current_thread() is threading.main_thread():
        for s in _ENDING:
            signal.signal(s, after)
    sys.exit(code)
