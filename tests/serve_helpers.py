"""Starting a real ``bloodcell serve`` process on a free localhost port, for the API and browser tests."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from conftest import PBC, synthetic_arrays, synthetic_cell
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m bloodcell serve TARGET --port P ARGS``; stopped (by its own process object) on ``stop``."""

    def __init__(self, target: Path, *args: str, data_dir: Path | None = None, timeout: float = 90):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "BLOODCELL_DATA_DIR": str(data_dir or os.environ.get("BLOODCELL_DATA_DIR", ""))}
        env.pop("BLOODCELL_TOKEN", None)
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen([sys.executable, "-m", "bloodcell", "serve", str(target), "--port",
                                      str(self.port), "--threads", "1", "--device", "cpu", "--log-level", "warning",
                                      *args], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not answer /healthz within {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def make_run(root: Path) -> tuple[Path, Path]:
    """A tiny SE-CNN run (2 epochs on synthetic 28 px images, 8 classes) and its dataset folder."""
    from bloodcell.data.sources import prepare_from_npz
    from bloodcell.training import TrainConfig, train

    data = root / "datasets"
    npz = root / "bloodmnist.npz"
    np.savez(npz, **synthetic_arrays({"train": 12, "val": 4, "test": 4}, size=28))
    prepare_from_npz(npz, root=data)
    out = root / "run"
    train(TrainConfig(model="se-cnn", data="bloodmnist", size=28, epochs=2, batch_size=32, threads=1,
                      data_dir=str(data)), out, log=lambda s: None)
    return out, data


def cell_images(folder: Path, n: int) -> list[Path]:
    """``n`` real PBC JPEGs (one class after another) when the data is there, else synthetic cell JPEGs."""
    if (PBC / "split.csv").is_file():
        with open(PBC / "split.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
        per: dict[str, list[Path]] = {}
        for r in rows:
            per.setdefault(r["label"], []).append(PBC / r["path"])
        picked = [files[i] for i in range(n) for files in per.values() if i < len(files)]
        return picked[:n]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = folder / f"cell_{i:03d}.jpg"
        Image.fromarray(synthetic_cell(i % 3, rng, size=120)).save(path, quality=90)
        out.append(path)
    return out
