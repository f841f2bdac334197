"""Datasets larger than memory: the shards layout holds exactly the npz's images, is written in bounded memory,
trains to exactly the npz run's result, and a damaged shard is a one-line error naming the file."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import real_subset_split, synthetic_arrays, synthetic_cell
from PIL import Image
from safetensors.torch import load_file

from bloodcell.cli import main
from bloodcell.data.shards import MANIFEST, ShardedArray, load_shards, shards_folder
from bloodcell.data.sources import prepare_from_folder, prepare_from_npz
from bloodcell.data.store import SPLITS, list_datasets, load_dataset
from bloodcell.data.tensors import ShardedImages, to_uint8_nchw
from bloodcell.errors import BloodcellError
from bloodcell.training import TrainConfig, train

FAST = dict(model="se-cnn", size=28, batch_size=32, threads=1)


def history(run):
    with open(run / "history.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("seconds", "load")} for r in csv.DictReader(f)]


def same_weights(a, b) -> bool:
    wa, wb = load_file(a / "last.safetensors"), load_file(b / "last.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


LAYOUT_KEYS = ("decode_seconds", "layout", "shards", "json", "npz", "shards_path")  # timing, and where it went


def comparable(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in LAYOUT_KEYS}


@pytest.fixture
def both_layouts(tmp_path):
    """The same 8-class set prepared twice from one npz: 'mem' as an npz, 'disk' as shards of 10 images (so
    batches and validation chunks span several shards)."""
    path = tmp_path / "cells.npz"
    np.savez(path, **synthetic_arrays({"train": 12, "val": 4, "test": 4}, size=28))
    prepare_from_npz(path, name="mem")
    prepare_from_npz(path, name="disk", layout="shards", shard_images=10)
    return "mem", "disk"


# ------------------------------------------------------------------ preparing
@pytest.mark.parametrize("how", ["stratified", "split file and corrections"])
def test_shards_from_a_folder_hold_exactly_the_npz_images(image_tree, tmp_path, how):
    """Decoded 7 files at a time into shards of 5: same images, labels, order and metadata as the npz, with an
    undecodable file skipped (stratified) or a reviewed correction applied (split file)."""
    kw = dict(size=28, crop=80, progress=False, workers=1)
    (image_tree / "beta" / "broken.jpg").write_bytes(b"not a jpeg")
    if how != "stratified":
        rows = [(f"{c}/{c}_{i:03d}.{'png' if i % 4 == 0 else 'jpg'}", k, "train" if i < 14 else "val" if i < 16
                 else "test") for k, c in enumerate(["alpha", "beta", "gamma"]) for i in range(20)]
        split = tmp_path / "split.csv"
        split.write_text("path,label,split\n" + "".join(f"{p},{k},{s}\n" for p, k, s in rows))
        fix = tmp_path / "review.csv"
        fix.write_text(f"path,action,new_label\n{rows[0][0]},relabel,gamma\n{rows[1][0]},drop,\n")
        kw.update(split_file=split, corrections=fix)
    mem = prepare_from_folder(image_tree, root=tmp_path / "a", **kw)
    old = os.umask(0o027)
    try:
        disk = prepare_from_folder(image_tree, root=tmp_path / "b", layout="shards", shard_images=5, chunk_images=7,
                                   **kw)
    finally:
        os.umask(old)
    assert not disk["reused"] and disk["layout"] == "shards" and comparable(disk) == comparable(mem)
    a, b = load_dataset("cells", 28, tmp_path / "a"), load_dataset("cells", 28, tmp_path / "b")
    assert isinstance(b.images["train"], ShardedArray) and b.path == shards_folder("cells", 28, tmp_path / "b")
    for s in SPLITS:
        assert np.array_equal(np.asarray(b.images[s]), a.images[s]) and np.array_equal(b.labels[s], a.labels[s])
    assert len(b.images["train"].files) == -(-len(a.labels["train"]) // 5) > 1  # several shards of 5
    assert b.class_names == a.class_names and comparable(b.meta) == comparable(a.meta)
    folder = shards_folder("cells", 28, tmp_path / "b")
    modes = {oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir()}
    assert modes == {"0o640"}, modes  # the umask's mode, not mkstemp's 0600
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # staging folder removed
    if how == "stratified":
        assert [s["path"] for s in disk["skipped"]] == ["beta/broken.jpg"]
    else:
        assert disk["corrections"]["relabelled"] == 1 and disk["corrections"]["dropped"] == 1


def test_shards_of_real_pbc_images_equal_the_npz(pbc, tmp_path):
    split = real_subset_split(pbc, tmp_path / "subset.csv", {"train": 6, "val": 2, "test": 2})
    kw = dict(size=64, split_file=split, name="pbc", progress=False, workers=1)
    prepare_from_folder(pbc, root=tmp_path / "a", **kw)
    prepare_from_folder(pbc, root=tmp_path / "b", layout="shards", shard_images=20, chunk_images=25, **kw)
    a, b = load_dataset("pbc", 64, tmp_path / "a"), load_dataset("pbc", 64, tmp_path / "b")
    assert isinstance(b.images["test"], ShardedArray) and len(b.labels["train"]) == 48
    for s in SPLITS:
        assert np.array_equal(np.asarray(b.images[s]), a.images[s]) and np.array_equal(b.labels[s], a.labels[s])
    assert comparable(b.meta) == comparable(a.meta)


def test_the_cache_is_reused_per_layout_and_the_json_says_which_one_to_load(image_tree, tmp_path):
    kw = dict(size=28, progress=False, workers=1)
    assert not prepare_from_folder(image_tree, layout="shards", **kw)["reused"]
    assert prepare_from_folder(image_tree, layout="shards", **kw)["reused"]
    assert isinstance(load_dataset("cells", 28).images["train"], ShardedArray)
    assert [d["path"] for d in list_datasets()] == [str(shards_folder("cells", 28))]
    assert not prepare_from_folder(image_tree, **kw)["reused"]  # no npz yet: made now
    assert isinstance(load_dataset("cells", 28).images["train"], np.ndarray)
    again = prepare_from_folder(image_tree, layout="shards", **kw)  # shards still up to date: the JSON switches
    assert again["reused"] and isinstance(load_dataset("cells", 28).images["train"], ShardedArray)
    folder = shards_folder("cells", 28)
    assert isinstance(load_shards(folder).images["val"], ShardedArray)
    assert len(load_dataset(str(folder)).labels["train"]) == 42  # a shards folder given by its path
    files = {p.name for p in folder.iterdir()}
    prepare_from_folder(image_tree, layout="shards", force=True, **kw)
    assert not files & {p.name for p in folder.iterdir()} - {MANIFEST}  # the old build's files are gone


def test_preparing_shards_holds_a_chunk_in_memory_not_the_dataset(tmp_path):
    """384 images of 64 px (4.7 MB of pixels), decoded 16 at a time into shards of 16: the peak of traced
    allocations (a few chunks: decoded images, a shard buffer) stays under a third of the dataset, while the npz
    layout's peak, which holds it all, exceeds it (so the measurement would see a dataset loaded whole)."""
    rng = np.random.default_rng(0)
    src = tmp_path / "big"
    for c, name in enumerate(["alpha", "beta"]):
        (src / name).mkdir(parents=True)
        for i in range(192):
            Image.fromarray(synthetic_cell(c, rng, size=64)).save(src / name / f"{i:03d}.png")
    pixels = 384 * 64 * 64 * 3
    kw = dict(size=64, crop=64, progress=False, workers=1)

    def peak(**extra) -> int:
        tracemalloc.start()
        try:
            prepare_from_folder(src, force=True, **kw, **extra)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    in_memory = peak()  # first: it also imports what both paths use (the split's sklearn), outside the next peak
    sharded = peak(layout="shards", shard_images=16, chunk_images=16)
    assert in_memory > pixels, (in_memory, pixels)
    assert sharded < pixels / 3, (sharded, pixels)
    d = load_dataset("big", 64)
    assert isinstance(d.images["train"], ShardedArray) and sum(len(d.labels[s]) for s in SPLITS) == 384


# ------------------------------------------------------------------ reading
def test_sharded_arrays_read_only_the_rows_asked_for_in_the_order_asked(both_layouts):
    mem, disk = (load_dataset(n, 28) for n in both_layouts)
    x, lazy = mem.images["train"], disk.images["train"]
    assert len(lazy) == 96 and lazy.shape == x.shape and len(lazy.files) == 10
    idx = np.array([95, 3, 41, 3, 0, 57, -1])  # unsorted, a repeat, a negative
    assert np.array_equal(lazy[idx], x[idx]) and np.array_equal(lazy[10:25], x[10:25])
    even = x.sum((1, 2, 3)) % 2 == 0
    assert np.array_equal(lazy[7], x[7]) and np.array_equal(lazy[even], x[even])
    sub = lazy.select([50, 2, 71])
    assert np.array_equal(np.asarray(sub), x[[50, 2, 71]]) and np.array_equal(sub[[2, 0]], x[[71, 50]])
    with pytest.raises(IndexError):
        lazy[[96]]

    class Untouchable:
        def __getitem__(self, key):
            raise AssertionError("a shard holding none of the rows asked for was read")

        def __len__(self):
            return 10

    lazy.shards[3:] = [Untouchable()] * 7  # rows 30..95
    assert np.array_equal(lazy[[29, 0, 15]], x[[29, 0, 15]])
    images = ShardedImages(disk.images["val"])
    t = torch.tensor([31, 0, 5])
    assert images.shape == (32, 3, 28, 28) and images[t].dtype == torch.uint8
    assert torch.equal(images[t], to_uint8_nchw(mem.images["val"])[t])
    assert torch.equal(images[4:9], to_uint8_nchw(mem.images["val"])[4:9])


# ------------------------------------------------------------------ training and evaluating
def test_training_on_shards_gives_exactly_the_npz_result(both_layouts, tmp_path, monkeypatch):
    from bloodcell.evaluation.evaluate import evaluate
    from bloodcell.inference import Classifier
    from bloodcell.training import prefetch

    mem, disk = both_layouts
    taken = []
    real_take = prefetch.Prefetcher.take
    monkeypatch.setattr(prefetch.Prefetcher, "take", lambda self, idx: taken.append(len(idx)) or real_take(self, idx))
    for name in both_layouts:
        train(TrainConfig(**FAST, data=name, epochs=2, augment="dihedral", train_limit=80), tmp_path / name,
              log=lambda s: None)
    assert taken == [32, 32, 16] * 2  # the shards run read its batches through the prefetcher, the npz run not
    assert history(tmp_path / mem) == history(tmp_path / disk) and len(history(tmp_path / disk)) == 2
    assert same_weights(tmp_path / mem, tmp_path / disk)
    clf = Classifier.from_run(tmp_path / disk)
    m_mem = evaluate(clf, load_dataset(mem, 28).images["test"], load_dataset(mem, 28).labels["test"])
    m_disk = evaluate(clf, load_dataset(disk, 28).images["test"], load_dataset(disk, 28).labels["test"])
    assert m_disk["accuracy"] == m_mem["accuracy"] and m_disk["confusion_matrix"] == m_mem["confusion_matrix"]


def test_a_run_on_shards_stopped_inside_an_epoch_resumes_to_the_npz_result(both_layouts, tmp_path, monkeypatch):
    """The prefetcher starts where the stopped epoch left off, so the resumed run still equals the npz run."""
    from bloodcell.training import loop

    mem, disk = both_layouts
    cfg = dict(**FAST, epochs=2, augment="flip")
    train(TrainConfig(**cfg, data=mem), tmp_path / "straight", log=lambda s: None)
    real_save, saves = loop.save_state, []

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(1)
        if len(saves) == 2:  # inside epoch 1, after 64 of 96 images
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**cfg, data=disk), tmp_path / "cut", log=lambda s: None, save_every=0)
    monkeypatch.setattr(loop, "save_state", real_save)
    train(TrainConfig(**cfg, data=disk), tmp_path / "cut", resume=True, log=lambda s: None)
    assert history(tmp_path / "cut") == history(tmp_path / "straight")
    assert same_weights(tmp_path / "cut", tmp_path / "straight")


def test_two_processes_on_shards_give_exactly_the_npz_result(both_layouts, tmp_path):
    """torchrun with 2 CPU processes: each rank reads its half of every batch from the shards."""
    for name in both_layouts:
        p = subprocess.run([sys.executable, "-m", "bloodcell", "train", "--data", name, "--size", "28", "--epochs",
                            "2", "--batch-size", "32", "--augment", "dihedral", "--nproc", "2", "--out",
                            str(tmp_path / name)], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    assert history(tmp_path / "mem") == history(tmp_path / "disk") and len(history(tmp_path / "disk")) == 2
    assert same_weights(tmp_path / "mem", tmp_path / "disk")


def test_training_data_on_shards_stays_on_disk(both_layouts):
    from bloodcell.training import loop

    cfg = TrainConfig(**FAST, data="disk", epochs=1, train_limit=40, normalize=True)
    td = loop.prepare_training_data(cfg, load_dataset("disk", 28), torch.device("cpu"))
    ref = loop.prepare_training_data(TrainConfig(**{**cfg.to_dict(), "data": "mem"}), load_dataset("mem", 28),
                                     torch.device("cpu"))
    assert isinstance(td.x_train, ShardedImages) and isinstance(td.x_val, ShardedImages)
    assert td.x_train.shape == ref.x_train.shape and torch.equal(td.y_train, ref.y_train)
    assert torch.equal(td.x_train[torch.arange(len(td.x_train))], ref.x_train)  # the same stratified subset
    assert td.normalization["mean"] == pytest.approx(ref.normalization["mean"], abs=1e-6)
    assert td.normalization["std"] == pytest.approx(ref.normalization["std"], abs=1e-6)


# ------------------------------------------------------------------ damaged shards
def _damage(folder, how: str) -> str:
    """Damage one training shard; the file the error must name."""
    manifest = json.loads((folder / MANIFEST).read_text())
    shard = folder / manifest["splits"]["train"]["shards"][1]["file"]
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "garbage":
        shard.write_bytes(b"\x00garbage" * 100)
    elif how == "missing":
        shard.unlink()
    elif how == "wrong shape":
        np.save(shard, np.zeros((10, 28, 28), np.uint8))
    elif how == "labels":
        labels = folder / manifest["splits"]["val"]["labels"]
        labels.write_bytes(labels.read_bytes()[:20])
        return str(labels)
    else:
        (folder / MANIFEST).write_text("{not json")
        return str(folder / MANIFEST)
    return str(shard)


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing", "wrong shape", "labels", "manifest"])
def test_a_damaged_shard_is_a_one_line_error_naming_the_file(both_layouts, tmp_path, capsys, how):
    named = _damage(shards_folder("disk", 28), how)
    with pytest.raises(BloodcellError) as e:
        load_dataset("disk", 28)
    assert named in str(e.value) and "\n" not in str(e.value)
    rc = main(["train", "--data", "disk", "--size", "28", "--epochs", "1", "--threads", "1",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and named in err, err


# ------------------------------------------------------------------ command line
def test_the_layout_option_is_on_the_command_line(image_tree, capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    out = capsys.readouterr().out
    assert "--layout {npz,shards}" in out and "--shard-images" in out and "--chunk-images" in out
    assert main(["data", "prepare", "--source", str(image_tree), "--size", "28", "--layout", "shards",
                 "--shard-images", "8", "--workers", "1"]) == 0
    assert str(shards_folder("cells", 28)) in capsys.readouterr().out
    assert main(["data", "list"]) == 0 and str(shards_folder("cells", 28)) in capsys.readouterr().out
    assert main(["data", "prepare", "--source", str(image_tree), "--shard-images", "8"]) == 2
    assert "--layout shards" in capsys.readouterr().err
