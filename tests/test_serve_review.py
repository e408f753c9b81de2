"""``modlabel serve --allow-review``: off by default (no route, nothing written), refused
off loopback without a token, the token and the CSRF checks enforced, reviews recorded
and undone through the page (SQLite and PostgreSQL), a writable engine that writes the
reviews table only; and in a real browser, three images reviewed with the keyboard."""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image
from serving import serving

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402
from toy_onnx import write_pngs  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from modlabel import store  # noqa: E402
from modlabel.cli import app as cli  # noqa: E402
from modlabel.errors import DatabaseError  # noqa: E402
from modlabel.model import OnnxModel  # noqa: E402
from modlabel.scan import scan_archive  # noqa: E402
from modlabel.serve import create_app  # noqa: E402

IMAGES = 8
ORIGIN = {"origin": "http://testserver"}
CHROMIUM = Path("/usr/bin/chromium")


def _scan(url: str, folder: Path, toy_onnx: Path) -> str:
    engine = store.open_db(url)
    scan_archive([str(folder)], OnnxModel(toy_onnx), engine, class_min_confidence=0.0)
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("review_archive")
    write_pngs(folder, IMAGES, seed=11)
    return folder


@pytest.fixture
def sqlite_db(archive: Path, toy_onnx: Path, tmp_path: Path) -> str:
    return _scan(f"sqlite:///{tmp_path / 'labels.db'}", archive, toy_onnx)


def _reviews(url: str) -> list[dict]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(store.reviews).order_by(store.reviews.c.id)).mappings()
        found = [dict(r) for r in rows]
    engine.dispose()
    return found


def _form(html: str) -> dict[str, str]:
    """The review form's hidden fields of a review page."""
    return {
        "csrf": re.search(r'name="csrf" value="([^"]+)"', html).group(1),
        "row": re.search(r'name="row" value="(\d+)"', html).group(1),
        "strategy": re.search(r'name="strategy" value="([^"]*)"', html).group(1),
    }


def test_review_mode_is_off_by_default_and_nothing_is_written(sqlite_db: str, toy_onnx: Path):
    database = Path(sqlite_db.removeprefix("sqlite:///"))
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    web = create_app(sqlite_db, model_path=toy_onnx)
    assert web.state.serve.review is None  # no writable engine at all
    with TestClient(web) as client:
        assert client.get("/review").status_code == 404
        for url in ("/review", "/review/undo"):
            response = client.post(url, data={"row": "1", "label": "a"}, headers=ORIGIN)
            assert response.status_code in (404, 405)
        page = client.get("/").text
        assert 'href="/review"' not in page and "read-only" in page
        assert "script-src" not in client.get("/").headers["content-security-policy"]
    assert _reviews(sqlite_db) == []
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before


def test_off_loopback_review_mode_needs_a_token(sqlite_db: str, monkeypatch):
    monkeypatch.delenv("MODLABEL_SERVE_TOKEN", raising=False)
    result = CliRunner().invoke(
        cli, ["serve", "--db", sqlite_db, "--allow-review", "--host", "0.0.0.0"]
    )
    assert result.exit_code == 2
    assert "--token" in result.output and "review" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, ["serve", "--db", sqlite_db, "--reviewer", "alice"])
    assert result.exit_code == 2 and "--allow-review" in result.output
    result = CliRunner().invoke(
        cli, ["serve", "--db", sqlite_db, "--allow-review", "--workers", "2"]
    )
    assert result.exit_code == 2 and "one worker" in result.output


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_review_is_recorded_and_undone_through_the_page(
    dialect, archive: Path, toy_onnx: Path, tmp_path: Path, postgres_database
):
    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'labels.db'}"
    else:
        url = postgres_database("review")
    _scan(url, archive, toy_onnx)
    web = create_app(url, model_path=toy_onnx, allow_review=True, reviewer="alice")
    with TestClient(web) as client:
        page = client.get("/review")
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert "frame-ancestors 'none'" in policy
        assert page.headers["referrer-policy"] == "same-origin"
        assert '<script src="/static/review.js" defer></script>' in page.text
        assert "<kbd>1</kbd> a" in page.text and "<kbd>3</kbd> c" in page.text
        first = _form(page.text)
        answer = client.post("/review", data={**first, "label": "b"}, headers=ORIGIN,
                             follow_redirects=False)  # fmt: skip
        assert answer.status_code == 303
        assert answer.headers["location"] == "/review?strategy=uncertainty"
        page = client.get("/review").text
        assert '<b class="session-count">1</b> in this session' in page
        image = client.get(f"/image/{first['row']}").text  # the review beside the model's label
        assert "Reviewed: <b>b</b> by alice" in image and "(uncertainty)" in image
        second = _form(page)
        assert second["row"] != first["row"]  # the reviewed image left the queue
        client.post("/review", data={**second, "label": "none"}, headers=ORIGIN)
        client.post("/review", data={**second, "label": "none"}, headers=ORIGIN)  # twice
        reviews = _reviews(url)
        assert [(r["label"], r["reviewer"], r["strategy"]) for r in reviews] == [
            ("b", "alice", "uncertainty"),
            (None, "alice", "uncertainty"),
        ]
        undone = client.post("/review/undo", data=second, headers=ORIGIN)
        assert "undone: your review of" in undone.text
        assert '<b class="session-count">1</b> in this session' in undone.text
        reviews = _reviews(url)
        assert reviews[1]["undone_by"] == "alice" and reviews[0]["undone_at"] is None
        # A class the model does not have is refused, and records nothing.
        bad = client.post("/review", data={**_form(undone.text), "label": "zebra"},
                          headers=ORIGIN)  # fmt: skip
        assert bad.status_code == 400 and len(_reviews(url)) == 2


def test_posts_without_the_origin_or_the_session_token_are_refused(sqlite_db: str, toy_onnx: Path):
    web = create_app(sqlite_db, model_path=toy_onnx, allow_review=True, reviewer="alice")
    with TestClient(web) as client:
        fields = {**_form(client.get("/review").text), "label": "a"}
        attempts = [
            ({}, fields),  # no Origin, no Referer
            ({"origin": "http://evil.example"}, fields),
            ({"origin": "null"}, fields),
            ({"referer": "http://evil.example/review"}, fields),
            (ORIGIN, {**fields, "csrf": "forged"}),
            (ORIGIN, {k: v for k, v in fields.items() if k != "csrf"}),
        ]
        for headers, data in attempts:
            response = client.post("/review", data=data, headers=headers)
            assert response.status_code == 403, (headers, data)
        assert client.get("/review", params={**fields}).status_code == 200  # GET never writes
        empty = client.get("/review", params={"strategy": "disagreement"})
        assert empty.status_code == 200 and "Nothing left to review" in empty.text
        assert client.get("/review", params={"strategy": "loudest"}).status_code == 400
    with TestClient(web) as stranger:  # the form of another session
        assert stranger.post("/review", data=fields, headers=ORIGIN).status_code == 403
    assert _reviews(sqlite_db) == []
    with TestClient(web) as client:  # the same page from the same origin, by its Referer
        fields = {**_form(client.get("/review").text), "label": "a"}
        referer = {"referer": "http://testserver/review"}
        assert client.post("/review", data=fields, headers=referer).status_code == 200
    assert len(_reviews(sqlite_db)) == 1


def test_the_token_is_enforced_in_review_mode(sqlite_db: str, toy_onnx: Path):
    token = "a-long-enough-token"
    web = create_app(sqlite_db, model_path=toy_onnx, allow_review=True, reviewer="bob", token=token)
    with TestClient(web) as client:
        assert client.get("/review").status_code == 401
        bearer = {"authorization": f"Bearer {token}"}
        fields = {**_form(client.get("/review", headers=bearer).text), "label": "c"}
        assert client.post("/review", data=fields, headers=ORIGIN).status_code == 401
        assert _reviews(sqlite_db) == []
        answer = client.post("/review", data=fields, headers={**ORIGIN, **bearer})
        assert answer.status_code == 200
    assert [r["reviewer"] for r in _reviews(sqlite_db)] == ["bob"]


def test_the_writable_engine_writes_the_reviews_table_only(sqlite_db: str, toy_onnx: Path):
    web = create_app(sqlite_db, model_path=toy_onnx, allow_review=True, reviewer="alice")
    writer = web.state.serve.review.engine
    with TestClient(web):  # its end closes the engines
        for statement in (
            "UPDATE images SET label = 'a'",
            "DELETE FROM reviews",
            "DROP TABLE reviews",
            "INSERT INTO images (model_id) VALUES (1)",
        ):
            with pytest.raises(DatabaseError, match="reviews table only"), writer.begin() as conn:
                conn.exec_driver_sql(statement)
        with writer.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM images").scalar() == IMAGES


# -- in a real browser --------------------------------------------------------------------


@pytest.fixture
def review_server(sqlite_db: str, toy_onnx: Path):
    with serving(
        "--db",
        sqlite_db,
        "--model",
        str(toy_onnx),
        "--allow-review",
        "--reviewer",
        "carol",
        ready="/review",
    ) as base:
        yield base


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")
def test_three_images_are_reviewed_with_the_keyboard_in_a_browser(
    review_server: str, sqlite_db: str, tmp_path: Path
):
    playwright_api = pytest.importorskip("playwright.sync_api")
    problems: list[str] = []
    shown: list[str] = []
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda m: (
                    problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning")
                    else None
                ),
            )
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on(
                "response",
                lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None,
            )
            page.goto(review_server + "/review")
            assert page.title().startswith("Review")
            for key in ("1", "2", "0"):
                shown.append(page.locator('input[name="row"]').get_attribute("value"))
                # The POST, its redirect and the next page (a reviewer need not wait for
                # its pictures before the next key).
                with page.expect_navigation(wait_until="domcontentloaded"):
                    page.keyboard.press(key)
            page.wait_for_load_state("networkidle")
            assert page.locator(".session-count").inner_text() == "3"
            assert page.locator(".total-count").inner_text() == "3"
            assert page.locator("img.picture").evaluate("img => img.naturalWidth") > 0
            shot = Path(os.environ.get("MODLABEL_TEST_SHOT_DIR", tmp_path)) / "review.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert len(set(shown)) == 3  # a new image after each key
    reviews = _reviews(sqlite_db)
    assert [(r["label"], r["reviewer"]) for r in reviews] == [
        ("a", "carol"),
        ("b", "carol"),
        (None, "carol"),
    ]
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"))
    assert pixels.reshape(-1, 3).std(axis=0).max() > 10  # not one colour: a page was drawn
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
