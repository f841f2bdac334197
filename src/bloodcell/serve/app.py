"""The HTTP API and the page: FastAPI routes over the inference worker, with the limits and the token.

Every error is JSON ``{"detail": "<one line>", "code": "<stable code>"}`` with a 4xx status, or a 500 with no
trace (the trace goes to the server's log). Uploads are written to a private temporary folder under names the
server chooses (``0000.img``, ...); the client's file name is only echoed back, cleaned, as ``filename``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import shutil
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from bloodcell import __version__
from bloodcell.errors import BloodcellError, one_line
from bloodcell.serve.model import Served
from bloodcell.serve.worker import InferenceWorker

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("bloodcell.serve")
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                           "frame-ancestors 'none'; base-uri 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


@dataclass
class Limits:
    """The per-request guards; each refusal is a 413 naming the limit."""

    max_file_bytes: int = 10 * 2**20
    max_files: int = 64
    max_pixels: int = 25_000_000
    max_request_bytes: int = 128 * 2**20
    max_queue: int = 256  # jobs waiting for the model before new requests get 503

    def as_dict(self) -> dict:
        return {"max_file_bytes": self.max_file_bytes, "max_files": self.max_files, "max_pixels": self.max_pixels,
                "max_request_bytes": self.max_request_bytes}


@dataclass
class ServeConfig:
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    cors_origins: list[str] = field(default_factory=list)
    max_batch: int = 64
    io_threads: int = 4


class ApiError(Exception):
    """A refusal with its status, stable code and one-line message."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": one_line(message), "code": code}, status_code=status, headers=headers)


def clean_name(name: str | None) -> str:
    """The client's file name for display only: its last component, printable, at most 200 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:200] or "upload"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n:,} bytes"


class BodyLimit:
    """ASGI guard: a request body over ``limit`` bytes gets 413 before it is parsed (Content-Length or counted)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        message = f"request body over the {_mb(self.limit)} limit per request (--max-request-mb)"
        if length is not None:
            if not length.isdigit():
                return await error_response(400, "bad_content_length", "Content-Length is not a number")(
                    scope, receive, send)
            if int(length) > self.limit:
                return await error_response(413, "request_too_large", message)(scope, receive, send)
        state = {"seen": 0, "over": False}

        async def counted():
            msg = await receive()
            if msg["type"] == "http.request":
                state["seen"] += len(msg.get("body", b""))
                if state["seen"] > self.limit:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded(msg):
            if not state["over"]:
                await send(msg)

        await self.app(scope, counted, guarded)
        if state["over"]:
            await error_response(413, "request_too_large", message)(scope, receive, send)


def save_uploads(files: list[UploadFile], folder: Path, limits: Limits) -> list[Path]:
    """Write the uploads under server-chosen names, refusing a file over the byte or pixel limit (413)."""
    paths = []
    for i, up in enumerate(files):
        name = clean_name(up.filename)
        size = up.size if up.size is not None else None
        if size is not None and size > limits.max_file_bytes:
            raise ApiError(413, "file_too_large", f"file {i} '{name}' is {_mb(size)}, over the "
                           f"{_mb(limits.max_file_bytes)} limit per file (--max-file-mb)")
        dest = folder / f"{i:04d}.img"
        up.file.seek(0)
        with open(dest, "xb") as f:
            shutil.copyfileobj(up.file, f, 2**20)
        if dest.stat().st_size > limits.max_file_bytes:
            raise ApiError(413, "file_too_large", f"file {i} '{name}' is over the {_mb(limits.max_file_bytes)} "
                           "limit per file (--max-file-mb)")
        pixels = _pixels(dest)
        if pixels is not None and pixels > limits.max_pixels:
            raise ApiError(413, "too_many_pixels", f"file {i} '{name}' has {pixels:,} pixels, over the "
                           f"{limits.max_pixels:,} limit per image (--max-pixels; a decompression bomb?)")
        paths.append(dest)
    return paths


def _pixels(path: Path) -> int | None:
    """Width x height from the header alone (nothing decoded), or None when PIL cannot read it (the per-file
    decode then reports why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return im.width * im.height
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        return int(m.group(1)) if m else 2**62
    except Exception:  # noqa: BLE001 - not an image, truncated header: reported per file by the decoder
        return None


def result_json(i: int, name: str, r) -> dict:
    """One file's entry of ``/v1/predict`` (field names documented in docs/serve.md)."""
    flags = dict(r.flags or {})
    top = [{"class": c, "probability": p} for c, p in (r.top or [])]
    return {"index": i, "filename": name, "class": top[0]["class"] if top else None,
            "probability": top[0]["probability"] if top else None, "top": top,
            "status": flags.get("status"), "review": flags.get("review"),
            "out_of_distribution": flags.get("out_of_distribution"), "conformal_set": flags.get("conformal_set"),
            "warnings": list(r.warnings or []), "flags": flags, "error": r.error}


def create_app(served: Served, config: ServeConfig | None = None) -> FastAPI:
    """The API and the page for ``served``; the worker thread starts here and stops with the app."""
    config = config or ServeConfig()
    limits = config.limits
    predictor = served.predictor
    worker = InferenceWorker(predictor, max_batch=config.max_batch)
    # Saving uploads is short file I/O: a few threads do it, not anyio's 40, each of which would grow a malloc
    # arena of its own and the server's memory with it (benchmarks/serve_load.py).
    io_pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix="bloodcell-io")

    async def in_io_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(io_pool, fn, *args)
    state: dict = {"started": time.time(), "requests": 0}
    try:
        from fastapi_offline import FastAPIOffline as App  # Swagger UI's files from the package, no CDN
    except ImportError:  # pragma: no cover - the serve extra installs it
        App = FastAPI
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.close()
        io_pool.shutdown(wait=False)

    app = App(title="bloodcell", version=__version__, redoc_url=None, lifespan=lifespan,
              description="Classify microscope images of blood cells with a trained bloodcell model. Every error "
                          "is JSON {detail, code}.")
    app.state.worker = worker
    app.state.served = served
    bearer = HTTPBearer(auto_error=False, description="the server's --token (or $BLOODCELL_TOKEN)")
    auth = [Depends(bearer)] if config.token else []

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if config.token and path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), config.token.encode()):
                return error_response(401, "unauthorized", "this server needs its token: send the header "
                                      "'Authorization: Bearer TOKEN'" if not given else "wrong token",
                                      {"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        if path == "/" or path.startswith("/static/"):
            response.headers.update(PAGE_HEADERS)
        response.headers["Cache-Control"] = "no-store" if path.startswith("/v1/") else "no-cache"
        return response

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError):
        return error_response(e.status, e.code, e.message, e.headers)

    @app.exception_handler(BloodcellError)
    async def _bloodcell_error(_request: Request, e: BloodcellError):
        return error_response(422, "invalid", str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, e: RequestValidationError):
        errs = e.errors()
        missing = [x for x in errs if x.get("type") == "missing" and tuple(x.get("loc", ()))[:1] == ("body",)]
        if missing:
            field_name = missing[0]["loc"][-1]
            return error_response(422, "missing_field", f"no '{field_name}' in the multipart form: send the "
                                  f"image(s) as {field_name}=@cell.jpg (multipart/form-data)")
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error_response(422, "invalid", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, e: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        detail = e.detail if isinstance(e.detail, str) else "bad request"
        if e.status_code == 400 and "parsing the body" in detail:
            detail = "the body is not a valid multipart/form-data upload"
        return error_response(e.status_code, codes.get(e.status_code, "http_error"), detail, e.headers)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, e: Exception):
        log.error("internal error: %s", "".join(traceback.format_exception(e)))
        return error_response(500, "internal", "internal error; the server's log has the details")

    async def run_on_model(fut):
        return await asyncio.wrap_future(fut)

    def check_queue():
        if worker.jobs.qsize() >= limits.max_queue:
            raise ApiError(503, "busy", f"{worker.jobs.qsize()} requests are waiting for the model; retry shortly",
                           {"Retry-After": "1"})

    @app.get("/healthz", tags=["service"], summary="Liveness: the model is loaded and the worker runs")
    async def healthz() -> dict:
        return {"status": "ok", "model": served.info.get("name"), "engine": served.engine,
                "queued": worker.jobs.qsize(), "uptime_s": round(time.time() - state["started"], 1),
                "inference": dict(worker.stats)}

    @app.get("/v1/model", tags=["model"], dependencies=auth, summary="The served model: classes, recipe, metrics, card")
    async def model() -> dict:
        info = served.info
        return {"name": info.get("name"), "kind": served.kind, "engine": served.engine,
                "classes": list(predictor.class_names), "input_size": info.get("input_size"),
                "recipe": info.get("recipe"), "model_args": info.get("model_args"),
                "temperature": float(getattr(predictor, "temperature", 1.0) or 1.0),
                "calibrated": info.get("calibrated"), "metrics": info.get("metrics"),
                "model_card": info.get("model_card"), "source": info.get("source"),
                "explain": served.can_explain, "limits": limits.as_dict(), "bloodcell_version": __version__}

    @app.post("/v1/predict", tags=["predict"], dependencies=auth,
              summary="Classify one or many images (multipart field 'files')")
    async def predict(files: Annotated[list[UploadFile], File(description="one or more image files")],
                      top_k: Annotated[int, Query(ge=1, le=100, description="classes per file")] = 3) -> dict:
        if len(files) > limits.max_files:
            raise ApiError(413, "too_many_files", f"{len(files)} files in one request, over the limit of "
                           f"{limits.max_files} (--max-files); split them into several requests")
        check_queue()
        t0 = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="bloodcell-serve-"))
        try:
            paths = await in_io_thread(save_uploads, files, folder, limits)
            names = [clean_name(f.filename) for f in files]
            empty = {i for i, p in enumerate(paths) if p.stat().st_size == 0}
            todo = [p for i, p in enumerate(paths) if i not in empty]
            got = iter(await run_on_model(worker.predict(todo, top_k)) if todo else [])
            results = []
            for i, name in enumerate(names):
                if i in empty:
                    results.append({**result_json(i, name, _Empty()), "error": "empty file (0 bytes)"})
                else:
                    results.append(result_json(i, name, next(got)))
        finally:
            await in_io_thread(shutil.rmtree, folder, True)
        ok = sum(r["error"] is None for r in results)
        return {"model": served.info.get("name"), "count": len(results), "classified": ok,
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1), "results": results}

    @app.post("/v1/explain", tags=["explain"], dependencies=auth,
              summary="Grad-CAM overlay (PNG) of one image for the predicted or a chosen class",
              response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def explain(file: Annotated[UploadFile, File(description="one image file")],
                      class_name: Annotated[str | None, Form(alias="class", description="class to explain "
                                                                "(default: the predicted one)")] = None) -> Response:
        if not served.can_explain:
            if served.kind == "ensemble":
                raise ApiError(501, "explain_unavailable", "Grad-CAM explains one model; this server runs an "
                               "ensemble (serve one of its member runs to explain)")
            raise ApiError(501, "explain_unavailable", "Grad-CAM needs PyTorch and the run folder; this server "
                           "runs an exported bundle (serve the run folder to explain)")
        if class_name is not None and class_name not in predictor.class_names:
            raise ApiError(422, "unknown_class", f"class '{class_name}' is not one of the model's classes "
                           f"({', '.join(predictor.class_names)})")
        check_queue()
        folder = Path(tempfile.mkdtemp(prefix="bloodcell-explain-"))
        try:
            (path,) = await in_io_thread(save_uploads, [file], folder, limits)
            if path.stat().st_size == 0:
                raise ApiError(422, "bad_image", "empty file (0 bytes)")
            png, cls, prob = await run_on_model(worker.call(lambda: _gradcam_png(app, path, class_name, folder)))
        finally:
            await in_io_thread(shutil.rmtree, folder, True)
        return Response(png, media_type="image/png",
                        headers={"X-Bloodcell-Class": cls, "X-Bloodcell-Probability": f"{prob:.6f}"})

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _Empty:
    top, error, warnings, flags = None, "empty file (0 bytes)", [], {}


def _gradcam_png(app: FastAPI, path: Path, class_name: str | None, folder: Path) -> tuple[bytes, str, float]:
    """On the model's thread: the overlay of ``explain/figures.py`` for one uploaded image."""
    import numpy as np

    from bloodcell.data.images import ImageDecodeError
    from bloodcell.explain.figures import overlay_png
    from bloodcell.explain.gradcam import GradCam

    clf = app.state.served.predictor
    gc = getattr(app.state, "gradcam", None)
    if gc is None:
        gc = app.state.gradcam = GradCam(clf)
    try:
        arr, _ = clf.preprocess(path)
    except ImageDecodeError as e:
        raise ApiError(422, "bad_image", str(e)) from None
    target = None if class_name is None else np.array([gc.class_index(class_name)])
    maps, probs = gc.maps(arr[None], target)
    k = int(probs[0].argmax()) if class_name is None else gc.class_index(class_name)
    cls = clf.class_names[k]
    out = overlay_png(arr, maps[0], folder / "overlay.png", f"Grad-CAM for {cls} (p = {probs[0][k]:.3f})")
    return Path(out).read_bytes(), cls, float(probs[0][k])
