"""Untrusted bytes run apart: files are read and decoded in a pool of worker processes.

An archive is untrusted input. Its files are read, hashed and decoded by a few
worker processes (``modlabel.decode_worker``), never by the process that holds
the database, the lock and the model. Each worker runs under an address-space
limit (``memory_bytes``, ``--decode-memory``) and each file under a time limit
(``timeout``, ``--decode-timeout``). A worker that crashes (a signal, a C
library's ``abort()``), runs out of memory or overruns costs one result with the
reason ("decoder crashed: SIGABRT (...)", "over the decode memory limit",
"timed out after 60 s"), which the scan stores as that file's error row; the
worker is replaced and the next file goes on. What a decoder's C library writes
to stderr goes into that reason when it crashed, and is dropped otherwise.

Workers are forked from a server process of their own (the zygote, started once
per process with ``python -c``) that has imported the decoders, so a replacement
starts in milliseconds; the zygote reaps them and reports how each ended (its
signal, its peak memory). The pixels come back through shared memory (a memfd
each worker maps, a slot for one file) and are copied once, into the parent's
array. A stop (``stopping``)
kills the workers, so that nothing waits on a decode; a result cut short that
way is ``cancelled``, never a file's error.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from . import config, stopping
from .dicom import DicomHeader
from .errors import one_line
from .reasons import Kind

__all__ = ["DecodePool", "DecodeRequest", "DecodeSpec", "Decoded"]

# How long a new worker may take to say it is ready (the server imports the decoders
# once, on the first start).
START_SECONDS = 60.0
# Read back from a worker's stderr capture after it crashed, at most.
CAPTURE_BYTES = 4096


@dataclass(frozen=True)
class DecodeSpec:
    """What a pool's workers make of each file, the same for every file.

    size_hw: (height, width) of the model's input, or None for no model pixels;
    mean, std: normalize the model pixels into float32 ((pixels - mean) / std), or None
    to return them as uint8; display_px: also the whole image for people, its longest
    side at most this; max_bytes: the largest file read (and the most a deflated DICOM
    dataset may inflate to).
    """

    size_hw: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    display_px: int | None = None
    max_bytes: int = 256 * 1024 * 1024

    @property
    def slot_bytes(self) -> int:
        """Shared memory a worker writes one file's pixels to (larger results are piped)."""
        size = 64
        if self.size_hw is not None:
            per_value = 4 if self.mean is not None else 1
            size += self.size_hw[0] * self.size_hw[1] * 3 * per_value
        if self.display_px is not None:
            size += self.display_px * self.display_px * 3
        return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


@dataclass(frozen=True)
class DecodeRequest:
    """One file to decode: ``path`` (read here, bounded), or ``data``, its bytes already
    (a table's blob); ``known_sha256``: the stored hash, to stop after hashing when the
    content is the same."""

    path: str
    data: bytes | None = None
    known_sha256: str | None = None
    max_bytes: int | None = None  # overrides the spec's


def over_memory(memory_bytes: int) -> str:
    return f"over the decode memory limit ({memory_bytes / 2**20:,.0f} MiB, --decode-memory)"


@dataclass
class Decoded:
    """One file as a worker made it: its hash, and its pixels or the reason it has none."""

    sha256: str | None = None
    unchanged: bool = False  # the content hash is the stored one: nothing was decoded
    original_wh: tuple[int, int] | None = None  # (width, height), upright
    pixels: np.ndarray | None = None  # (H, W, 3): float32 normalized, or uint8
    display: np.ndarray | None = None  # (h, w, 3) uint8, for people
    dicom: DicomHeader | None = None
    error: str | None = None
    error_kind: Kind | None = None  # what kind of error ``error`` is
    cancelled: bool = False  # the pool was stopped while this file was being decoded
    failed: str | None = None  # the pool itself failed (no worker can start): not the file


_T = TypeVar("_T")

# Files in flight per worker: one being decoded, one waiting beside it (two slots of shared
# memory), so that a worker never waits for the parent between files.
SLOTS_PER_WORKER = 2


# A worker that dies costs the file it was decoding its result only on a second death: the
# first may be none of its doing (the system's OOM killer, an operator's kill, the zygote
# gone), and a file is blamed for nothing it did not do twice.
ATTEMPTS = 2
# A file in flight when the workers' server itself ended is tried again this many times.
SERVER_LOSSES = 3
# A pool whose workers cannot start this many times in a row gives up (``Decoded.failed``).
START_FAILURES = 3


@dataclass
class _Job:
    request: DecodeRequest
    future: Future
    slot: int = -1
    deaths: int = 0  # workers that died while decoding it
    orphaned: int = 0  # workers lost with their server (the zygote) while decoding it


class DecodePool:
    """A few decode worker processes, fed by one dispatcher thread.

    ``submit(request)`` queues one file and returns a ``Future`` of its ``Decoded``;
    ``decode`` waits for it; ``map`` decodes many, in order, with a bounded number in
    flight. The dispatcher keeps ``workers`` processes busy, two files each, starts
    them when needed, replaces any that dies and cuts any file at ``timeout``. Use it
    as a context manager, or ``close`` it.
    """

    def __init__(
        self,
        spec: DecodeSpec,
        *,
        workers: int = config.DEFAULT_DECODERS,
        memory_bytes: int = config.DEFAULT_DECODE_MEMORY,
        timeout: float = config.DEFAULT_DECODE_TIMEOUT,
    ) -> None:
        self.spec = spec
        self.workers = max(1, workers)
        self.memory_bytes = memory_bytes
        self.timeout = timeout
        self.crashes = 0  # workers lost to a crash, the memory limit or the time limit
        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()  # submitted, not yet sent to a worker
        self._running: list[_Worker] = []  # the dispatcher's own: no other thread touches them
        self._closed = False
        self._failure: str | None = None  # why the pool cannot go on (no worker starts)
        self._start_failures = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        start_server()
        self._thread = threading.Thread(target=self._dispatch, name="modlabel-decoders")
        self._thread.daemon = True
        self._thread.start()
        self._stop_hook = stopping.on_stop(self.abort)
        self._stop_hook.__enter__()

    # -- the caller's side ---------------------------------------------------

    def submit(self, request: DecodeRequest) -> Future:
        """Queue one file; the future's result is its ``Decoded``, never an exception."""
        job = _Job(request, Future())
        with self._lock:
            closed, failure = self._closed, self._failure
            if not closed and self._thread.is_alive():
                self._queue.append(job)
                closed = None
        if closed is not None:
            _settle(job, Decoded(cancelled=failure is None, failed=failure))
        else:
            self._wake()
        return job.future

    def decode(self, request: DecodeRequest) -> Decoded:
        """Decode one file. Never raises for the file's sake: whatever went wrong is in
        ``Decoded.error``."""
        return self.submit(request).result()

    def map(
        self,
        items: Iterable[_T],
        request_of: Callable[[_T], DecodeRequest | None],
        *,
        window: int | None = None,
    ) -> Iterator[tuple[_T, Decoded | None]]:
        """(item, its result) for every item, in order, with at most ``window`` in flight
        (flat memory). ``request_of(item)`` runs on the calling thread; None means nothing
        to decode for that item (its result is None)."""
        window = window or 2 * SLOTS_PER_WORKER * self.workers
        pending: deque[tuple[_T, Future | None]] = deque()
        try:
            for item in items:
                request = request_of(item)
                pending.append((item, self.submit(request) if request is not None else None))
                if len(pending) >= window:
                    yield _done(pending.popleft())
            while pending:
                yield _done(pending.popleft())
        finally:
            if pending:
                self.abort()  # left early (a stop, an error): no decode is waited for

    def abort(self) -> None:
        """Stop now (a stop, or leaving early): every worker is killed, and every file
        queued or in flight comes back ``cancelled``. Safe from any thread."""
        with self._lock:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            running = list(self._running)
        for job in queued:
            _settle(job, Decoded(cancelled=True))
        for worker in running:
            worker.kill()
        self._wake()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake()
        self._thread.join()
        self._stop_hook.__exit__(None, None, None)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    # -- the dispatcher thread -------------------------------------------------

    def _dispatch(self) -> None:
        from multiprocessing.connection import wait

        try:
            while True:
                with self._lock:
                    closed = self._closed
                if closed:
                    break
                self._assign()
                busy = {w.conn: w for w in self._running if w.inflight}
                timeout = self._until_deadline()
                before = time.monotonic()
                ready = wait([*busy, self._wake_r], timeout)
                self._forgive_frozen_time(time.monotonic() - before, timeout)
                for conn in ready:
                    if conn == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                    else:
                        self._receive(busy[conn])
                self._cut_overruns()
        except Exception as exc:  # the pool's own failure (no descriptor left, ...)
            self._fail(f"the decode workers failed: {type(exc).__name__}: {one_line(exc)}")
        finally:
            self._shut_down()

    def _forgive_frozen_time(self, elapsed: float, timeout: float | None) -> None:
        """Time the whole scan stood still (SIGSTOP and SIGCONT of its process group, a
        machine suspended) is not counted against the files being decoded."""
        if timeout is None or elapsed <= timeout + FROZEN_SECONDS:
            return
        frozen = elapsed - timeout
        for worker in self._running:
            worker.head_since += frozen

    def _fail(self, reason: str) -> None:
        """The pool cannot go on: every file queued or in flight gets ``failed``."""
        with self._lock:
            self._failure = reason
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
        for job in queued:
            _settle(job, Decoded(failed=reason))

    def _assign(self) -> None:
        """Send queued files to workers with a free slot, starting workers as needed."""
        while True:
            with self._lock:
                if not self._queue or self._closed:
                    return
            free = [w for w in self._running if len(w.inflight) < SLOTS_PER_WORKER]
            if free and (min(len(w.inflight) for w in free) == 0 or
                         len(self._running) >= self.workers):  # fmt: skip
                worker = min(free, key=lambda w: len(w.inflight))
            elif len(self._running) < self.workers:
                worker = self._start()
                if worker is None:
                    return
            else:
                return
            with self._lock:
                if not self._queue or self._closed:
                    return
                job = self._queue.popleft()
            if not worker.send(job):
                self._lost(worker)

    def _start(self) -> _Worker | None:
        worker = _Worker(self.spec, self.memory_bytes)
        with self._lock:
            if self._closed:
                worker.close()
                return None
            self._running.append(worker)
        try:
            worker.start()
        except _StartError as exc:
            with self._lock:
                self._running.remove(worker)
            worker.close()
            self._start_failures += 1
            if self._start_failures >= START_FAILURES or exc.final:
                self._fail(f"decode workers cannot start: {exc}")
            return None
        self._start_failures = 0
        return worker

    def _receive(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._lost(worker)
            return
        job = worker.inflight.popleft()
        result = worker.unpack(message, job.slot)
        worker.head_since = time.monotonic()
        _settle(job, result)

    def _lost(self, worker: _Worker, reason: Decoded | None = None) -> None:
        """A worker is gone (a crash, or cut at the time limit). A time limit blames the
        file it was decoding at once; a death blames it on the second (``ATTEMPTS``), the
        first being possibly none of its doing. The file waiting beside it is never
        blamed: it goes to another worker."""
        with self._lock:
            if worker in self._running:
                self._running.remove(worker)
        result = reason or worker.died()
        jobs = list(worker.inflight)
        worker.inflight.clear()
        worker.close()
        if result.cancelled:
            for job in jobs:
                _settle(job, result)
            return
        again = jobs[1:]
        if reason is None and worker.ended is None and worker.zygote.gone:
            # Its server ended (killed, say): how the worker ended is unknown, and none of
            # the file's doing. Tried again on a new server's workers, a few times.
            for job in jobs:
                job.orphaned += 1
            if any(job.orphaned > SERVER_LOSSES for job in jobs):
                for job in jobs:
                    _settle(job, Decoded(failed="the decode workers' server keeps ending"))
                self._fail("the decode workers' server keeps ending")
                return
            again = jobs
        else:
            self.crashes += 1
            if jobs:
                head = jobs[0]
                head.deaths += 1
                if reason is None and head.deaths < ATTEMPTS:
                    again = jobs  # tried once more, on a fresh worker
                else:
                    _settle(head, result)
        with self._lock:
            for job in reversed(again):
                job.slot = -1
                self._queue.appendleft(job)

    def _until_deadline(self) -> float | None:
        heads = [w.head_since for w in self._running if w.inflight]
        if not heads:
            return None
        left = min(heads) + min(self.timeout, MAX_WAIT_SECONDS) - time.monotonic()
        return min(max(0.0, left), MAX_WAIT_SECONDS)

    def _cut_overruns(self) -> None:
        now = time.monotonic()
        for worker in list(self._running):
            if worker.inflight and now - worker.head_since >= self.timeout:
                worker.terminate()
                overrun = Decoded(
                    error=f"timed out after {self.timeout:g} s (--decode-timeout)",
                    error_kind=Kind.DECODE_TIMEOUT,
                )
                self._lost(worker, overrun)

    def _shut_down(self) -> None:
        with self._lock:
            running = list(self._running)
            self._running.clear()
            queued = list(self._queue)
            self._queue.clear()
        for worker in running:
            for job in worker.inflight:
                _settle(job, Decoded(cancelled=True))
            worker.inflight.clear()
            worker.close()
        for job in queued:
            _settle(job, Decoded(cancelled=True))


# A wait that took this much longer than asked means the process stood still (SIGSTOP).
FROZEN_SECONDS = 1.0
# No wait is longer than this (poll's limit is about 24 days).
MAX_WAIT_SECONDS = 86400.0


def _settle(job: _Job, result: Decoded) -> None:
    with contextlib.suppress(InvalidStateError):
        job.future.set_result(result)


def _done(entry: tuple[_T, Future | None]) -> tuple[_T, Decoded | None]:
    item, future = entry
    return item, (future.result() if future is not None else None)


def image_pool(
    size_hw: Sequence[int] | None = None,
    *,
    display_px: int | None = None,
    max_bytes: int | None = None,
) -> DecodePool:
    """Decode workers for the commands that look at images (explain, localize, the
    report's examples and its evaluation): a model's input pixels at ``size_hw`` as
    uint8, exactly as a scan decodes them, and/or, with ``display_px``, the image for
    people; under the default limits."""
    spec = DecodeSpec(
        size_hw=(int(size_hw[0]), int(size_hw[1])) if size_hw is not None else None,
        display_px=display_px,
        max_bytes=max_bytes or DecodeSpec.max_bytes,
    )
    return DecodePool(spec)


class _StartError(RuntimeError):
    """A worker that did not start; ``final`` when no other will (a limit too low)."""

    def __init__(self, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


class _Worker:
    """One worker process, its pipe, its shared slots and its stderr capture; owned by the
    dispatcher thread (``kill`` excepted, which any thread may call)."""

    def __init__(self, spec: DecodeSpec, memory_bytes: int) -> None:
        self.spec = spec
        self.memory_bytes = memory_bytes
        self.pid: int | None = None
        self.zygote: _Zygote | None = None
        self.ended: Ended | None = None
        self.conn: Any = None
        self.slot_bytes = spec.slot_bytes
        size = self.slot_bytes * SLOTS_PER_WORKER
        self.slot_fd = os.memfd_create("modlabel-decode", os.MFD_CLOEXEC)
        os.ftruncate(self.slot_fd, size)
        self.slots = mmap.mmap(self.slot_fd, size)
        self.capture = tempfile.TemporaryFile(prefix="modlabel-decoder-")  # noqa: SIM115
        self.inflight: deque[_Job] = deque()
        self.head_since = time.monotonic()  # since when the first file in flight is decoded
        self.cancelled = False  # killed by the pool (a stop): not the file's doing

    def start(self) -> None:
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.zygote = _zygote()  # its own: a zygote started later never knew this worker
        try:
            self.pid = self.zygote.fork(
                [theirs.fileno(), self.slot_fd, self.capture.fileno()],
                (self.spec, self.memory_bytes, SLOTS_PER_WORKER),
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        try:
            said = self.conn.recv() if self.conn.poll(START_SECONDS) else None
        except (OSError, EOFError):
            said = None
        if isinstance(said, tuple) and said[0] == "too little memory":
            self.terminate()
            raise _StartError(
                f"--decode-memory {self.memory_bytes / 2**20:,.0f} MiB is less than a decode "
                f"worker needs to start ({said[1] / 2**20:,.0f} MiB)",
                final=True,
            )
        if said != "ready":
            self.terminate()
            why = one_line(self._captured() or self.zygote.why(), 300)
            raise _StartError("a decode worker did not start" + (f": {why}" if why else ""))

    def send(self, job: _Job) -> bool:
        """Give the worker a file, in a free slot; False if it is gone."""
        used = {j.slot for j in self.inflight}
        job.slot = next(i for i in range(SLOTS_PER_WORKER) if i not in used)
        if not self.inflight:
            self.head_since = time.monotonic()
        self.inflight.append(job)
        try:
            self.conn.send((job.slot, job.request))
        except (OSError, ValueError):
            return False
        return True

    def unpack(self, message: dict, slot: int) -> Decoded:
        base = slot * self.slot_bytes
        for key in ("pixels", "display"):
            value = message.get(key)
            if isinstance(value, tuple) and value and value[0] == "slot":
                _, dtype, shape, offset = value
                count = int(np.prod(shape))
                view = np.frombuffer(
                    self.slots, dtype=np.dtype(dtype), count=count, offset=base + offset
                )
                message[key] = view.reshape(shape).copy()  # the one copy out of the slot
        return Decoded(
            sha256=message.get("sha256"),
            unchanged=bool(message.get("unchanged")),
            original_wh=message.get("original_wh"),
            pixels=message.get("pixels"),
            display=message.get("display"),
            dicom=message.get("dicom"),
            error=message.get("error"),
            error_kind=message.get("error_kind"),
        )

    def died(self) -> Decoded:
        """The worker is gone: why, from its exit status and what it printed."""
        ended = self._wait(5.0)
        if self.cancelled:
            return Decoded(cancelled=True)
        code = ended.exit_code if ended is not None else None
        printed = one_line(self._captured(), 300)
        kind = Kind.DECODER_CRASHED
        if code is not None and code < 0:
            name = _signal_name(-code)
            if -code == signal.SIGKILL:
                reason = f"decoder killed ({name}; by the system, out of memory?)"
            else:
                reason = f"decoder crashed: {name}"
        else:
            reason = f"decoder exited with status {code}"
        if any(s in printed for s in ("bad_alloc", "MemoryError", "annot allocate memory")):
            reason = over_memory(self.memory_bytes) + f"; {reason}"
            kind = Kind.DECODE_MEMORY
        return Decoded(error=f"{reason} ({printed})" if printed else reason, error_kind=kind)

    def _captured(self) -> str:
        try:
            raw = os.pread(self.capture.fileno(), CAPTURE_BYTES, 0)
        except OSError:
            return ""
        return raw.decode("utf-8", errors="replace").strip()

    def kill(self) -> None:
        """End the worker for the pool's own sake (a stop, leaving early): what it was
        decoding comes back ``cancelled``, not as the file's error."""
        self.cancelled = True
        self.terminate()

    def terminate(self) -> None:
        if self.pid is not None and self.ended is None:
            self.zygote.kill(self.pid)

    def _wait(self, timeout: float) -> Ended | None:
        """How the process ended (waiting up to ``timeout`` s for it to end)."""
        if self.ended is None and self.pid is not None:
            self.ended = self.zygote.wait(self.pid, timeout)
        return self.ended

    def close(self) -> None:
        if self.pid is not None and self.ended is None:
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(None)  # "no more": the worker returns
            if self._wait(2.0) is None:
                self.terminate()
                self._wait(5.0)
        for closing in (self.conn, self.slots, self.capture):
            if closing is not None:
                with contextlib.suppress(OSError, ValueError, BufferError):
                    closing.close()
        with contextlib.suppress(OSError):
            os.close(self.slot_fd)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class Ended:
    """How a worker process ended, as the zygote reaped it."""

    exit_code: int  # as subprocess gives it: negative for a signal
    max_rss_kib: int


# The environment of the zygote and so of every worker: one BLAS thread (a worker never
# multiplies matrices, and every thread's buffers would count against its memory limit).
ONE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class _Zygote:
    """The process that forks decode workers, and the thread that hears from it.

    Requests go over a SOCK_SEQPACKET pair, each one message with the worker's file
    descriptors attached; the zygote answers ("forked", id, pid) and, when it reaps a
    worker, ("ended", pid, exit code, peak RSS in KiB).
    """

    def __init__(self) -> None:
        import subprocess
        import sys

        self.owner = os.getpid()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.errors = tempfile.TemporaryFile(prefix="modlabel-zygote-")  # noqa: SIM115
        # The zygote imports the modlabel this process imported: the same sys.path, made
        # absolute, and nothing from the folder it happens to start in.
        path = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        code = (
            f"import sys; sys.path[:] = {path!r}; "
            f"from modlabel.decode_worker import zygote; zygote({theirs.fileno()})"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.errors,
            env={**os.environ, **ONE_THREAD_ENV},
            close_fds=True,
        )
        theirs.close()
        self.sock = ours
        self.lock = threading.Lock()
        self.changed = threading.Condition()
        self.forked: dict[int, int] = {}  # request id -> pid
        self.ended: dict[int, Ended] = {}
        self.gone = False
        self.next_id = 0
        self.reader = threading.Thread(target=self._read, name="modlabel-zygote", daemon=True)
        self.reader.start()

    def fork(self, fds: list[int], setup: tuple) -> int:
        """A new worker with these file descriptors (its pipe, its slot, its capture) and
        ``setup`` = (spec, memory_bytes); returns its pid."""
        import pickle

        with self.lock:
            self.next_id += 1
            request = self.next_id
            message = pickle.dumps(("fork", request, setup))
            try:
                socket.send_fds(self.sock, [message], fds)
            except OSError as exc:
                raise _StartError(f"the decode workers' server is gone ({exc})") from None
        with self.changed:
            if not self.changed.wait_for(
                lambda: request in self.forked or self.gone, START_SECONDS
            ):
                raise _StartError("the decode workers' server did not answer")
            if request not in self.forked:
                raise _StartError(f"the decode workers' server ended{self._why()}")
            return self.forked.pop(request)

    def kill(self, pid: int) -> None:
        """SIGKILL worker ``pid``. The zygote sends it, and only to a child it has not
        reaped yet, so the signal can never reach another process that got the pid."""
        import pickle

        with self.lock, contextlib.suppress(OSError):
            self.sock.send(pickle.dumps(("kill", pid, None)))

    def wait(self, pid: int, timeout: float) -> Ended | None:
        """How worker ``pid`` ended, waiting up to ``timeout`` s; None if it has not."""
        with self.changed:
            self.changed.wait_for(lambda: pid in self.ended or self.gone, timeout)
            return self.ended.pop(pid, None)

    def _read(self) -> None:
        import pickle

        while True:
            try:
                message = self.sock.recv(65536)
            except OSError:
                message = b""
            if not message:
                with self.changed:
                    self.gone = True
                    self.changed.notify_all()
                return
            kind, *rest = pickle.loads(message)
            with self.changed:
                if kind == "forked":
                    self.forked[rest[0]] = rest[1]
                elif kind == "ended":
                    self.ended[rest[0]] = Ended(rest[1], rest[2])
                self.changed.notify_all()

    def why(self) -> str:
        """What the zygote printed last (why it could not start, say)."""
        return self._why().removeprefix(": ")

    def _why(self) -> str:
        try:
            text = os.pread(self.errors.fileno(), CAPTURE_BYTES, 0).decode("utf-8", "replace")
        except OSError:
            return ""
        text = one_line(text.strip().splitlines()[-1] if text.strip() else "", 300)
        return f": {text}" if text else ""

    def close(self) -> None:
        """Close the zygote's socket (it then waits for its workers and exits) and reap it,
        so that its and its workers' resource use count as this process's children's."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.process.wait(10)
        except Exception:  # noqa: BLE001 - still running: kill it, the workers follow
            with contextlib.suppress(OSError):
                self.process.kill()
            with contextlib.suppress(Exception):
                self.process.wait(5)


_ZYGOTE: _Zygote | None = None
_ZYGOTE_LOCK = threading.Lock()


def _zygote() -> _Zygote:
    """This process's zygote, started on first use (again after a fork, or if it ended)."""
    global _ZYGOTE
    with _ZYGOTE_LOCK:
        if _ZYGOTE is None or _ZYGOTE.owner != os.getpid() or _ZYGOTE.gone:
            if _ZYGOTE is None:
                import atexit

                atexit.register(_close_zygote)
            _ZYGOTE = _Zygote()
        return _ZYGOTE


def _close_zygote() -> None:
    global _ZYGOTE
    with _ZYGOTE_LOCK:
        zygote, _ZYGOTE = _ZYGOTE, None
    if zygote is not None and zygote.owner == os.getpid():
        zygote.close()


def start_server() -> None:
    """Start the zygote now (it imports the decoders meanwhile), so that the first worker
    starts at once when it is needed."""
    _zygote()
