"""The decode workers from Python: the pixels a scan's threads made, crashes and hangs that
cost one result each, and a stop that cancels instead of blaming a file."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modlabel import decode, decode_pool, stopping
from modlabel.decode_pool import DecodePool, DecodeRequest, DecodeSpec
from modlabel.decode_worker import TEST_FAULT_ENV

SIZE = (48, 40)


@pytest.fixture
def files(tiny_archive: Path) -> list[Path]:
    return sorted(tiny_archive.rglob("*.jpg"))[:10]


@pytest.fixture
def faulty(monkeypatch):
    """A zygote whose workers carry the test fault hook (its environment is its own)."""

    def start(fault: str) -> None:
        decode_pool._close_zygote()
        monkeypatch.setenv(TEST_FAULT_ENV, fault)

    yield start
    monkeypatch.delenv(TEST_FAULT_ENV, raising=False)
    decode_pool._close_zygote()


def test_workers_give_the_pixels_of_an_in_process_decode(files):
    mean, std = (10.0, 20.0, 30.0), (2.0, 3.0, 4.0)
    spec = DecodeSpec(size_hw=SIZE, mean=mean, std=std, display_px=32)
    with DecodePool(spec, workers=2) as pool:
        results = list(pool.map(files, lambda p: DecodeRequest(str(p))))
    for path, result in results:
        pixels, original = decode.load_pixels(path, SIZE)
        assert result.error is None and result.original_wh == original
        assert np.array_equal(result.pixels, decode.normalize(pixels, mean, std))
        assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert max(result.display.shape[:2]) <= 32 and result.display.dtype == np.uint8


def test_a_known_hash_stops_after_hashing(files):
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()
    with DecodePool(DecodeSpec(size_hw=SIZE)) as pool:
        same = pool.decode(DecodeRequest(str(files[0]), known_sha256=digest))
        other = pool.decode(DecodeRequest(str(files[0]), known_sha256="0" * 64))
    assert same.unchanged and same.pixels is None
    assert not other.unchanged and other.pixels.shape == (*SIZE, 3)


def test_arrays_that_do_not_fit_the_slot_go_through_the_pipe():
    from modlabel.decode_pool import _Worker
    from modlabel.decode_worker import _pack

    pixels = np.arange(48 * 40 * 3, dtype=np.float32).reshape(48, 40, 3)
    display = np.full((100, 80, 3), 7, np.uint8)
    slot = memoryview(bytearray(pixels.nbytes + 64))  # room for the pixels only
    packed = _pack({"pixels": pixels, "display": display}, slot)
    assert packed["pixels"][0] == "slot" and packed["display"] is display
    worker = _Worker(DecodeSpec(size_hw=(48, 40), mean=(0, 0, 0), std=(1, 1, 1)), 0)
    try:
        worker.slots[: len(slot)] = slot.tobytes()
        result = worker.unpack(packed, 0)
    finally:
        worker.close()
    assert np.array_equal(result.pixels, pixels) and np.array_equal(result.display, display)


def test_bytes_given_by_the_caller_are_decoded_as_a_file_would_be(files):
    with DecodePool(DecodeSpec(size_hw=SIZE)) as pool:
        given = pool.decode(DecodeRequest("table:figures/1", data=files[0].read_bytes()))
        read = pool.decode(DecodeRequest(str(files[0])))
    assert np.array_equal(given.pixels, read.pixels)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("abort", "decoder crashed: SIGABRT"), ("segv", "decoder crashed: SIGSEGV")],
)
def test_a_crash_costs_one_result_and_the_worker_is_replaced(files, faulty, fault, reason):
    faulty(f"{fault}:{files[3].name}")
    with DecodePool(DecodeSpec(size_hw=SIZE), workers=1) as pool:
        results = [d for _, d in pool.map(files, lambda p: DecodeRequest(str(p)))]
        assert pool.crashes == 2  # tried again on a fresh worker before it is blamed
    assert results[3].error.startswith(reason)
    assert all(r.error is None for i, r in enumerate(results) if i != 3)


def test_a_crash_that_does_not_come_again_blames_no_file(files, faulty, tmp_path):
    """A worker that died once (the OOM killer, a stray signal) is not the file's fault:
    the file is tried once more on a fresh worker, and labeled."""
    import shutil

    files = [Path(shutil.copy2(f, tmp_path / f.name)) for f in files]  # the hook writes beside
    faulty(f"abort-once:{files[2].name}")
    with DecodePool(DecodeSpec(size_hw=SIZE), workers=1) as pool:
        results = [d for _, d in pool.map(files, lambda p: DecodeRequest(str(p)))]
        assert pool.crashes == 1
    assert all(r.error is None for r in results)
    assert Path(f"{files[2]}.crashed").exists()


def test_a_hang_is_cut_at_the_time_limit(files, faulty):
    faulty(f"hang:{files[1].name}")
    with DecodePool(DecodeSpec(size_hw=SIZE), workers=1, timeout=1.0) as pool:
        started = time.monotonic()
        hung = pool.decode(DecodeRequest(str(files[1])))
        assert time.monotonic() - started < 5
        after = pool.decode(DecodeRequest(str(files[2])))
    assert hung.error == "timed out after 1 s (--decode-timeout)"
    assert after.error is None


def test_memory_past_the_limit_is_the_files_error(files, faulty):
    faulty(f"oom:{files[1].name}")
    with DecodePool(DecodeSpec(size_hw=SIZE), workers=1, memory_bytes=600 << 20) as pool:
        result = pool.decode(DecodeRequest(str(files[1])))
        after = pool.decode(DecodeRequest(str(files[2])))
    assert result.error.startswith("over the decode memory limit (600 MiB")
    assert after.error is None


def test_a_stop_cancels_what_is_in_flight_and_blames_no_file(files, faulty):
    faulty(f"hang:{files[0].name}")
    stopping.reset()
    pool = DecodePool(DecodeSpec(size_hw=SIZE), workers=1, timeout=60)
    threading.Timer(0.5, stopping.request, args=("a test's stop",)).start()
    try:
        started = time.monotonic()
        result = pool.decode(DecodeRequest(str(files[0])))
        assert time.monotonic() - started < 5
        assert result.cancelled and result.error is None
        assert pool.crashes == 0
        assert pool.decode(DecodeRequest(str(files[1]))).cancelled  # no new work after a stop
    finally:
        pool.close()
        stopping.reset()


def test_a_killed_worker_server_costs_no_file_and_a_new_one_starts(files):
    """kill -9 of the zygote mid-run: the files in flight are tried again on workers of a
    new zygote, and none is blamed for it."""
    import os
    import signal

    with DecodePool(DecodeSpec(size_hw=SIZE), workers=2) as pool:
        first = [d for _, d in pool.map(files[:3], lambda p: DecodeRequest(str(p)))]
        old = decode_pool._zygote()
        os.kill(old.process.pid, signal.SIGKILL)
        old.process.wait(10)
        rest = [d for _, d in pool.map(files[3:], lambda p: DecodeRequest(str(p)))]
        assert decode_pool._zygote() is not old
    assert all(d.error is None and d.failed is None for d in first + rest)


def test_too_little_memory_for_a_worker_fails_the_pool_not_the_files(files):
    with DecodePool(DecodeSpec(size_hw=SIZE), workers=1, memory_bytes=64 << 20) as pool:
        results = [d for _, d in pool.map(files[:3], lambda p: DecodeRequest(str(p)))]
    assert all(d.error is None for d in results)
    assert all("less than a decode worker needs to start" in d.failed for d in results)
