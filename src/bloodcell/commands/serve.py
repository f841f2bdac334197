"""``bloodcell serve``: the REST API and web page over a run folder or bundle (imports FastAPI only when run)."""

from __future__ import annotations

import argparse
import os
import sys

from bloodcell.commands.common import add_checkpoint_arg, add_device_arg, positive_float, positive_int
from bloodcell.errors import BloodcellError

TOKEN_ENV = "BLOODCELL_TOKEN"


MALLOC_TUNING_ENV = "BLOODCELL_MALLOC_TUNING"  # "0": leave glibc's malloc as it is (to measure the difference)


def tune_malloc(arenas: int = 2, mmap_threshold: int = 256 * 1024) -> None:
    """Keep a long-running server's memory flat (benchmarks/serve_load.py measures it) by two glibc settings,
    each unless the user set its MALLOC_* variable: at most ``arenas`` malloc arenas (each request thread would
    otherwise grow one of its own), and a fixed mmap threshold, so every buffer above it (decoded images, batch
    tensors) is mapped for its own and returned to the system when freed; glibc's default raises the threshold
    as large buffers are freed, after which they stay in the heap as fragments the process keeps."""
    if not sys.platform.startswith("linux") or os.environ.get(MALLOC_TUNING_ENV) == "0":
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return  # not glibc (e.g. musl): nothing to tune
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(-8, arenas)  # M_ARENA_MAX
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD


def cmd_serve(a: argparse.Namespace) -> int:
    tune_malloc()
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise BloodcellError(f"'bloodcell serve' needs the serve extra: pip install 'bloodcell[serve]' ({e})") from None
    from bloodcell.data.images import set_max_pixels

    token = a.token if a.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and len(token) < 8:
        raise BloodcellError("--token must be at least 8 characters (use a random one, e.g. from "
                             "'python -c \"import secrets; print(secrets.token_urlsafe())\"')")
    if a.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"bloodcell serve: warning: listening on {a.host} without --token: anyone who reaches this port can "
              "use the model", file=sys.stderr)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    set_max_pixels(a.max_pixels)
    from bloodcell.serve import Limits, ServeConfig, create_app, load_served

    limits = Limits(max_file_bytes=int(a.max_file_mb * 2**20), max_files=a.max_files, max_pixels=a.max_pixels,
                    max_request_bytes=int(a.max_request_mb * 2**20))
    served = load_served(a.target, a.checkpoint, device=a.device)
    app = create_app(served, ServeConfig(token=token, limits=limits, cors_origins=a.cors_origin or [],
                                         max_batch=a.max_batch))
    import uvicorn

    print(f"bloodcell serve: {served.info.get('name')} ({served.kind}, {served.engine}) on http://"
          f"{'[' + a.host + ']' if ':' in a.host else a.host}:{a.port}/ (API docs at /docs)"
          f"{'; token required' if token else ''}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, server_header=False, date_header=False,
                limit_concurrency=a.max_connections, timeout_keep_alive=5)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a run or bundle over HTTP: REST API under /v1 and a web page",
                       description="Serve a trained run folder (PyTorch, with Grad-CAM) or an exported bundle (ONNX "
                       "Runtime) over HTTP: POST /v1/predict, POST /v1/explain, GET /v1/model, GET /healthz, the API "
                       "docs at /docs and a web page at /. Binds to localhost unless --host is given. See "
                       "docs/serve.md.")
    p.add_argument("target", metavar="RUN_OR_BUNDLE", help="a run folder, a .safetensors file, or a bundle folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=positive_int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--token", default=None, help=f"require 'Authorization: Bearer TOKEN' on every /v1 call "
                   f"(default: ${TOKEN_ENV} when set, else no token)")
    p.add_argument("--max-file-mb", type=positive_float, default=10.0, help="bytes per file (default: %(default)s MB)")
    p.add_argument("--max-files", type=positive_int, default=64, help="files per request (default: %(default)s)")
    p.add_argument("--max-pixels", type=positive_int, default=25_000_000,
                   help="pixels per image, against decompression bombs (default: %(default)s)")
    p.add_argument("--max-request-mb", type=positive_float, default=128.0,
                   help="bytes per request body (default: %(default)s MB)")
    p.add_argument("--max-batch", type=positive_int, default=64,
                   help="images merged from concurrent requests into one forward pass (default: %(default)s)")
    p.add_argument("--max-connections", type=positive_int, default=256,
                   help="concurrent connections before new ones get 503 (default: %(default)s)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. https://lab.example.org) to call the API; repeatable "
                   "(default: none, CORS closed)")
    p.add_argument("--threads", type=positive_int, default=None, help="PyTorch CPU threads (default: all cores)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                   help="uvicorn's log level (default: %(default)s)")
    add_checkpoint_arg(p)
    add_device_arg(p)
    p.set_defaults(func=cmd_serve)
