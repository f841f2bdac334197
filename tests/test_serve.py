"""``bloodcell serve`` over real HTTP: a server process on localhost, an httpx client, every kind of bad input."""

from __future__ import annotations

import io
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import Server, cell_images, make_run

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = ["--max-files", "3", "--max-file-mb", "0.25", "--max-pixels", "1000000", "--max-request-mb", "1"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run, data = make_run(root)
    server = Server(run, "--token", TOKEN, *LIMITS, data_dir=data)
    yield server, run, data, root
    server.stop()


@pytest.fixture(scope="module")
def images(served) -> list[Path]:
    return cell_images(served[3] / "cells", 6)


def post(server: Server, files, path: str = "/v1/predict", headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(server.url + path, files=files, headers=headers, timeout=60, **kw)


def upload(path: Path, name: str | None = None):
    return ("files", (name or path.name, path.read_bytes(), "image/jpeg"))


def assert_error(r: httpx.Response, status: int, code: str) -> str:
    """A refusal: the status, JSON {detail, code} with a one-line message, and no trace."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "code"} and body["code"] == code, body
    assert "\n" not in body["detail"] and "Traceback" not in r.text and 'File "' not in r.text
    return body["detail"]


def test_token_guards_every_api_call_but_not_health(served):
    server = served[0]
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    for method, path in (("GET", "/v1/model"), ("POST", "/v1/predict"), ("POST", "/v1/explain"),
                         ("GET", "/v1/nothing-here")):
        r = httpx.request(method, server.url + path)
        assert "Bearer TOKEN" in assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.request(method, server.url + path, headers={"Authorization": "Bearer not-the-token"})
        assert assert_error(r, 401, "unauthorized") == "wrong token"
    assert httpx.get(server.url + "/v1/model", headers=AUTH).status_code == 200


def test_model_describes_the_run(served):
    from bloodcell.inference import Classifier

    server, run = served[:2]
    m = httpx.get(server.url + "/v1/model", headers=AUTH).json()
    clf = Classifier.from_run(run, device="cpu")
    assert m["classes"] == clf.class_names and m["name"] == "se-cnn" and m["kind"] == "run"
    assert m["recipe"] == clf.recipe.to_dict() and m["input_size"] == 28 and m["explain"] is True
    assert m["metrics"]["training"]["epochs"] == 2 and m["model_card"].startswith("# se-cnn")
    assert m["limits"] == {"max_file_bytes": int(0.25 * 2**20), "max_files": 3, "max_pixels": 1_000_000,
                           "max_request_bytes": 2**20}


def test_predictions_equal_the_in_process_classifier(served, images):
    from bloodcell.inference import Classifier

    server, run = served[:2]
    got = post(server, [upload(p) for p in images[:3]], params={"top_k": 2})
    assert got.status_code == 200, got.text
    body = got.json()
    want = Classifier.from_run(run, device="cpu").predict_files(images[:3], top_k=2)
    assert body["count"] == body["classified"] == 3
    for i, (r, w) in enumerate(zip(body["results"], want)):
        assert r["index"] == i and r["filename"] == images[i].name and r["error"] is None
        assert [t["class"] for t in r["top"]] == [c for c, _ in w.top] and r["class"] == w.top[0][0]
        assert r["probability"] == pytest.approx(w.top[0][1], abs=1e-5)
        assert r["review"] == w.flags["review"] and r["status"] == w.flags["status"]


def test_bad_files_get_their_own_error_and_the_rest_are_classified(served, images):
    server = served[0]
    good = images[0].read_bytes()
    files = [("files", ("empty.jpg", b"", "image/jpeg")),
             ("files", ("truncated.jpg", good[: len(good) // 3], "image/jpeg")),
             ("files", ("notes.jpg", b"this is not an image at all", "image/jpeg"))]
    r = post(server, files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["error"] for x in results[:1]] == ["empty file (0 bytes)"]
    assert "cannot decode image" in results[1]["error"] or "truncated" in results[1]["error"].lower()
    assert results[2]["error"] == "not an image file PIL can read"
    assert all(x["class"] is None and x["top"] == [] for x in results)
    mixed = post(server, [files[2], upload(images[1])]).json()["results"]
    assert mixed[0]["error"] and mixed[1]["error"] is None and mixed[1]["class"]


def test_request_shape_errors(served, images):
    server = served[0]
    detail = assert_error(post(server, [("image", ("a.jpg", images[0].read_bytes(), "image/jpeg"))]), 422,
                          "missing_field")
    assert "'files'" in detail
    assert_error(httpx.post(server.url + "/v1/predict", headers=AUTH), 422, "missing_field")
    assert_error(httpx.post(server.url + "/v1/predict", headers=AUTH, json={"files": ["a.jpg"]}), 422,
                 "missing_field")
    bad = httpx.post(server.url + "/v1/predict", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=x"},
                     content=b"--y\r\ngarbage")
    assert bad.status_code in (400, 422) and set(bad.json()) == {"detail", "code"}
    assert_error(post(server, [upload(images[0])], params={"top_k": 0}), 422, "invalid")
    assert_error(httpx.get(server.url + "/v1/predict", headers=AUTH), 405, "method_not_allowed")


def test_limits_are_clear_413s(served, images):
    server = served[0]
    assert "over the limit of 3" in assert_error(post(server, [upload(p) for p in images[:4]]), 413,
                                                 "too_many_files")
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)  # ~480 KB as PNG: over 0.25 MB
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "PNG")
    detail = assert_error(post(server, [("files", ("noise.png", buf.getvalue(), "image/png"))]), 413, "file_too_large")
    assert "noise.png" in detail and "limit per file" in detail
    bomb = io.BytesIO()
    Image.new("L", (1100, 1100)).save(bomb, "PNG")  # 1.21 M pixels in a few KB
    assert len(bomb.getvalue()) < 20_000
    detail = assert_error(post(server, [("files", ("bomb.png", bomb.getvalue(), "image/png"))]), 413,
                          "too_many_pixels")
    assert "1,210,000 pixels" in detail
    big = b"x" * (2**20 + 10)
    assert_error(post(server, [("files", ("big.jpg", big, "image/jpeg"))]), 413, "request_too_large")

    def chunks():  # a valid multipart body with no Content-Length: it is counted as it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'
        for _ in range(20):
            yield b"y" * 100_000
        yield b"\r\n--b--\r\n"

    r = httpx.post(server.url + "/v1/predict", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"},
                   content=chunks(), timeout=30)
    assert_error(r, 413, "request_too_large")
    assert httpx.get(server.url + "/healthz").status_code == 200  # and the server is still fine


def test_client_file_names_are_never_paths(served, images, tmp_path):
    server = served[0]
    target = tmp_path / "escaped.jpg"
    name = "../" * 12 + str(target).lstrip("/")
    r = post(server, [upload(images[0], name), upload(images[1], "..\\..\\evil.jpg")])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["filename"] == "escaped.jpg" and results[1]["filename"] == "evil.jpg"
    assert all(x["class"] for x in results) and not target.exists()


def test_clean_name_keeps_only_a_printable_last_component():
    from bloodcell.serve.app import clean_name

    assert clean_name("a/b\\c\x00d\x1b.jpg") == "cd.jpg"
    assert clean_name("") == clean_name(None) == clean_name("../") == "upload"
    assert len(clean_name("x" * 1000)) == 200


def test_explain_returns_a_png_for_the_predicted_or_chosen_class(served, images):
    server = served[0]
    predicted = post(server, [upload(images[0])]).json()["results"][0]["class"]
    r = post(server, [("file", (images[0].name, images[0].read_bytes(), "image/jpeg"))], "/v1/explain")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert r.headers["x-bloodcell-class"] == predicted
    assert Image.open(io.BytesIO(r.content)).size[0] > 100
    m = httpx.get(server.url + "/v1/model", headers=AUTH).json()
    other = next(c for c in m["classes"] if c != predicted)
    r = post(server, [("file", ("x.jpg", images[0].read_bytes(), "image/jpeg"))], "/v1/explain",
             data={"class": other})
    assert r.status_code == 200 and r.headers["x-bloodcell-class"] == other
    assert "not one of the model's classes" in assert_error(
        post(server, [("file", ("x.jpg", images[0].read_bytes(), "image/jpeg"))], "/v1/explain",
             data={"class": "dragon"}), 422, "unknown_class")
    assert_error(post(server, [("file", ("x.jpg", b"nope", "image/jpeg"))], "/v1/explain"), 422, "bad_image")
    assert_error(post(server, [upload(images[0])], "/v1/explain"), 422, "missing_field")


def test_concurrent_requests_share_forward_passes(served, images):
    server = served[0]
    before = httpx.get(server.url + "/healthz").json()["inference"]
    n, barrier, codes = 16, threading.Barrier(16), []

    def one(i: int) -> None:
        barrier.wait()
        codes.append(post(server, [upload(images[i % len(images)])]).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(server.url + "/healthz").json()["inference"]
    assert codes == [200] * n
    assert after["images"] - before["images"] == n
    assert after["passes"] - before["passes"] < n  # some requests were merged into one pass
    assert after["largest_pass"] > 1


def test_cors_is_closed_by_default(served):
    server = served[0]
    r = httpx.options(server.url + "/v1/predict", headers={"Origin": "https://elsewhere.example",
                                                           "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/v1/model", headers={**AUTH, "Origin": "https://elsewhere.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_page_and_docs_are_served_without_a_network(served):
    server = served[0]
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "/static/app.js" in page.text and "http" not in page.text.split("<body>")[1]
    docs = httpx.get(server.url + "/docs").text
    assert "cdn" not in docs.lower() and "/static-offline-docs/swagger-ui-bundle.js" in docs
    assert httpx.get(server.url + "/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/predict", "/v1/explain", "/v1/model", "/healthz"} <= set(spec["paths"])


def test_a_bundle_is_served_with_onnx_runtime(served, images, monkeypatch):
    from bloodcell.deploy import export_bundle
    from bloodcell.inference import Classifier

    _, run, data, root = served
    bundle = root / "bundle"
    monkeypatch.setenv("BLOODCELL_DATA_DIR", str(data))
    export_bundle(run, bundle, parity_data="auto", log=lambda s: None)
    server = Server(bundle, data_dir=data)
    try:
        m = httpx.get(server.url + "/v1/model").json()
        assert m["kind"] == "bundle" and m["engine"] == "onnxruntime" and m["explain"] is False
        assert m["model_card"] == (bundle / "MODEL_CARD.md").read_text()
        body = post(server, [upload(p) for p in images[:3]], headers={}).json()
        want = Classifier.from_run(run, device="cpu", calibrated=False).predict_files(images[:3])
        assert [r["class"] for r in body["results"]] == [w.top[0][0] for w in want]
        for r, w in zip(body["results"], want):
            assert r["probability"] == pytest.approx(w.top[0][1], abs=1e-4)
        r = post(server, [("file", ("x.jpg", images[0].read_bytes(), "image/jpeg"))], "/v1/explain", headers={})
        assert "bundle" in assert_error(r, 501, "explain_unavailable")
    finally:
        server.stop()


def test_a_bundle_without_the_runtime_is_refused_in_one_line(tmp_path, monkeypatch):
    from bloodcell.errors import BloodcellError
    from bloodcell.serve import load_served

    (tmp_path / "bundle.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "bloodcell.runtime", None)
    with pytest.raises(BloodcellError, match="torch-free runtime is not available") as e:
        load_served(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(BloodcellError, match="no such run folder"):
        load_served(tmp_path / "missing")


def test_command_line_errors_are_one_line(tmp_path, capsys):
    from bloodcell.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--port", "1"]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--token", "short"]) == 2
    assert "at least 8 characters" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for opt in ("--host", "--port", "--token", "--max-files", "--max-pixels", "--cors-origin"):
        assert opt in out
