"""The page of ``bloodcell serve`` in headless Chromium (Debian's, driven by Playwright): token prompt, upload,
table, filters, Grad-CAM, the CSV and drag and drop, checked against the API's own answers.

Skips when Chromium or Playwright is missing (``.ci/run`` installs both). ``BLOODCELL_SERVE_RUN=RUN`` serves that
run instead of a tiny one and ``BLOODCELL_SCREENSHOT=FILE.png`` saves the page with its results (docs/serve.md).
"""

from __future__ import annotations

import base64
import csv
import io
import os
import shutil
from pathlib import Path

import httpx
import pytest
from serve_helpers import Server, cell_images, make_run

CHROMIUM = os.environ.get("BLOODCELL_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
TOKEN = "browser-token-0123456789"


@pytest.fixture
def chromium():
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not installed at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def test_the_page_classifies_uploads_like_the_api(chromium, tmp_path):
    given = os.environ.get("BLOODCELL_SERVE_RUN")
    run = Path(given) if given else make_run(tmp_path)[0]
    images = cell_images(tmp_path / "cells", 16)
    server = Server(run, "--token", TOKEN, data_dir=tmp_path / "datasets")
    try:
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
        api = httpx.post(server.url + "/v1/predict", files=files, headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=120).json()["results"]
        want = {r["filename"]: r["class"] for r in api}
        assert len(want) == len(images) and all(want.values())

        # bypass_csp: the test's own wait_for_function predicates are evaluated in the page (the app keeps its CSP)
        page = chromium.new_page(viewport={"width": 1440, "height": 900}, accept_downloads=True, bypass_csp=True)
        page.goto(server.url + "/")
        page.wait_for_selector("#token-form:not([hidden])")  # the page asks for the token
        page.fill("#token-input", "wrong-token-000")
        page.click("#token-form button")
        page.wait_for_function("document.getElementById('token-error').textContent === 'wrong token'")
        page.fill("#token-input", TOKEN)
        page.click("#token-form button")
        page.wait_for_selector("#token-form[hidden]", state="attached")
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(images[0].read_bytes()[:200])
        page.set_input_files("#file-input", [*map(str, images), str(broken)])
        page.wait_for_selector("#results[data-ready=true]", state="attached", timeout=120_000)

        rows = page.locator("#results tbody tr")
        assert rows.count() == len(images) + 1
        shown = {rows.nth(i).locator("td.file").inner_text(): rows.nth(i).locator("td.cls").inner_text()
                 for i in range(rows.count())}
        assert shown == {**want, "broken.jpg": "—"}
        assert list(shown) == [*(p.name for p in images), "broken.jpg"]  # upload order, whichever answers first
        error_row = page.locator("#results tbody tr", has_text="broken.jpg")
        assert "cannot decode image" in error_row.locator("td.flags").inner_text()

        cls = api[0]["class"]
        page.select_option("#filter-class", cls)
        assert page.locator("#results tbody tr").count() == sum(c == cls for c in want.values())
        assert set(page.locator("#results tbody td.cls").all_inner_texts()) == {cls}
        page.select_option("#filter-class", "")
        page.check("#filter-review")
        assert page.locator("#results tbody tr").count() == 1 + sum(bool(r["review"] or r["out_of_distribution"])
                                                                    for r in api)  # + the error row
        page.uncheck("#filter-review")

        first = api[0]["filename"]
        page.locator("#results tbody tr", has_text=first).click()
        page.wait_for_function("() => { const i = document.getElementById('explain-img');"
                               " return i.src.startsWith('blob:') && i.complete && i.naturalWidth > 100; }",
                               timeout=60_000)
        assert page.inner_text("#explain-status").startswith(f"Grad-CAM for {want[first]}")

        with page.expect_download() as dl:
            page.click("#download-csv")
        text = Path(dl.value.path()).read_text()
        table = list(csv.DictReader(io.StringIO(text)))
        assert {r["filename"]: r["class"] for r in table} == {**want, "broken.jpg": ""}
        assert [r["error"] for r in table if r["filename"] == "broken.jpg"][0].startswith("cannot decode image")
        table = [r for r in table if r["filename"] != "broken.jpg"]
        assert all(abs(float(r["probability"]) - next(a["probability"] for a in api if a["filename"] == r["filename"]))
                   < 1e-6 for r in table)
        if os.environ.get("BLOODCELL_SCREENSHOT"):
            page.screenshot(path=os.environ["BLOODCELL_SCREENSHOT"], full_page=True)

        # drag and drop: files dropped on the drop zone (a real DataTransfer, as a file manager gives) are added
        dropped = [{"name": p.name, "b64": base64.b64encode(p.read_bytes()).decode()} for p in images[:3]]
        transfer = page.evaluate_handle(
            "(files) => { const dt = new DataTransfer(); for (const f of files) {"
            " const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));"
            " dt.items.add(new File([bytes], 'dropped-' + f.name, { type: 'image/jpeg' })); } return dt; }", dropped)
        page.dispatch_event("#drop", "dragover", {"dataTransfer": transfer})
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_function(f"document.querySelectorAll('#results tbody tr').length === {len(images) + 4}",
                               timeout=120_000)
        for f in dropped:
            row = page.locator("#results tbody tr", has_text="dropped-" + f["name"])
            assert row.locator("td.cls").inner_text() == want[f["name"]]
    finally:
        server.stop()
