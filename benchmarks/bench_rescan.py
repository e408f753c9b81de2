"""The nightly rescan of an archive where nothing changed: seconds for N unchanged files.

Writes N small files in folders of 1,000, stores a labeled row for each with
its real size and mtime (as a first scan would have), then times
``scan_archive`` over the archive: every file is walked, stat'ed and found
unchanged in the stored pages; nothing is read or run through the model.

Usage: python benchmarks/bench_rescan.py --model demo/model.onnx [--files 20000] [--postgres]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from modlabel import store
from modlabel.model import OnnxModel
from modlabel.paths import to_db
from modlabel.scan import scan_archive


def build(root: Path, files: int) -> list[Path]:
    paths = []
    for i in range(files):
        folder = root / f"{i // 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:08d}.jpg"
        path.write_bytes(b"\xff\xd8" + i.to_bytes(4, "big"))
        paths.append(path)
    return paths


def store_rows(engine, model: OnnxModel, paths: list[Path]) -> None:
    info = model.info
    model_id = store.ensure_model(
        engine, identity=model.identity, sha256=model.sha256, backbone=info.backbone,
        class_names=info.class_names, input_size=info.input_size,
        activation_shape=info.activation_shape, path=str(model.path),
    )  # fmt: skip
    now = store.utcnow()
    rows = []
    for path in paths:
        st = os.stat(path)
        rows.append({
            "path": to_db(str(path)), "size_bytes": st.st_size, "mtime": st.st_mtime,
            "sha256": "0" * 64, "width": 1, "height": 1, "label": info.class_names[0],
            "confidence": 0.5, "probabilities": None, "crm": None, "error": None,
            "labeled_at": now,
        })  # fmt: skip
    for start in range(0, len(rows), 1000):
        store.write_image_rows(engine, model_id, rows[start : start + 1000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--postgres", action="store_true", help="also on PostgreSQL")
    args = parser.parse_args()
    model = OnnxModel(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = build(tmp / "archive", args.files)
        urls = [("SQLite", f"sqlite:///{tmp / 'rescan.db'}")]
        admin = None
        if args.postgres:
            base = os.environ.get(
                "MODLABEL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
            )
            name = f"modlabel_rescan_{uuid.uuid4().hex[:8]}"
            admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            pg = sa.engine.make_url(base).set(database=name)
            urls.append(("PostgreSQL", pg.render_as_string(hide_password=False)))
        try:
            for label, url in urls:
                engine = store.open_db(url)
                store_rows(engine, model, paths)
                scan_archive([tmp / "archive"], model, engine)  # builds the class sums once
                start = time.perf_counter()
                stats = scan_archive([tmp / "archive"], model, engine)
                seconds = time.perf_counter() - start
                assert stats.unchanged == args.files and stats.labeled == 0, stats
                print(f"{label}: rescan of {args.files:,} unchanged files: {seconds:.2f} s "
                      f"({args.files / seconds:,.0f} files/s)")  # fmt: skip
                engine.dispose()
        finally:
            if admin is not None:
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
