"""Load test of ``bloodcell serve``: 32 concurrent clients against a real server process on localhost.

Two modes, each bounded by a request count and a time limit: one image per request, and ``--batch`` images per
request; then the one-image mode again, to see whether memory still grows once the server is warm. Per mode:
requests/s, images/s, p50/p95/p99 latency per request, errors (non-200 answers and per-file errors; target 0),
the server's forward passes (how many images the batching queue merged into one pass), and the server's resident
memory (VmRSS of its process) before and after the mode, after a warm-up of every mode (target: no growth beyond
a few MB once warm). Client and server share the machine's cores, so the figures are a lower bound for a server
with the CPU to itself.

Usage (from the project root):
    python benchmarks/serve_load.py /tmp/serve-run --images /work/shared/data/pbc
    python benchmarks/serve_load.py RUN_OR_BUNDLE --requests 300 --time-limit 30 --out /tmp/serve-load

Writes serve_load.md and serve_load.json into --out (default benchmarks/results/serve/).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from bloodcell.io import markdown_table, write_json, write_text
from bloodcell.machine import cpu_name, machine_load

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def test_images(root: Path, n: int) -> list[tuple[str, bytes]]:
    """``n`` test-split images of the PBC folder (split.csv), class after class, as (name, bytes)."""
    with open(root / "split.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    rows.sort(key=lambda r: (int(r["label"]), r["path"]))
    step = max(1, len(rows) // n)
    return [(Path(r["path"]).name, (root / r["path"]).read_bytes()) for r in rows[::step][:n]]


def start_server(target: Path, port: int, threads: int | None, max_batch: int,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bloodcell", "serve", str(target), "--port", str(port), "--log-level", "warning",
           "--max-batch", str(max_batch), "--device", "cpu", *(["--threads", str(threads)] if threads else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not answer /healthz within 120 s")


async def load(url: str, images: list[tuple[str, bytes]], per_request: int, requests: int, clients: int,
               time_limit: float) -> dict:
    """``clients`` tasks sending requests until ``requests`` were sent or ``time_limit`` seconds passed."""
    latencies: list[float] = []
    errors = {"http": 0, "files": 0, "transport": 0}
    sent = 0
    lock = asyncio.Lock()
    start = time.perf_counter()

    async def client(c: httpx.AsyncClient, k: int) -> None:
        nonlocal sent
        while True:
            async with lock:
                if sent >= requests or time.perf_counter() - start > time_limit:
                    return
                i = sent
                sent += 1
            files = [("files", images[(i * per_request + j) % len(images)]) for j in range(per_request)]
            files = [(f, (name, data, "image/jpeg")) for f, (name, data) in files]
            t0 = time.perf_counter()
            try:
                r = await c.post(url + "/v1/predict", files=files, params={"top_k": 3})
            except httpx.TransportError:
                errors["transport"] += 1
                continue
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors["http"] += 1
            else:
                errors["files"] += sum(x["error"] is not None for x in r.json()["results"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as c:
        await asyncio.gather(*(client(c, k) for k in range(clients)))
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    done = len(latencies)
    return {"requests": done, "images_per_request": per_request, "images": done * per_request,
            "seconds": round(wall, 2), "requests_per_s": round(done / wall, 1),
            "images_per_s": round(done * per_request / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if done else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 1) if done else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if done else None,
            "errors": errors, "error_total": sum(errors.values()), "hit_time_limit": done < requests}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", type=Path, help="run folder or bundle to serve")
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "pbc",
                    help="PBC folder with split.csv (default: %(default)s)")
    ap.add_argument("--distinct", type=int, default=256, help="distinct test images cycled through")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2000, help="requests of one image")
    ap.add_argument("--batch", type=int, default=16, help="images per request in the batched mode")
    ap.add_argument("--batched-requests", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=300, help="requests per mode before measuring")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per mode at most")
    ap.add_argument("--threads", type=int, default=None, help="server's PyTorch threads (default: all cores)")
    ap.add_argument("--max-batch", type=int, default=64, help="server's --max-batch")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable for the server, e.g. BLOODCELL_MALLOC_TUNING=0 to measure it "
                         "with glibc's malloc untuned (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve")
    a = ap.parse_args(argv)
    images = test_images(a.images, a.distinct)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    load_before = machine_load()
    env = dict(kv.split("=", 1) for kv in a.server_env)
    proc = start_server(a.target, port, a.threads, a.max_batch, env)
    try:
        cold = rss_mb(proc.pid)
        for per in (1, a.batch):
            asyncio.run(load(url, images, per, a.warmup, a.clients, a.time_limit))
        modes = {}
        for name, per, n in (("single", 1, a.requests), ("batched", a.batch, a.batched_requests),
                             ("single again", 1, a.requests)):
            before = rss_mb(proc.pid)
            stats0 = httpx.get(url + "/healthz").json()["inference"]
            m = asyncio.run(load(url, images, per, n, a.clients, a.time_limit))
            stats1 = httpx.get(url + "/healthz").json()["inference"]
            passes = stats1["passes"] - stats0["passes"]
            m.update({"rss_before_mb": round(before, 1), "rss_after_mb": round(rss_mb(proc.pid), 1),
                      "forward_passes": passes,
                      "images_per_pass": round((stats1["images"] - stats0["images"]) / max(1, passes), 1)})
            m["rss_growth_mb"] = round(m["rss_after_mb"] - m["rss_before_mb"], 1)
            modes[name] = m
            print(name, m, flush=True)
        final = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    result = {"command": "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__), *sys.argv[1:]]),
              "date_utc": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_1min_before": load_before,
                          "load_1min_after": machine_load()},
              "target": str(a.target), "clients": a.clients, "distinct_images": len(images),
              "server_threads": a.threads, "max_batch": a.max_batch, "server_env": env,
              "rss_cold_mb": round(cold, 1), "rss_final_mb": round(final, 1), "modes": modes}
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "serve_load.json", result)
    header = ["mode", "images/request", "requests", "requests/s", "images/s", "p50 ms", "p95 ms", "p99 ms",
              "errors", "images/forward pass", "RSS before MB", "RSS after MB", "growth MB"]
    rows = [[k, m["images_per_request"], m["requests"], m["requests_per_s"], m["images_per_s"], m["p50_ms"],
             m["p95_ms"], m["p99_ms"], m["error_total"], m["images_per_pass"], m["rss_before_mb"],
             m["rss_after_mb"], m["rss_growth_mb"]] for k, m in modes.items()]
    md = ["# bloodcell serve under load", "",
          f"`{result['command']}` on {result['machine']['cpu']} ({result['machine']['cores']} cores), "
          f"{result['date_utc']}; 1-minute load average {load_before} before, {result['machine']['load_1min_after']} "
          f"after. {a.clients} concurrent clients (httpx, same machine) sending real PBC test JPEGs "
          f"({len(images)} distinct) to `{a.target}` served on localhost"
          + (f", server environment {env}" if env else "") + ".", "",
          markdown_table(header, rows), "",
          f"Server memory (VmRSS): {result['rss_cold_mb']} MB after start, {result['rss_final_mb']} MB at the end. "
          "'images/forward pass' is how many images the batching queue merged into one pass on average.", ""]
    write_text(a.out / "serve_load.md", "\n".join(md))
    print(f"wrote {a.out / 'serve_load.md'} and serve_load.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
