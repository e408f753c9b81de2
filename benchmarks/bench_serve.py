"""``modlabel serve`` under load: 50 concurrent clients for 30 s against 127.0.0.1.

Fills a SQLite database with N image rows (default 100,000: 7 classes, a real compressed
18x18 CRM and a 512-value embedding per row, clustered by class; 2% errors, 1% missing),
starts ``modlabel serve`` on it in a subprocess (uvicorn, one process, as a user runs it),
and has ``--clients`` clients (asyncio + httpx, in this process) ask, for ``--seconds``,
each in turn for

* a class grid: a random class, its first page, then its next page by the page's own
  keyset link (``after=``), sorted by confidence, path or date;
* an image page: a random row (its probabilities, history and 12 similar images).

It prints the p50/p95/max latency of each, the errors (any status but 200, any failure),
and the server's RSS sampled every second with its peak (VmHWM): memory that stays flat is
the point. It asserts nothing. The clients share the machine with the server: on few
cores their own work is in the figures.

Usage: python benchmarks/bench_serve.py [--rows 100000] [--clients 50] [--seconds 30]
       [--workers N] [--db URL] (an existing database instead of a synthetic one)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from modlabel import codec, store

LABELS = ["abdominal_ct", "brain_mri", "chest_xray", "fluorescence_microscopy",
          "retinal_funduscopy", "statistical_graph", "ultrasound"]  # fmt: skip
EMBEDDING_K = 512
CHUNK = 20_000
SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy stores a UTC time in SQLite


def fill(url: str, rows: int, seed: int = 0) -> None:
    """``rows`` synthetic rows of one model, written with the driver's executemany (fast)."""
    engine = store.open_db(url)
    rng = np.random.default_rng(seed)
    model_id = store.ensure_model(
        engine, identity="vgg16-000000000000", sha256="0" * 64, backbone="vgg16",
        class_names=LABELS, input_size=[300, 300], activation_shape=[18, 18, EMBEDDING_K],
        path="/nonexistent/model.onnx",
    )  # fmt: skip
    crms = codec.encode_maps(rng.gamma(2.0, 1.0, size=(2048, 18, 18)).astype(np.float32))
    centres = rng.normal(size=(len(LABELS), EMBEDDING_K))
    now = datetime(2026, 11, 25, tzinfo=timezone.utc)
    columns = None
    for start in range(0, rows, CHUNK):
        n = min(rows, start + CHUNK) - start
        idx = np.arange(start, start + n)
        vectors = centres[idx % 7] + 0.6 * rng.normal(size=(n, EMBEDDING_K))
        embeddings = codec.encode_embeddings(np.abs(vectors))
        batch = []
        for j, i in enumerate(idx.tolist()):
            failed = i % 50 == 0
            confidence = float(rng.beta(8, 1))
            label = LABELS[i % 7]
            batch.append({
                "model_id": model_id, "path": f"/archive/{i // 1000:05d}/{i:08d}.jpg",
                "size_bytes": 50_000 + i % 1000, "mtime": 1.7e9 + i, "sha256": f"{i:064x}",
                "width": 512, "height": 512,
                "label": None if failed else label,
                "confidence": None if failed else confidence,
                "probabilities": None if failed else
                    f'{{"{label}": {confidence}, "{LABELS[(i + 3) % 7]}": {1 - confidence}}}',
                "crm": None if failed else crms[i % len(crms)],
                "error": "cannot decode image: truncated" if failed else None,
                "labeled_at": (now + timedelta(microseconds=i)).strftime(SQLITE_TIME),
                "missing_since": now.strftime(SQLITE_TIME) if i % 100 == 7 else None,
                "runner_up": None if failed else LABELS[(i + 3) % 7],
                "runner_up_probability": None if failed else 1 - confidence,
                "out_of_set": None if failed else int(i % 100 == 11),
                "embedding": None if failed else embeddings[j],
            })  # fmt: skip
        columns = columns or list(batch[0])
        with engine.begin() as conn:
            conn.connection.driver_connection.cursor().executemany(
                f"INSERT INTO images ({', '.join(columns)}) VALUES "
                f"({', '.join('?' for _ in columns)})",
                [tuple(r[c] for c in columns) for r in batch],
            )
    for _ in range(5):
        scan_id = store.start_scan(engine, model_id, ["/archive"])
        store.finish_scan(engine, scan_id, seen=rows, unchanged=rows)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE"))
    engine.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process and its children (the worker processes), KiB."""
    rss = hwm = 0
    for one in [pid, *_children(pid)]:
        try:
            status = Path(f"/proc/{one}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                rss += int(value.split()[0])
            elif key == "VmHWM":
                hwm += int(value.split()[0])
    return rss, hwm


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in task.read_text().split():
                found += [int(child), *_children(int(child))]
    return found


class KeepAlive:
    """One client's HTTP/1.1 connection, kept alive: the least a client can cost (an
    httpx client costs several times the server's CPU per request, and on a small machine
    the clients' own queueing would be what is measured)."""

    def __init__(self, base: str) -> None:
        host_port = base.split("//", 1)[1]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, str]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        request = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n"
        self.writer.write(request.encode("ascii"))
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.lower() == "content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        return status, body.decode("utf-8", "replace")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (``/proc/PID/stat``)."""
    total = 0.0
    for one in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def load(
    base: str, ids: list[int], clients: int, seconds: float, pid: int, warmup: float
) -> dict:
    """Run the clients for ``warmup`` then ``seconds`` more; only the latter is counted."""

    latencies: dict[str, list[float]] = {"grid": [], "grid next page": [], "image": []}
    errors: list[str] = []
    rss: list[int] = []
    counting_from = time.monotonic() + warmup
    deadline = counting_from + seconds
    cpu_at: list[float] = []
    next_link = re.compile(r'rel="next" href="([^"]+)"')

    async def timed(client: KeepAlive, kind: str, url: str) -> str | None:
        start = time.perf_counter()
        warming_up = time.monotonic() < counting_from
        try:
            status, body = await client.get(url)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors.append(f"{kind}: {type(exc).__name__}")
            client.close()
            return None
        if warming_up:
            return body if status == 200 else None
        latencies[kind].append(time.perf_counter() - start)
        if status != 200:
            errors.append(f"{kind}: HTTP {status}")
            return None
        return body

    async def one_client(seed: int) -> None:
        rng = random.Random(seed)
        client = KeepAlive(base)
        try:
            while time.monotonic() < deadline:
                sort = rng.choice(["confidence", "path", "date"])
                html = await timed(client, "grid", f"/grid?label={rng.choice(LABELS)}&sort={sort}")
                found = next_link.search(html or "")
                if found:
                    await timed(client, "grid next page", found.group(1).replace("&amp;", "&"))
                await timed(client, "image", f"/image/{rng.choice(ids)}")
        finally:
            client.close()

    async def sample_memory() -> None:
        await asyncio.sleep(max(0.0, counting_from - time.monotonic()))
        cpu_at.append(_cpu_seconds(pid))
        while time.monotonic() < deadline:
            rss.append(_rss_kib(pid)[0])
            await asyncio.sleep(1.0)
        cpu_at.append(_cpu_seconds(pid))

    await asyncio.gather(sample_memory(), *(one_client(i) for i in range(clients)))
    return {
        "latencies": latencies,
        "errors": errors,
        "rss": rss,
        "hwm": _rss_kib(pid)[1],
        "cpu": cpu_at[-1] - cpu_at[0] if len(cpu_at) == 2 else None,
    }


def _ms(values: list[float], q: float) -> str:
    return f"{1000 * float(np.quantile(values, q)):7.1f}" if values else "      -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--db", help="an existing database (default: a synthetic SQLite one)")
    parser.add_argument("--workers", type=int, default=1, help="modlabel serve --workers")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not counted first")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db
        if url is None:
            url = f"sqlite:///{Path(tmp) / 'serve.db'}"
            start = time.perf_counter()
            fill(url, args.rows)
            print(f"filled {args.rows:,} rows in {time.perf_counter() - start:.1f} s")
        engine = store.open_db(url, migrate=False, create=False)
        with engine.connect() as conn:
            ids = list(conn.execute(sa.select(store.images.c.id)).scalars())
        engine.dispose()
        port = _free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modlabel",
                "serve",
                "--db",
                url,
                "--port",
                str(port),
                "--workers",
                str(args.workers),
            ],  # fmt: skip
            env={**os.environ, "NO_COLOR": "1"},
        )
        base = f"http://127.0.0.1:{port}"
        try:
            import httpx

            for _ in range(300):
                try:
                    httpx.get(base + "/scans", timeout=2)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            started_kib = _rss_kib(server.pid)[0]
            result = asyncio.run(
                load(base, ids, args.clients, args.seconds, server.pid, args.warmup)
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(
        f"{args.clients} clients for {args.seconds:.0f} s against {base} "
        f"({args.workers} server process{'es' if args.workers > 1 else ''}), "
        f"{len(ids):,} rows ({os.cpu_count()} CPUs, clients on the same machine)"
    )
    print(f"{'page':<16} {'requests':>9} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7}")
    for kind, values in result["latencies"].items():
        print(
            f"{kind:<16} {len(values):>9,} {_ms(values, 0.5)} {_ms(values, 0.95)} "
            f"{_ms(values, 1.0)}"
        )
    total = sum(len(v) for v in result["latencies"].values())
    print(f"requests/s: {total / args.seconds:,.0f}; errors: {len(result['errors'])}")
    if result["cpu"] is not None and total:
        print(
            f"server CPU: {1000 * result['cpu'] / total:.1f} ms a request "
            f"({result['cpu'] / args.seconds:.2f} cores busy of {os.cpu_count()})"
        )
    for error in sorted(set(result["errors"]))[:10]:
        print(f"  {error} ({result['errors'].count(error)})")
    rss = result["rss"]
    if rss:
        thirds = [rss[: len(rss) // 3 or 1], rss[-(len(rss) // 3 or 1) :]]
        print(
            f"server RSS: {started_kib / 1024:.0f} MiB idle, "
            f"{np.mean(thirds[0]) / 1024:.0f} MiB in the first third, "
            f"{np.mean(thirds[1]) / 1024:.0f} MiB in the last, "
            f"peak {result['hwm'] / 1024:.0f} MiB (the sum over its processes)"
        )


if __name__ == "__main__":
    main()
