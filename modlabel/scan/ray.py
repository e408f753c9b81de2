"""The scan's decode and inference on a Ray cluster (``modlabel scan --engine ray``).

Only the middle of the pipeline moves: the driver (this process) still walks
the roots, compares them with the database, holds the scan's lock and run
record, and writes every row through a ``pipeline.RowWriter``, so counts,
class sums and exit codes are those of a local scan. The files that need work
go to a Ray Data ``map_batches`` over an actor pool: each actor loads the model
once (``OnnxModel``), reads and decodes its files itself, in decode workers of
its own as a local scan does (``pipeline.prepare_all``: the paths must be
readable on every node), and labels them as a local scan does
(``pipeline.label_rows``, through ``infer``).
Rows come back to the driver as they are made.

Ray is imported here only, and this module only for ``--engine ray``.
"""

from __future__ import annotations

import itertools
import pickle
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModlabelError
from ..model import OnnxModel
from ..source import BlobEntry
from .changes import Work
from .pipeline import (
    DecodeOptions,
    Pipeline,
    ScanContext,
    decoder_pool,
    label_rows,
    prepare_all,
)

# Files handed to Ray per Dataset: the driver holds this many work items at a time (not the
# whole change set), at the cost of starting the actor pool (one model load each) per chunk.
RAY_CHUNK = 10_000
BATCHES_PER_BLOCK = 8


class RayError(ModlabelError):
    """Ray is not installed, or its cluster cannot be reached (exit code 1)."""


def connect(address: str | None = None) -> Any:
    """``ray``, connected to the cluster at ``address`` (None: ``$RAY_ADDRESS``, a cluster
    started here with ``ray start``, else a new local one). Raises ``RayError``."""
    try:
        import ray
    except ImportError:
        raise RayError("--engine ray needs Ray: pip install 'modlabel[ray]'") from None
    if ray.is_initialized():
        return ray
    _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # ConnectionError, a bad address, a version mismatch, ...
        where = address or "the default address"
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise RayError(f"cannot reach the Ray cluster at {where}: {reason}") from None
    return ray


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) that accepts no connection fails here, in
    seconds: ``ray.init`` itself waits for an unreachable head for minutes."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # let Ray judge an address of another form
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayError(f"cannot reach the Ray cluster at {address}: {exc}") from None


class _Labeler:
    """One Ray actor: one onnxruntime session and its decode workers (``decode_pool``, as
    a local scan's), labeling batches of pickled ``Work``."""

    def __init__(
        self,
        model_path: str,
        device: str,
        abstain: bool,
        max_file_bytes: int,
        decoding: DecodeOptions,
    ) -> None:
        self.model = OnnxModel(Path(model_path), device=device)
        self.abstain = abstain
        self.max_file_bytes = max_file_bytes
        self.pool = decoder_pool(self.model, decoding, max_file_bytes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        works = list(
            prepare_all(
                self.pool,
                (pickle.loads(b) for b in batch["work"]),
                self.max_file_bytes,
                window=len(batch["work"]) or 1,
            )
        )
        todo = [w for w in works if not w.unchanged]
        by_key = {}
        if todo:
            by_key = {r["path"]: r for r in label_rows(todo, self.model, abstain=self.abstain)}
        out_works, out_rows = [], []
        for work in works:
            row = by_key.get(work.key)
            work.inputs = None  # the decoded pixels stay here; the driver needs the row only
            out_works.append(pickle.dumps(work))
            out_rows.append(pickle.dumps(row))
        return {"work": np.array(out_works, dtype=object), "row": np.array(out_rows, dtype=object)}


def ray_pipeline(
    *,
    address: str | None = None,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
    device: str = "auto",
) -> Pipeline:
    """A ``run_pipeline`` for ``scan.scan_archive`` that decodes and labels on Ray.

    ``actors``: the size of the actor pool (one model session each);
    ``gpus_per_actor``: GPUs Ray reserves for each (0: CPU actors). Connects at
    once, so an unreachable cluster fails before the scan takes its lock."""
    ray = connect(address)
    actor_device = device if gpus_per_actor > 0 else "cpu"

    def pipeline(changed: Iterable[Work], run: ScanContext) -> None:
        batch_size = run.batch_size
        writer = run.writer()
        iterator = iter(changed)
        try:
            while chunk := list(itertools.islice(iterator, RAY_CHUNK)):
                for work in chunk:
                    if isinstance(work.entry, BlobEntry):
                        raise RayError("--engine ray reads files, not --blob-column figures")
                items = [{"work": pickle.dumps(w)} for w in chunk]
                # Blocks of a few batches each: enough of them to keep every actor busy,
                # few enough that Ray's per-task overhead stays small next to inference.
                blocks = max(1, -(-len(items) // (batch_size * BATCHES_PER_BLOCK)))
                dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                    _Labeler,
                    fn_constructor_kwargs={
                        "model_path": str(run.model.path),
                        "device": actor_device,
                        "abstain": run.abstain,
                        "max_file_bytes": run.max_file_bytes,
                        "decoding": run.decoding,
                    },
                    batch_size=batch_size,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=max(1, actors)),
                    num_gpus=gpus_per_actor or None,
                    # A lost actor (a node gone, a process killed) is started again and its
                    # batches run again; the driver sees each batch's output once.
                    max_restarts=-1,
                    max_task_retries=-1,
                )
                for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    writer.stop_if_asked()
                    works = [pickle.loads(b) for b in out["work"]]
                    rows = [pickle.loads(b) for b in out["row"]]
                    done = [(w, r) for w, r in zip(works, rows, strict=True) if not w.unchanged]
                    writer.touched.extend(
                        (w.key, w.entry.size_bytes, w.entry.mtime) for w in works if w.unchanged
                    )
                    writer.flush_touched()
                    if done:
                        writer.add([r for _, r in done], [w for w, _ in done])
            writer.finish()
        except BaseException:
            writer.flush_once()  # a signal or a failure keeps the labels already made
            raise

    return pipeline
