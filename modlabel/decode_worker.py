"""The inside of a decode worker: one process that reads and decodes untrusted files.

``modlabel.decode_pool`` starts these processes (forked from a server that has
imported this module, so each starts warm) and talks to them over a pipe; this
module is all that runs in them. A worker:

* ignores SIGINT and SIGTERM (a stop is the scan's to handle: a worker killed by
  it must never become a file's error) and is killed when its parent dies;
* limits itself before it reads anything: its address space (RLIMIT_AS, the
  pool's ``memory_bytes``), no core dumps, at most 1 MiB written to any file;
* points its stderr (fd 2) at a file of the pool's, emptied before each file, so
  that what a C library prints goes into that file's error text if it crashes,
  and is dropped otherwise;
* reads the file itself (``source.read_file``: regular files only, bounded),
  hashes it, stops there when the hash is the one stored, else decodes it
  (``decode.decode_image``) and writes the pixels into the pool's shared memory
  (a memfd mapped by both), from which the parent copies them once.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import mmap
import os
import pickle
import resource
import selectors
import signal
import socket
import traceback
import warnings
from typing import Any

import numpy as np

from . import decode
from .decode_pool import DecodeRequest, DecodeSpec, over_memory
from .errors import ImageError, one_line
from .reasons import Kind
from .source import read_file

# What a worker may write to a file (its stderr capture): a runaway C library's output
# is cut there instead of filling the disk.
MAX_WRITE_BYTES = 1 << 20
# An environment variable of the tests only: "<fault>:<text>" makes a worker abort, crash
# (a null pointer read), hang or run out of memory on any file whose path contains <text>;
# "abort-once" aborts the first time only (it leaves "<path>.crashed" beside the file).
TEST_FAULT_ENV = "MODLABEL_TEST_DECODER_FAULT"


def zygote(fd: int) -> None:
    """The zygote's life (``python -c``, started by ``decode_pool``): import the decoders
    once, then fork a worker for every request on the socket ``fd`` and report how each
    ended, until the socket closes."""
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    warm = False  # the DICOM decoders are imported once no request waits (_warm)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the parent stops; the socket's end ends this
    sock = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    open_ = True
    while open_ or children:
        ready = selector.select(timeout=0 if not warm else (1.0 if not open_ else None))
        if not ready and not warm:
            # Idle for the first time: the first workers were forked already (they import
            # pydicom themselves if they meet a DICOM file); every later one starts warm.
            _warm()
            warm = True
            continue
        for key, _events in ready:
            if key.fileobj is sock:
                try:
                    message, fds, _flags, _addr = socket.recv_fds(sock, 65536, 8)
                except OSError:
                    message, fds = b"", []
                if not message:
                    # The parent is gone: nobody waits for what the workers decode (one
                    # stuck in a file would otherwise run on for ever).
                    open_ = False
                    selector.unregister(sock)
                    for child in children:
                        with contextlib.suppress(OSError):
                            os.kill(child, signal.SIGKILL)
                    continue
                kind, request, setup = pickle.loads(message)
                if kind == "kill":  # only a child not reaped yet: its pid is still its own
                    for child_fd in fds:
                        os.close(child_fd)
                    if request in children:
                        with contextlib.suppress(OSError):
                            os.kill(request, signal.SIGKILL)
                    continue
                spec, memory_bytes, slots = setup
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    selector.close()
                    for inherited in (wake_r, wake_w):
                        os.close(inherited)
                    sock.close()
                    code = 1
                    try:
                        serve(fds[0], fds[1], fds[2], spec, memory_bytes, slots)
                        code = 0
                    except BaseException:
                        traceback.print_exc()  # into the capture: the crash's reason
                    finally:
                        os._exit(code)
                children.add(pid)
                for child_fd in fds:
                    os.close(child_fd)
                _send(sock, ("forked", request, pid))
            else:
                os.read(wake_r, 4096)
        _reap(children, sock if open_ else None)


def _reap(children: set[int], sock: socket.socket | None) -> None:
    while children:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        if sock is not None:
            _send(sock, ("ended", pid, os.waitstatus_to_exitcode(status), usage.ru_maxrss))


def _send(sock: socket.socket, message: tuple) -> None:
    with contextlib.suppress(OSError):  # the parent is gone: the loop ends on its EOF
        sock.send(pickle.dumps(message))


def _warm() -> None:
    """Import every decoder here, once, so that each forked worker starts warm."""
    from PIL import Image

    Image.init()
    try:
        import pydicom.pixels  # noqa: F401
        from pydicom.pixels.decoders import gdcm, pylibjpeg  # noqa: F401
    except ImportError:
        pass


def serve(
    conn_fd: int,
    slot_fd: int,
    capture_fd: int,
    spec: DecodeSpec,
    memory_bytes: int,
    slots: int = 1,
) -> None:
    """A worker's life: limit itself, then decode what the pool sends until the pipe
    closes. ``conn_fd``: its end of the pipe; ``slot_fd``: the shared memory for pixels,
    ``slots`` of ``spec.slot_bytes`` (one per file in flight); ``capture_fd``: where its
    stderr goes. Each request is (slot, ``DecodeRequest``); the files are decoded in the
    order they come."""
    from multiprocessing.connection import Connection

    _detach_from_signals()
    os.dup2(capture_fd, 2)
    os.close(capture_fd)
    shared = mmap.mmap(slot_fd, spec.slot_bytes * slots)
    os.close(slot_fd)
    conn = Connection(conn_fd)
    needed = _address_space() + START_HEADROOM
    if 0 < memory_bytes < needed:  # every file would fail: say so once, and end
        conn.send(("too little memory", needed))
        return
    _limit(memory_bytes)
    fault = os.environ.get(TEST_FAULT_ENV)
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        slot, request = message
        _empty_capture()
        result = decode_request(request, spec, memory_bytes, fault=fault)
        view = memoryview(shared)[slot * spec.slot_bytes : (slot + 1) * spec.slot_bytes]
        try:
            conn.send(_pack(result, view))
        finally:
            view.release()


def decode_request(
    request: DecodeRequest, spec: DecodeSpec, memory_bytes: int, *, fault: str | None = None
) -> dict:
    """The result of one file as a dict of plain values and arrays (see ``decode_pool``)."""
    out: dict[str, Any] = {
        "sha256": None,
        "unchanged": False,
        "error": None,
        "error_kind": None,
        "dicom": None,
    }
    max_bytes = request.max_bytes or spec.max_bytes
    try:
        if fault:
            _test_fault(fault, request)
        data = request.data if request.data is not None else read_file(request.path, max_bytes)
        out["sha256"] = hashlib.sha256(data).hexdigest()
        if request.known_sha256 is not None and request.known_sha256 == out["sha256"]:
            out["unchanged"] = True
            return out
        image = decode.decode_image(
            data,
            name=request.path,
            size_hw=spec.size_hw,
            display_px=spec.display_px,
            max_bytes=max_bytes,
        )
        del data
        out["dicom"] = image.dicom
        out["original_wh"] = image.original_wh
        if image.pixels is not None:
            out["pixels"] = (
                decode.normalize(image.pixels, spec.mean, spec.std)
                if spec.mean is not None and spec.std is not None
                else image.pixels
            )
        if image.display is not None:
            out["display"] = image.display
    except ImageError as exc:
        out["error"], out["error_kind"] = exc.reason, exc.kind
        out["dicom"] = getattr(exc, "dicom", None)
    except MemoryError:
        out["error"], out["error_kind"] = over_memory(memory_bytes), Kind.DECODE_MEMORY
    except Exception as exc:  # a decoder's own bug: the file's error, not the worker's end
        out["error"] = one_line(f"cannot decode: {type(exc).__name__}: {exc}")
        out["error_kind"] = Kind.CORRUPT
    return out


def _pack(result: dict, slot: memoryview) -> dict:
    """Arrays into the shared slot where they fit, described by (dtype, shape, offset)."""
    offset = 0
    for key in ("pixels", "display"):
        arr = result.get(key)
        if arr is None:
            continue
        arr = np.ascontiguousarray(arr)
        if offset + arr.nbytes <= len(slot):
            view = np.frombuffer(slot, dtype=arr.dtype, count=arr.size, offset=offset)
            view[:] = arr.reshape(-1)
            del view  # no export of the slot outlives the copy
            result[key] = ("slot", arr.dtype.str, arr.shape, offset)
            offset += -(-arr.nbytes // 64) * 64
        # else: the array itself goes through the pipe (a spec's slot was too small)
    return result


# Above what a worker maps at its start, the least room it needs to decode anything.
START_HEADROOM = 128 << 20


def _address_space() -> int:
    """This process's mapped address space now, in bytes (Linux; 0 where unknown)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _detach_from_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full capture file fails a write, no more
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe's end still ends the worker
        pass


def _limit(memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_WRITE_BYTES, MAX_WRITE_BYTES))
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def _empty_capture() -> None:
    try:
        os.ftruncate(2, 0)
        os.lseek(2, 0, os.SEEK_SET)
    except OSError:
        pass


def _test_fault(fault: str, request: DecodeRequest) -> None:
    kind, _, marker = fault.partition(":")
    if not marker or marker not in request.path:
        return
    if kind == "abort-once":
        flag = request.path + ".crashed"
        if os.path.exists(flag):
            return
        with open(flag, "w"):
            pass
        kind = "abort"
    if kind == "abort":
        os.write(2, b"terminate called after throwing an instance of 'test::Fault'\n")
        os.abort()
    if kind == "segv":
        ctypes.string_at(0)  # a null pointer read: SIGSEGV
    if kind == "hang":
        while True:
            signal.pause()
    if kind == "oom":
        hog = []
        while True:
            hog.append(bytearray(64 << 20))
