"""``modlabel serve``: its routes with Starlette's test client, against a real database
scanned with the toy ONNX model (SQLite; one PostgreSQL run), its safety (read-only,
no traversal, escaping, a bounded upload, the token, no password) and its CLI."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402
from toy_onnx import write_pngs  # noqa: E402

from modlabel import store  # noqa: E402
from modlabel.model import OnnxModel  # noqa: E402
from modlabel.scan import scan_archive  # noqa: E402
from modlabel.serve import UPLOAD_MAX_BYTES, create_app  # noqa: E402
from modlabel.serve import data as serve_data  # noqa: E402

HOSTILE = "<script>alert(1)</script>.png"
IMAGES = 60  # more than a grid page (data.PAGE_SIZE)


def _scan_into(url: str, archive: Path, model_path: Path) -> None:
    engine = store.open_db(url)
    stats = scan_archive([str(archive)], OnnxModel(model_path), engine, class_min_confidence=0.0)
    assert stats.labeled == IMAGES and stats.errors == 1
    # A stored row whose file name is hostile markup (a name no scan here can make: it
    # holds a slash), two rows with a DICOM Modality and one flagged out of set.
    with engine.begin() as conn:
        first = conn.execute(sa.select(store.images).order_by(store.images.c.id)).mappings().first()
        hostile = {k: v for k, v in first.items() if k not in ("id", "embedding")}
        hostile["path"] = str(archive / HOSTILE)
        conn.execute(store.images.insert().values(**hostile))
        ids = conn.execute(
            sa.select(store.images.c.id).where(store.images.c.error.is_(None)).limit(2)
        ).scalars()
        conn.execute(
            store.images.update()
            .where(store.images.c.id.in_(list(ids)))
            .values(dicom_modality="CT")
        )
        # A row flagged out of set by a model whose rule gave no score (an older export).
        conn.execute(
            store.images.update()
            .where(store.images.c.path.like("%noise_07.png"))
            .values(out_of_set=True, ood_score=None)
        )
    engine.dispose()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve_archive")
    write_pngs(folder, IMAGES, seed=3)
    (folder / "broken.png").write_bytes(b"not an image at all")
    return folder


@pytest.fixture(scope="module")
def served_db(archive: Path, toy_onnx: Path, tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('serve_db') / 'labels.db'}"
    _scan_into(url, archive, toy_onnx)
    return url


@pytest.fixture(scope="module")
def client(served_db: str, toy_onnx: Path):
    with TestClient(create_app(served_db, model_path=toy_onnx)) as test_client:
        yield test_client


def _ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'href="/image/(\d+)"', html)]


def test_every_page_renders_without_script_under_a_strict_policy(client):
    for url in ["/", "/grid", "/grid?label=a", "/grid?errors=1", "/scans", "/search?q=noise"]:
        response = client.get(url)
        assert response.status_code == 200, url
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src" not in policy
        assert "'unsafe-inline'" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "<script" not in response.text.lower(), url
    classes = client.get("/").text
    assert 'src="/classmap.png?label=a"' in classes or 'src="/classmap.png?label=c"' in classes
    scans = client.get("/scans").text
    assert "not a recognized image format" in scans and "broken.png" in scans


def test_the_class_grid_pages_by_keyset_through_every_row(client, served_db):
    seen: list[int] = []
    url = "/grid?sort=path&dir=asc"
    pages = 0
    while url:
        html = client.get(url).text
        seen += _ids(html)
        pages += 1
        found = re.search(r'rel="next" href="([^"]+)"', html)
        url = found.group(1).replace("&amp;", "&") if found else ""
        assert "offset" not in url.lower()
    assert pages == 2
    engine = sa.create_engine(served_db)
    with engine.connect() as conn:
        expected = conn.execute(
            sa.select(store.images.c.id)
            .where(store.images.c.error.is_(None), store.images.c.out_of_set.is_not(True))
            .order_by(store.images.c.path, store.images.c.id)
        ).scalars()
        assert seen == list(expected)


def _walk(engine, model_id: int, query, limit: int, labels) -> list[int]:
    """Every page of a grid, each reached through the page before's link, as a browser
    follows it: the ids shown, in order."""
    walked: list[int] = []
    while True:
        page = serve_data.grid_page(engine, model_id, query, limit=limit, labels=labels)
        walked += [r["id"] for r in page.rows]
        if page.next_after is None:
            return walked
        query = serve_data.GridQuery.from_params(query.params(after=page.next_after))


@pytest.mark.parametrize(
    ("sort", "descending"),
    [("confidence", True), ("confidence", False), ("path", False), ("date", True)],
)
@pytest.mark.parametrize("by_class", [False, True])
def test_keyset_pages_are_the_whole_ordering_without_repeats(served_db, sort, descending, by_class):
    # by_class: every class by confidence is read as a page of each class, merged (the
    # server's way, with the model's classes); it must be the one query's ordering.
    engine = serve_data.open_read_only(served_db)
    model = store.pick_model(engine)
    model_id = model.id
    labels = model.class_names if by_class else ()
    query = serve_data.GridQuery(sort=sort, descending=descending, out_of_set="include")
    everything = serve_data.grid_page(engine, model_id, query, limit=10_000).rows
    walked = _walk(engine, model_id, query, 7, labels)
    assert walked == [r["id"] for r in everything]
    assert len(walked) == len(set(walked)) == IMAGES + 1  # the hostile row too


@pytest.mark.parametrize("descending", [True, False])
def test_every_class_by_confidence_keeps_unlabeled_rows_and_labels_outside_the_classes(
    served_db, tmp_path, descending
):
    # A scan with --abstain leaves a flagged image without a label but with its confidence;
    # a label that is not one of the model's classes (written by hand) is shown too.
    copy = tmp_path / "labels.db"
    shutil.copy(store.sqlite_file(served_db), copy)
    url = f"sqlite:///{copy}"
    engine = store.open_db(url, migrate=False, create=False)
    with engine.begin() as conn:
        ids = list(
            conn.execute(
                sa.select(store.images.c.id).where(store.images.c.error.is_(None)).limit(2)
            ).scalars()
        )
        conn.execute(store.images.update().where(store.images.c.id == ids[0]).values(label=None))
        conn.execute(
            store.images.update().where(store.images.c.id == ids[1]).values(label="hand made")
        )
    engine.dispose()
    engine = serve_data.open_read_only(url)
    model_id = store.pick_model(engine).id
    labels = serve_data.stored_labels(engine, model_id)
    assert None in labels and "hand made" in labels
    query = serve_data.GridQuery(descending=descending, out_of_set="include")
    everything = [r["id"] for r in serve_data.grid_page(engine, model_id, query, limit=10_000).rows]
    walked = _walk(engine, model_id, query, 9, labels)
    assert walked == everything and set(ids) <= set(walked)
    engine.dispose()


def test_a_later_page_reads_the_confidence_index_and_no_offset(served_db):
    engine = serve_data.open_read_only(served_db)
    model_id = store.pick_model(engine).id
    query = serve_data.GridQuery(label="a", after=(0.44, 10))
    statements: list[tuple[str, tuple]] = []
    sa.event.listen(
        engine, "before_cursor_execute", lambda *args: statements.append((args[2], args[3]))
    )
    serve_data.grid_page(engine, model_id, query)
    ((sql, params),) = [s for s in statements if "FROM images" in s[0]]
    # SQLAlchemy's SQLite dialect always writes "LIMIT ? OFFSET ?": the offset is 0.
    assert not sql.upper().endswith("OFFSET ?") or params[-1] == 0
    with engine.connect() as conn:
        compiled = (
            sa.select(store.images.c.id)
            .where(*serve_data.grid_conditions(model_id, query))
            .order_by(store.images.c.confidence.desc(), store.images.c.id.desc())
        )
        plan = " ".join(
            str(r[-1])
            for r in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN "
                + str(compiled.compile(engine, compile_kwargs={"literal_binds": True}))
            )
        )
    assert "ix_images_model_label_confidence" in plan and "TEMP B-TREE" not in plan


def test_filters_narrow_the_grid(client):
    ct = client.get("/grid?modality=CT").text
    assert len(_ids(ct)) == 2
    errors = client.get("/grid?errors=1").text
    assert "broken.png" in errors and len(_ids(errors)) == 1
    some = client.get("/grid?min=0.44&max=0.45&sort=confidence").text
    shown = [float(p) for p in re.findall(r"(\d+\.\d)%", some)]
    assert shown and all(44.0 <= p <= 45.0 for p in shown)
    flagged = client.get("/grid?oos=only").text
    assert len(_ids(flagged)) == 1 and "noise_07.png" in flagged
    assert "noise_07.png" in client.get("/grid?oos=include&sort=path&dir=asc").text
    # Its page says so, with no score to show (the model's rule gave none).
    page = client.get(f"/image/{_ids(flagged)[0]}")
    assert page.status_code == 200 and "Out of set: likely none of the classes" in page.text
    assert len(_ids(client.get("/grid?missing=only").text)) == 0


@pytest.mark.parametrize(
    "url",
    ["/grid?sort=bogus", "/grid?min=abc", "/grid?max=2", "/grid?after=garbage", "/image/1?map=x"],
)
def test_a_bad_parameter_is_a_400_page(client, url):
    response = client.get(url)
    assert response.status_code == 400
    assert "Traceback" not in response.text


def test_an_image_page_shows_maps_probabilities_history_and_similar_images(client):
    first = _ids(client.get("/grid?label=a").text)[0]
    html = client.get(f"/image/{first}").text
    for part in ("CRM", "CAM", "Grad-CAM", "<meter", "Scan history", "Labeled by scan #1"):
        assert part in html
    for method in ("crm", "cam", "gradcam", "none"):
        response = client.get(f"/image/{first}/picture.png?map={method}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        picture = np.asarray(Image.open(io.BytesIO(response.content)))
        assert picture.ndim == 3 and picture.std() > 0
    thumb = client.get(f"/image/{first}/thumb.png")
    assert thumb.status_code == 200 and "x-modlabel-note" not in thumb.headers
    # The similar images are a page of their own, framed by the image page (a search may
    # take seconds; the page does not wait for it): links open in the whole window.
    assert f'<iframe class="similar" src="/image/{first}/similar"' in html
    similar = client.get(f"/image/{first}/similar").text
    neighbours = _ids(similar)
    assert len(neighbours) == serve_data.SIMILAR_SHOWN
    assert first not in neighbours
    assert similar.count('target="_top"') == serve_data.SIMILAR_SHOWN


def test_without_a_model_file_the_page_says_crm_only(archive, toy_onnx, tmp_path):
    copy = tmp_path / "gone.onnx"
    shutil.copy(toy_onnx, copy)
    folder = tmp_path / "few"
    write_pngs(folder, 3, seed=9)
    url = f"sqlite:///{tmp_path / 'few.db'}"
    scan_archive([str(folder)], OnnxModel(copy), store.open_db(url))
    copy.unlink()
    with TestClient(create_app(url)) as web:
        html = web.get("/image/1").text
        assert "no model file" in html and ">CAM<" not in html
        assert web.get("/image/1/picture.png?map=cam").status_code == 404
        assert web.get("/image/1/picture.png?map=crm").status_code == 200
        assert "needs the model file" in web.get("/search").text


def test_another_models_file_is_not_used_for_maps_or_uploads(served_db, tmp_path):
    from toy_onnx import toy_model

    other = toy_model(tmp_path / "other.onnx", seed=1)
    with TestClient(create_app(served_db, model_path=other)) as web:
        html = web.get("/image/1").text
        assert "is not the model that labeled this database" in html and ">CAM<" not in html
        assert web.get("/image/1/picture.png?map=gradcam").status_code == 404


def test_files_are_served_by_row_id_never_by_a_path_from_the_request(client, served_db):
    for url in [
        "/image/..%2F..%2F..%2Fetc%2Fpasswd/thumb.png",
        "/image/../../etc/passwd",
        "/image/%2Fetc%2Fpasswd/picture.png",
        "/static/..%2F..%2F..%2Fpyproject.toml",
        "/static/../app.py",
        "/image/999999/picture.png",
        "/image/-1/thumb.png",
    ]:
        response = client.get(url)
        assert response.status_code == 404, url
        assert b"root:" not in response.content and b"[project]" not in response.content
    plain = client.get("/image/1/picture.png?map=none").content
    assert client.get("/image/1/picture.png?map=none&path=/etc/passwd").content == plain


def test_a_hostile_file_name_is_escaped_everywhere(client, served_db):
    engine = sa.create_engine(served_db)
    with engine.connect() as conn:
        row_id = conn.execute(
            sa.select(store.images.c.id).where(store.images.c.path.like("%<script>%"))
        ).scalar_one()
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;.png"
    for url in [f"/image/{row_id}", "/grid?sort=path", "/search?q=script"]:
        html = client.get(url).text
        assert escaped in html, url
        assert "<script>alert(1)" not in html
    # Its row has no embedding (written without one): its similar images say so.
    assert "no embedding stored" in client.get(f"/image/{row_id}/similar").text
    # Its file does not exist: a placeholder that says why, never a broken picture.
    thumb = client.get(f"/image/{row_id}/thumb.png")
    assert thumb.status_code == 200 and thumb.headers["x-modlabel-note"]


def test_a_search_by_uploaded_image_finds_its_own_row_and_stores_nothing(
    client, archive, served_db
):
    engine = sa.create_engine(served_db)
    with engine.connect() as conn:
        before = conn.execute(sa.select(sa.func.count()).select_from(store.images)).scalar()
        own = conn.execute(
            sa.select(store.images.c.id).where(store.images.c.path.like("%noise_05.png"))
        ).scalar_one()
    payload = (archive / "noise_05.png").read_bytes()
    response = client.post("/search", files={"image": ("query.png", payload, "image/png")})
    assert response.status_code == 200
    assert _ids(response.text)[0] == own  # its nearest stored image is itself
    broken = client.post("/search", files={"image": ("x.png", b"nothing", "image/png")})
    assert broken.status_code == 200 and "x.png: " in broken.text
    with engine.connect() as conn:
        after = conn.execute(sa.select(sa.func.count()).select_from(store.images)).scalar()
    assert after == before


def test_an_upload_over_the_limit_is_refused_with_413(client):
    huge = b"\0" * (UPLOAD_MAX_BYTES + 2**20)
    response = client.post("/search", files={"image": ("huge.png", huge, "image/png")})
    assert response.status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(UPLOAD_MAX_BYTES // 2**20 + 2):
            yield b"\0" * 2**20

    streamed = client.post(
        "/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert streamed.status_code == 413


def test_the_server_never_writes_the_database(client, served_db):
    engine = client.app.state.serve.engine
    with (
        pytest.raises(sa.exc.OperationalError, match="readonly|read-only"),
        engine.begin() as conn,
    ):
        conn.execute(store.images.delete())
    assert serve_data.read_only_url(served_db).endswith("?mode=ro&uri=true")


def test_with_a_token_every_request_needs_it(served_db):
    token = "s3cret-token-value"
    with TestClient(create_app(served_db, token=token), follow_redirects=False) as web:
        assert web.get("/").status_code == 401
        assert web.get("/image/1/thumb.png").status_code == 401
        assert web.get("/?token=wrong").status_code == 401
        assert web.get("/", headers={"authorization": f"Bearer {token}"}).status_code == 200
        entry = web.get(f"/grid?label=a&token={token}")
        assert entry.status_code == 303 and entry.headers["location"] == "/grid?label=a"
        assert "httponly" in entry.headers["set-cookie"].lower()
        assert web.get("/grid?label=a").status_code == 200  # the cookie now
        assert token not in web.get("/grid?label=a").text


def test_under_a_root_path_every_link_carries_it(served_db):
    with TestClient(create_app(served_db, root_path="/modlabel/")) as web:
        html = web.get("/modlabel/").text
        links = re.findall(r'(?:href|src|action)="([^"]+)"', html)
        assert links and all(link.startswith("/modlabel/") for link in links)
        assert web.get("/modlabel/static/style.css").status_code == 200
        assert web.get("/modlabel/grid?label=a").status_code == 200


def test_postgresql_pages_show_no_password(postgres_database, archive, toy_onnx):
    url = postgres_database("serve")
    _scan_into(url, archive, toy_onnx)
    with_password = sa.engine.make_url(url).set(password="pw-never-shown")
    shown_url = with_password.render_as_string(hide_password=False)
    with TestClient(create_app(shown_url, model_path=toy_onnx)) as web:
        engine = web.app.state.serve.engine
        with pytest.raises(sa.exc.InternalError, match="read-only"), engine.begin() as conn:
            conn.execute(store.images.delete())
        first = _ids(web.get("/grid?label=a").text)[0]
        for page in ["/", "/grid?label=a&sort=date", f"/image/{first}", "/scans", "/search?q=a"]:
            response = web.get(page)
            assert response.status_code == 200, page
            assert "pw-never-shown" not in response.text
        assert "***" in web.get("/").text
        # Keyset pages by date (timestamps with their zone here) cover every row once.
        seen, url = [], "/grid?sort=date"
        while url:
            html = web.get(url).text
            seen += _ids(html)
            found = re.search(r'rel="next" href="([^"]+)"', html)
            url = found.group(1).replace("&amp;", "&") if found else ""
        assert len(seen) == len(set(seen)) == IMAGES  # the flagged one left out


def _modlabel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modlabel", *args], capture_output=True, text=True, timeout=120
    )


def test_serve_refuses_a_public_address_without_a_token(served_db):
    result = _modlabel("serve", "--db", served_db, "--host", "0.0.0.0")
    assert result.returncode == 2
    assert result.stderr.startswith("modlabel: error: --host 0.0.0.0")
    assert "Traceback" not in result.stderr
    missing = _modlabel("serve", "--db", "/nonexistent/labels.db")
    assert missing.returncode == 5 and len(missing.stderr.strip().splitlines()) == 1


def test_serve_refuses_a_model_file_that_is_no_model(served_db, tmp_path):
    bogus = tmp_path / "model.onnx"
    bogus.write_text("not a model")
    result = _modlabel("serve", "--db", served_db, "--model", str(bogus))
    assert result.returncode == 4
    assert result.stderr.startswith("modlabel: error: ") and "Traceback" not in result.stderr
