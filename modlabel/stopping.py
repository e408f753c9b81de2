"""Stopping cleanly on SIGTERM or Ctrl-C, from the command's first line.

The ``modlabel`` command calls ``install`` before it imports anything else
(``modlabel.entry``). From then on:

* the first SIGTERM, SIGINT or SIGHUP asks for a stop (``request``). A watcher thread
  sees it at once, even while the main thread is inside a long C call
  (onnxruntime, a database driver), and runs the stop callbacks that code
  registered with ``on_stop``: they kill the decode workers, end an inference
  run and cancel a database statement that waits on a lock, so that nothing
  the scan waits for outlasts the stop by more than a moment;
* the scan checks for the stop at every safe point (``check``: between files
  of the walk, chunks of the lookup and batches) and every long wait ends
  early for it (``sleep``, ``wait``), so it stops where every transaction is
  either committed or never begun, records itself as interrupted and exits 7;
* code that may be stopped anywhere (a command that only reads, a connection
  attempt) runs ``interruptible()``: there the signal raises ``StopRequested``
  in the main thread as soon as it runs Python again;
* a second signal ends the process at once: one line, exit 7.

Without ``install`` (modlabel used as a library) nothing here touches signals;
``request`` and ``check`` still work for an application that stops a scan.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from .errors import ExitCode, Interrupted, StopRequested

_requested = threading.Event()
_reason = ""
_lock = threading.Lock()
_callbacks: dict[int, Callable[[], None]] = {}
_next_token = 0
_signals = 0
_interruptible = 0  # depth of interruptible() in the main thread
_installed = False

# SIGHUP too: a terminal closed under a scan, or a supervisor that hangs up first.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def install() -> None:
    """Take over SIGTERM and SIGINT for the ``modlabel`` command (main thread only)."""
    global _installed
    if _installed:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    # Every signal's number is written to this pipe by the interpreter's C handler, at
    # once, whatever the main thread is doing; the watcher thread acts on it.
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read_fd,), name="modlabel-signals")
    watcher.daemon = True
    watcher.start()
    _installed = True


def _watch(read_fd: int) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except InterruptedError:
            continue
        if not data:
            return
        for signum in data:
            if signum in STOP_SIGNALS:
                _arrived(signum)


def _arrived(signum: int) -> None:
    global _signals
    with _lock:
        _signals += 1
        count = _signals
    name = signal.Signals(signum).name
    if count > 1:
        os.write(2, f"modlabel: error: interrupted by {name} again: stopped at once\n".encode())
        os._exit(ExitCode.INTERRUPTED)
    request(f"interrupted by {name}")


def _on_signal(signum: int, _frame: object) -> None:
    """The Python-level handler, run in the main thread between bytecodes."""
    if _interruptible > 0:
        raise StopRequested(f"interrupted by {signal.Signals(signum).name}")


def request(reason: str) -> None:
    """Ask for a stop at the next safe point and run the stop callbacks (once)."""
    global _reason
    with _lock:
        if _requested.is_set():
            return
        _reason = reason
        _requested.set()
        callbacks = list(_callbacks.values())
    for callback in callbacks:
        with contextlib.suppress(Exception):  # a callback's failure must not stop the others
            callback()


def requested() -> bool:
    return _requested.is_set()


def reason() -> str:
    return _reason or "interrupted"


def check() -> None:
    """Raise ``Interrupted`` if a stop was asked for."""
    if _requested.is_set():
        raise Interrupted(reason())


def sleep(seconds: float) -> None:
    """``time.sleep`` that ends early, raising ``Interrupted``, when a stop is asked for."""
    if _requested.wait(max(0.0, seconds)):
        check()


def wait(done: Callable[[], bool], *, poll: float = 0.05, timeout: float | None = None) -> bool:
    """Wait until ``done()``; ``Interrupted`` on a stop. False when ``timeout`` passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done():
        check()
        if deadline is not None and time.monotonic() >= deadline:
            return False
        _requested.wait(poll)
    return True


@contextlib.contextmanager
def on_stop(callback: Callable[[], None]) -> Iterator[None]:
    """Run ``callback`` (from the watcher thread) if a stop is asked for inside the block;
    at once if one was asked for already."""
    global _next_token
    with _lock:
        _next_token += 1
        token = _next_token
        _callbacks[token] = callback
        already = _requested.is_set()
    if already:
        with contextlib.suppress(Exception):
            callback()
    try:
        yield
    finally:
        with _lock:
            _callbacks.pop(token, None)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Inside, a stop signal raises ``StopRequested`` in the main thread at once (for code
    that may be left at any point: reads, connection attempts). Elsewhere a signal only
    asks for the stop."""
    global _interruptible
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    check_stop = _requested.is_set()
    _interruptible += 1
    try:
        if check_stop:
            raise StopRequested(reason())
        yield
    finally:
        _interruptible -= 1


def reset() -> None:
    """Forget an earlier stop (tests, and applications that run several scans)."""
    global _reason, _signals
    with _lock:
        _requested.clear()
        _reason = ""
        _signals = 0
