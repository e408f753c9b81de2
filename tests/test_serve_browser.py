"""``modlabel serve`` in a real browser: the command itself (uvicorn) in a subprocess on a
free port, Debian's chromium driven by Playwright through classes -> a class grid -> an
image -> a similar image, with no console error, no failed request, and a screenshot
that is not blank."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import serving

CHROMIUM = Path("/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")


@pytest.fixture(scope="module")
def server(tmp_path_factory, toy_onnx: Path):
    from toy_onnx import write_pngs

    from modlabel import store
    from modlabel.model import OnnxModel
    from modlabel.scan import scan_archive

    folder = tmp_path_factory.mktemp("browser_archive")
    write_pngs(folder, 24, seed=5)
    url = f"sqlite:///{tmp_path_factory.mktemp('browser_db') / 'labels.db'}"
    scan_archive([str(folder)], OnnxModel(toy_onnx), store.open_db(url), class_min_confidence=0.0)
    with serving("--db", url, "--model", str(toy_onnx), ready="/") as base:
        yield base


def test_a_person_walks_from_the_classes_to_a_similar_image(server, tmp_path):
    problems: list[str] = []
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
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
            page.on(
                "response",
                lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None,
            )
            page.goto(server + "/", wait_until="networkidle")
            assert page.title().startswith("Classes")
            page.locator(".card h2 a").first.click()
            page.wait_for_load_state("networkidle")
            assert "/grid?label=" in page.url
            page.locator("ul.grid li a").first.click()
            page.wait_for_load_state("networkidle")
            first_image = page.url
            assert "/image/" in first_image
            assert page.locator("img.picture").evaluate("img => img.naturalWidth") > 0
            page.frame_locator("iframe.similar").locator("li a").first.click()
            page.wait_for_load_state("networkidle")
            assert "/image/" in page.url and page.url != first_image
            shot = tmp_path / "similar.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert problems == []
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"))
    assert pixels.reshape(-1, 3).std(axis=0).max() > 10  # not one colour: a page was drawn
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
