"""The scan: source -> decode -> infer -> maps -> store, every night.

Everything streams. Files are looked up in the database a chunk at a time;
unchanged files (same size and mtime, or same content hash) are never decoded
or labeled again; changed and new files are read and decoded by isolated
worker processes (``modlabel.decode_pool``) while the model runs, labeled in
batches by the one inference path (``modlabel.infer``), and each batch is
written in its own transaction, so an interrupted scan keeps everything it
finished. A file that cannot be read, or that crashes or exhausts its decoder,
becomes a row with an error, and the scan goes on.

One module a room, the data flowing down: ``job`` (a scan from start to end),
``backfill`` (the embeddings of rows labeled before they were kept), ``changes`` (what
needs work), ``pipeline`` (decode, label, write; the
``Pipeline`` protocol that ``ray`` implements too), ``lock`` (one scan per
model and database).
"""

from .backfill import BackfillStats, backfill_embeddings
from .changes import MissingGuard, ScanStats, Work
from .job import scan_archive
from .pipeline import DecodeOptions, Pipeline, ScanContext

__all__ = [
    "BackfillStats",
    "backfill_embeddings",
    "DecodeOptions",
    "MissingGuard",
    "Pipeline",
    "ScanContext",
    "ScanStats",
    "Work",
    "scan_archive",
]
