"""``modlabel serve`` really started, for the browser tests: a subprocess on a free port,
waited for until a page answers, and stopped with SIGINT as a user stops it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(*args: str, ready: str = "/") -> Iterator[str]:
    """``modlabel serve ARGS --port P`` running; yields its base URL once ``ready`` answers
    200 (60 s at most, else the test fails with the server's stderr)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "modlabel", "serve", *args, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(base + ready, timeout=2) as response:
                assert response.status == 200
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                _, err = process.communicate()
                pytest.fail(f"modlabel serve did not start: {err.decode()}")
            time.sleep(0.2)
    try:
        yield base
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
