"""Data-parallel training with 2 CPU processes (torchrun, gloo): completes, is repeatable with its seed, resumes
exactly after a kill, and learns as well as one process on a small real subset."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import real_subset_split, synthetic_arrays
from safetensors.torch import load_file

from bloodcell.data.sources import prepare_from_npz
from bloodcell.training import TrainConfig, train


def history(run):
    with open(run / "history.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("seconds", "load")} for r in csv.DictReader(f)]


def weights(run):
    return load_file(run / "last.safetensors")


def cmd(data: str, out, *extra, size: int = 28, epochs: int = 3) -> list[str]:
    return [sys.executable, "-m", "bloodcell", "train", "--data", data, "--size", str(size), "--epochs", str(epochs),
            "--batch-size", "32", "--nproc", "2", "--out", str(out), *extra]


def run_ok(args: list[str]) -> None:
    p = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[:3000] + "\n...\n" + p.stderr[-5000:]


@pytest.fixture
def npz(tmp_path):
    path = tmp_path / "cells.npz"
    np.savez(path, **synthetic_arrays({"train": 30, "val": 6, "test": 6}, size=28))  # 240 training images
    prepare_from_npz(path, name="cells")
    return "cells"


def test_two_processes_complete_repeatably_and_resume_exactly_after_a_kill(npz, tmp_path):
    a, b, cut = tmp_path / "a", tmp_path / "b", tmp_path / "cut"
    run_ok(cmd(npz, a))
    run_ok(cmd(npz, b))
    assert len(history(a)) == 3 and history(a) == history(b)  # repeatable with its seed
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    summary = json.loads((a / "metrics.json").read_text())["training"]
    assert summary["processes"] == 2 and summary["train_images"] == 240
    assert sorted(p.name for p in a.iterdir() if not p.name.startswith(".")) == sorted(
        ["config.json", "history.csv", "metrics.json", "best.safetensors", "last.safetensors", "state.pt"])

    proc = subprocess.Popen(cmd(npz, cut, epochs=3), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (cut / "history.csv").is_file():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, no chance to clean up
    proc.wait()
    done = len(history(cut)) if (cut / "history.csv").is_file() else 0
    assert done < 3, "the run should have been killed part-way"
    run_ok(cmd(npz, cut, "--resume"))
    assert history(cut) == history(a)
    wc = weights(cut)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


def test_two_processes_with_every_recipe_option_are_repeatable(npz, tmp_path):
    """Warm-up, EMA, cutmix, colour and scale jitter under DDP: each process mixes within its share of the batch
    from the shared seeded generator, so two runs with one seed train the same weights."""
    extra = ("--warmup-epochs", "1", "--ema", "0.9", "--mix", "cutmix", "--color-jitter", "0.5", "--scale-jitter",
             "0.1", "--label-smoothing", "0.1", "--optimizer", "adamw", "--weight-decay", "0.05")
    a, b = tmp_path / "a", tmp_path / "b"
    run_ok(cmd(npz, a, *extra, epochs=2))
    run_ok(cmd(npz, b, *extra, epochs=2))
    assert len(history(a)) == 2 and history(a) == history(b)
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    cfg = json.loads((a / "config.json").read_text())
    assert (cfg["mix"], cfg["ema"], cfg["warmup_epochs"]) == ("cutmix", 0.9, 1)


def test_two_processes_learn_like_one_on_real_images(pbc, tmp_path):
    split = real_subset_split(pbc, tmp_path / "subset.csv", {"train": 60, "val": 20, "test": 5})
    from bloodcell.data.sources import prepare_from_folder

    prepare_from_folder(pbc, size=28, crop=200, split_file=split, name="pbc28", progress=False)
    one = tmp_path / "one"
    cfg = TrainConfig(model="se-cnn", data="pbc28", size=28, epochs=4, batch_size=32, threads=1,
                      model_args={"bn_momentum": 0.1})
    train(cfg, one, log=lambda s: None)
    two = tmp_path / "two"
    run_ok(cmd("pbc28", two, "--model-arg", "bn_momentum=0.1", epochs=4))
    acc_one = float(history(one)[-1]["val_acc"])
    acc_two = float(history(two)[-1]["val_acc"])
    assert acc_one > 0.5 and acc_two > 0.5, (acc_one, acc_two)  # both learned (chance is 0.125)
    assert abs(acc_one - acc_two) < 0.1, (acc_one, acc_two)  # within the noise of 160 validation images


def test_sync_bn_on_cpu_is_a_clear_error(npz, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can run SyncBatchNorm")
    p = subprocess.run(cmd(npz, tmp_path / "s", "--sync-bn", epochs=1), capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["bloodcell: error: --sync-bn needs CUDA devices (PyTorch's SyncBatchNorm "
                                             "has no CPU kernel); without it each process keeps its own BatchNorm "
                                             "statistics"]
