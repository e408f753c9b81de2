"""Stopping a scan cleanly on SIGTERM or Ctrl-C.

A signal only asks for the stop (``request``); the scan checks for it between
batches and lookups (``check``), and waits that are long (a database retry's
backoff, another scan's lock) wake up for it (``sleep``). The scan then stops
at a point where every transaction is either committed or never begun, records
itself as interrupted, and exits 7. A second signal stops at once.
"""

from __future__ import annotations

import threading

from .errors import Interrupted

_requested = threading.Event()
_reason = ""


def request(reason: str) -> None:
    """Ask the running scan to stop at its next safe point; a second request stops now."""
    global _reason
    if _requested.is_set():
        raise Interrupted(_reason)
    _reason = reason
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """Raise ``Interrupted`` if a stop was asked for."""
    if _requested.is_set():
        raise Interrupted(_reason)


def sleep(seconds: float) -> None:
    """``time.sleep`` that ends early, raising ``Interrupted``, when a stop is asked for."""
    if _requested.wait(max(0.0, seconds)):
        check()


def reset() -> None:
    global _reason
    _requested.clear()
    _reason = ""
