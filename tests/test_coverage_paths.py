"""Paths no other test drives: --normalize end to end, the augmentation symmetries, the optimizer options,
label smoothing, ``train --evaluate``, predicting from a bare weights file, the multi-process decode,
``bn_momentum`` across the registry, and the seed spread of the benchmark report.

Everything goes through the CLI or the stable entry points (``TrainConfig``/``train``, ``make_optimizer``,
``augment_batch``, ``decode_all``, ``Recipe``); expected values are computed here from the files a run
writes (safetensors tensors and metadata, the prepared npz), not with the package's own inference code.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_cell
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from bloodcell.cli import main
from bloodcell.data.recipe import Recipe
from bloodcell.data.sources import decode_all, prepare_from_npz
from bloodcell.data.tensors import augment_batch
from bloodcell.errors import BloodcellError
from bloodcell.evaluation.benchmark import METRICS, aggregate
from bloodcell.models import create_model, list_models
from bloodcell.training import TrainConfig, train

try:
    from bloodcell.training import make_optimizer
except ImportError:  # before the inference-core refactor it lives in the loop module
    from bloodcell.training.loop import make_optimizer

TRAIN_CLI = ["train", "--data", "bloodmnist", "--size", "28", "--batch-size", "32", "--threads", "1"]
QUIET = dict(log=lambda s: None)


@pytest.fixture
def prepared(tiny_npz) -> dict:
    """The tiny npz registered as 'bloodmnist' at 28 px; returns prepare's info (with the stored npz path)."""
    return prepare_from_npz(tiny_npz)


def weights_meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["bloodcell"])


def manual_probs(weights, images: np.ndarray, normalise: bool = True) -> np.ndarray:
    """Softmax of the model in ``weights`` on NxHxWx3 uint8 images: x/255, then (x - mean)/std if asked."""
    meta = weights_meta(weights)
    model = create_model(meta["model"], num_classes=len(meta["class_names"]), input_size=int(meta["input_size"]),
                         **meta.get("model_args", {}))
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
    if normalise and meta.get("normalization"):
        n = meta["normalization"]
        x = (x - torch.tensor(n["mean"]).view(1, -1, 1, 1)) / torch.tensor(n["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        return torch.softmax(model(x), 1).numpy()


def predict_json(capsys, tmp_path, source, paths, name="pred.json") -> list[dict]:
    out = tmp_path / name
    assert main(["predict", str(source), *map(str, paths), "--top-k", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def probs_by_class(entry: dict, class_names: list[str]) -> np.ndarray:
    d = {t["class"]: t["probability"] for t in entry["top"]}
    return np.array([d[c] for c in class_names])


def cell_png(path, label=2, seed=5, size=28):
    arr = synthetic_cell(label, np.random.default_rng(seed))
    arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC))
    Image.fromarray(arr).save(path)
    return arr


# ---------------------------------------------------------------- --normalize end to end
def test_normalize_stats_are_saved_and_reapplied_by_predict_evaluate_and_explain(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TRAIN_CLI, "--epochs", "2", "--augment", "none", "--normalize", "--out", str(run)]) == 0
    capsys.readouterr()
    weights = run / "best.safetensors"
    meta = weights_meta(weights)
    with np.load(prepared["npz"]) as z:
        train_x = z["train_images"].astype(np.float64) / 255
        test_x, test_y = z["test_images"], z["test_labels"].reshape(-1)
    norm = meta["normalization"]
    assert norm is not None, "a --normalize run must carry its channel statistics in the weights"
    # the training split's per-channel statistics (ddof 0 or 1 differ by < 2e-6 on 75,264 pixels per channel)
    assert np.allclose(norm["mean"], train_x.mean(axis=(0, 1, 2)), atol=1e-5, rtol=0)
    assert np.allclose(norm["std"], train_x.std(axis=(0, 1, 2)), atol=1e-5, rtol=0)

    # predict: the same probabilities as a hand-made (x/255 - mean)/std forward pass, not as one without it
    img = tmp_path / "cell.png"
    arr = cell_png(img)  # already 28x28, so the recipe passes it through unchanged
    [entry] = predict_json(capsys, tmp_path, run, [img])
    got = probs_by_class(entry, meta["class_names"])
    want = manual_probs(weights, arr[None])[0]
    raw = manual_probs(weights, arr[None], normalise=False)[0]
    assert np.allclose(got, want, atol=1e-5), (got, want)
    assert np.abs(raw - want).max() > 1e-3  # the check above can tell a normalised pass from a plain one
    # the statistics travel in the weights file: alone, it predicts the same
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(weights, alone / "w.safetensors")
    [entry_alone] = predict_json(capsys, tmp_path, alone / "w.safetensors", [img], "alone.json")
    assert np.allclose(probs_by_class(entry_alone, meta["class_names"]), want, atol=1e-5)

    # evaluate: accuracy and AUC of the hand-made normalised pass over the test split
    assert main(["evaluate", str(run), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    probs = manual_probs(weights, test_x)
    assert m["n"] == len(test_y) == 32
    assert m["accuracy"] == pytest.approx(float((probs.argmax(1) == test_y).mean()), abs=1e-12)
    assert m["auc_ovr_macro"] == pytest.approx(roc_auc_score(test_y, probs, multi_class="ovr"), abs=1e-6)
    raw_auc = roc_auc_score(test_y, manual_probs(weights, test_x, normalise=False), multi_class="ovr")
    assert abs(raw_auc - m["auc_ovr_macro"]) > 1e-3  # evaluate without the statistics would be caught

    # explain: runs on the file and reports predict's class and probability
    assert main(["explain", str(run), str(img), "--out", str(tmp_path / "ex")]) == 0
    _, cls, prob, png = capsys.readouterr().out.strip().split("\t")[:4]  # then any warnings
    assert cls == entry["top"][0]["class"] and prob == f"{entry['top'][0]['probability']:.4f}"
    assert (tmp_path / "ex").is_dir() and png.endswith(".png")


# ---------------------------------------------------------------- augmentation symmetries
def flips_of(img: torch.Tensor) -> list[torch.Tensor]:
    """Identity, horizontal, vertical and both flips of a CxHxW image."""
    return [img, img.flip(2), img.flip(1), img.flip(1).flip(2)]


def dihedral_of(img: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square: 4 rotations of the image and 4 of its transpose."""
    t = img.transpose(1, 2)
    return [torch.rot90(img, k, dims=(1, 2)) for k in range(4)] + [torch.rot90(t, k, dims=(1, 2)) for k in range(4)]


def which(out: torch.Tensor, candidates: list[torch.Tensor]) -> int:
    hits = [k for k, c in enumerate(candidates) if torch.equal(out, c)]
    assert len(hits) == 1, "the output image is none of the allowed symmetries of its input"
    return hits[0]


def test_augmentation_applies_only_the_symmetries_of_the_square():
    n = 200
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, 6, 6), dtype=np.uint8))
    for img in x[:5]:  # random images have 8 distinct symmetries, so each output identifies its transform
        d = dihedral_of(img)
        assert all(not torch.equal(d[i], d[j]) for i in range(8) for j in range(i))
    # the flip group is a subgroup of the dihedral one
    assert {which(f, dihedral_of(x[0])) for f in flips_of(x[0])} == {0, 2, 5, 7}
    before = x.clone()

    dih = augment_batch(x, "dihedral", torch.Generator().manual_seed(1))
    assert dih.dtype == torch.uint8 and dih.shape == x.shape
    seen = [which(dih[i], dihedral_of(x[i])) for i in range(n)]  # image i stays image i: labels stay valid
    assert set(seen) == set(range(8))  # all 8 occur over 200 images

    flip = augment_batch(x, "flip", torch.Generator().manual_seed(1))
    kinds = [which(flip[i], flips_of(x[i])) for i in range(n)]  # never transposed or turned by 90 degrees
    assert set(kinds) == {0, 1, 2, 3}

    for out in (dih, flip):  # a symmetry moves pixels, it never changes them: per image and channel
        assert torch.equal(out.flatten(2).sort(dim=2).values, x.flatten(2).sort(dim=2).values)
    assert torch.equal(x, before)  # the input batch is not modified in place
    assert torch.equal(augment_batch(x, "none", torch.Generator().manual_seed(1)), x)

    again = augment_batch(x, "dihedral", torch.Generator().manual_seed(1))
    other = augment_batch(x, "dihedral", torch.Generator().manual_seed(2))
    assert torch.equal(again, dih) and not torch.equal(other, dih)


# ---------------------------------------------------------------- optimizers, weight decay, momentum
def test_make_optimizer_follows_the_config():
    model = create_model("se-cnn", input_size=28)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}

    def made(**kw):
        opt = make_optimizer(TrainConfig(model="se-cnn", lr=0.01, **kw), model)
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 0.01
        assert {id(p) for p in opt.param_groups[0]["params"]} == trainable
        return opt, opt.param_groups[0]

    opt, g = made(optimizer="sgd", momentum=0.9, weight_decay=1e-4)
    assert type(opt) is torch.optim.SGD and g["momentum"] == 0.9 and g["weight_decay"] == 1e-4
    opt, g = made(optimizer="adamw", weight_decay=0.05)
    assert type(opt) is torch.optim.AdamW and g["weight_decay"] == 0.05
    opt, g = made(optimizer="adam", weight_decay=1e-3)
    assert type(opt) is torch.optim.Adam and g["weight_decay"] == 1e-3
    assert not g.get("decoupled_weight_decay", False)  # Adam's weight decay is L2 in the loss, not AdamW's
    opt, g = made()  # no --optimizer: the paper's choice for the model
    assert type(opt) is torch.optim.Adam and g["weight_decay"] == 0
    # only trainable parameters: the AutoClassifier's frozen encoder is left out
    ac = create_model("autoclassifier", input_size=32)
    opt = make_optimizer(TrainConfig(model="autoclassifier"), ac)
    names = {id(p): n for n, p in ac.named_parameters()}
    chosen = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert chosen and not any(n.startswith("encoder.") for n in chosen)
    assert len(chosen) == sum(1 for n, _ in ac.named_parameters() if not n.startswith("encoder."))


def test_paper_default_optimizer_is_sgd_for_resnet():
    cfg = TrainConfig(model="resnet34", optimizer=None, lr=0.01)  # None: the paper's choice for the model
    opt = make_optimizer(cfg, create_model("resnet34", input_size=64))
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0


def test_cli_sgd_momentum_weight_decay_and_smoothing_reach_the_run(prepared, tmp_path, capsys):
    run = tmp_path / "sgd"
    assert main([*TRAIN_CLI, "--epochs", "1", "--augment", "none", "--optimizer", "sgd", "--lr", "0.01",
                 "--momentum", "0.9", "--weight-decay", "1e-4", "--label-smoothing", "0.1", "--out", str(run)]) == 0
    cfg = TrainConfig.load(run / "config.json")
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.label_smoothing) == ("sgd", 0.9, 1e-4, 0.1)
    state = torch.load(run / "state.pt", weights_only=True)["optimizer"]
    [group] = state["param_groups"]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    n_trainable = sum(1 for p in create_model("se-cnn", input_size=28).parameters() if p.requires_grad)
    buffers = [s.get("momentum_buffer") for s in state["state"].values()]
    assert len(buffers) == n_trainable  # three SGD steps with momentum leave a buffer per parameter
    assert all(isinstance(b, torch.Tensor) for b in buffers) and any(b.abs().sum() > 0 for b in buffers)


def test_label_smoothing_is_in_the_training_loss(prepared, tmp_path):
    """The logged epoch-1 train_loss equals the label-smoothed cross-entropy computed here from the weights.

    To compute it by hand the weights must not move during the epoch: SGD with lr 1e-12 (weights change by
    ~1e-12) on cnn-t2-2, which has neither dropout nor BatchNorm, so train-mode and eval-mode outputs agree,
    without augmentation. Then the epoch's mean loss is a function of the saved weights alone.
    """
    cfg = TrainConfig(model="cnn-t2-2", data="bloodmnist", size=28, epochs=1, batch_size=32, threads=1,
                      optimizer="sgd", lr=1e-12, schedule="constant", augment="none", label_smoothing=0.2)
    train(cfg, tmp_path / "ls", **QUIET)
    with open(tmp_path / "ls" / "history.csv") as f:
        logged = float(next(csv.DictReader(f))["train_loss"])
    with np.load(prepared["npz"]) as z:
        x, y = z["train_images"], torch.from_numpy(z["train_labels"].reshape(-1).astype(np.int64))
    logits = torch.log(torch.from_numpy(manual_probs(tmp_path / "ls" / "last.safetensors", x)))
    smoothed = F.cross_entropy(logits, y, label_smoothing=0.2).item()
    plain = F.cross_entropy(logits, y).item()
    assert abs(plain - smoothed) > 1e-3  # near-uniform early logits: make sure the two are told apart
    assert logged == pytest.approx(smoothed, abs=2e-5), (logged, smoothed, plain)


# ---------------------------------------------------------------- train --evaluate
def test_train_evaluate_writes_what_evaluate_prints(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TRAIN_CLI, "--epochs", "1", "--augment", "none", "--evaluate", "--checkpoint", "last",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    assert "training" in metrics and test["split"] == "test" and test["checkpoint"] == "last"
    with np.load(prepared["npz"]) as z:
        x, y = z["test_images"], z["test_labels"].reshape(-1)
    probs = manual_probs(run / "last.safetensors", x)
    assert test["n"] == 32 and test["accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()), abs=1e-12)
    assert main(["evaluate", str(run), "--checkpoint", "last", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == test["accuracy"] and printed["confusion_matrix"] == test["confusion_matrix"]
    assert printed["checkpoint"] == "last" and printed["checkpoint_epoch"] == test["checkpoint_epoch"] == 1


# ---------------------------------------------------------------- a bare .safetensors file
def test_predict_from_a_bare_weights_file_equals_predict_from_the_run(run, tmp_path, capsys):
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    shutil.copy(run / "best.safetensors", alone / "model.safetensors")
    small = tmp_path / "small.png"
    arr = cell_png(small, label=4)
    rng = np.random.default_rng(3)
    big = np.concatenate([synthetic_cell(1, rng)] * 2, axis=1)  # 96x192: the recipe's crop and resize apply
    Image.fromarray(big).save(tmp_path / "big.jpg")
    Image.fromarray(synthetic_cell(6, rng)).convert("L").save(tmp_path / "grey.png")
    images = [small, tmp_path / "big.jpg", tmp_path / "grey.png"]
    from_run = predict_json(capsys, tmp_path, run, images, "run.json")
    from_file = predict_json(capsys, tmp_path, alone / "model.safetensors", images, "file.json")
    assert [e["path"] for e in from_file] == [e["path"] for e in from_run] == [str(p) for p in images]
    assert all(e["error"] is None and len(e["top"]) == 8 for e in from_file)
    assert from_file == from_run  # same classes, same order, same probabilities
    names = weights_meta(run / "best.safetensors")["class_names"]
    assert np.allclose(probs_by_class(from_file[0], names), manual_probs(run / "best.safetensors", arr[None])[0],
                       atol=1e-5)


# ---------------------------------------------------------------- multi-process decode
def test_multi_process_decode_equals_single_process(tmp_path, monkeypatch):
    from bloodcell.data import sources

    rng = np.random.default_rng(0)
    paths = []
    for i in range(260):  # the pool is used from 256 files on
        p = tmp_path / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    paths[100].write_bytes(b"not an image at all")
    paths[201].write_bytes(paths[0].read_bytes()[:60])  # a truncated PNG
    recipe = Recipe(size=4, crop=6)
    one, why_one = decode_all(paths, recipe, workers=1, progress=False)

    pools = []
    if hasattr(sources, "ProcessPoolExecutor"):  # count pool use while decode_all still imports it there
        real = sources.ProcessPoolExecutor

        def counting(*a, **kw):
            pools.append(kw.get("max_workers", a[0] if a else None))
            return real(*a, **kw)

        monkeypatch.setattr(sources, "ProcessPoolExecutor", counting)
    two, why_two = decode_all(paths, recipe, workers=2, progress=False)
    if hasattr(sources, "ProcessPoolExecutor"):
        assert pools == [2], "260 files with workers=2 should be decoded by a 2-process pool"

    assert len(one) == len(two) == len(why_one) == len(why_two) == 260
    assert why_two == why_one
    assert [i for i, r in enumerate(why_two) if r] == [100, 201]
    assert "not an image" in why_two[100] and why_two[201]
    assert two[100] is None and two[201] is None
    for a, b in zip(one, two):
        assert (a is None) == (b is None) and (a is None or np.array_equal(a, b))
    # and the images are the recipe's: centred 6x6 crop, bicubic resize to 4x4
    ref = Image.open(paths[7]).convert("RGB").crop((1, 1, 7, 7)).resize((4, 4), Image.Resampling.BICUBIC)
    assert two[7].shape == (4, 4, 3) and np.array_equal(two[7], np.asarray(ref))


# ---------------------------------------------------------------- bn_momentum across the registry
def bn_momentum_mentions(text: str, paragraphs: str) -> list[str]:
    """The paragraphs of ``text`` (split on the regex ``paragraphs``) that mention bn_momentum, as one line each."""
    return [" ".join(p.split()) for p in re.split(paragraphs, text) if "bn_momentum" in p]


def test_bn_momentum_is_honoured_or_refused_and_the_docs_tell_which(capsys):
    """Each model either sets every BatchNorm's momentum from ``bn_momentum`` or refuses it with a one-line error;
    where ``train --help`` or the README offers ``--model-arg bn_momentum=...``, the same paragraph names the
    models that refuse it (or every model takes it)."""
    refused = []
    for spec in list_models():
        try:
            model = create_model(spec.name, input_size=64, bn_momentum=0.1)
        except BloodcellError as e:
            assert "bn_momentum" in str(e), (spec.name, str(e))
            refused.append(spec.name)
            continue
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert all(m.momentum == 0.1 for m in bns), spec.name
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    docs = {"bloodcell train --help": bn_momentum_mentions(capsys.readouterr().out, r"\n(?=  -)")}
    readme = Path(__file__).resolve().parents[1] / "README.md"
    if readme.is_file():
        docs["README.md"] = bn_momentum_mentions(readme.read_text(encoding="utf-8"), r"\n\s*\n")
    wrong = [f"{where}: '{p[:90]}...' does not name {', '.join(n for n in refused if n not in p)}"
             for where, found in docs.items() for p in found if any(n not in p for n in refused)]
    assert not wrong, f"bn_momentum is offered, but {', '.join(refused)} refuse it:\n" + "\n".join(wrong)


# ---------------------------------------------------------------- seed spread of the benchmark report
def test_benchmark_aggregate_spread_is_the_sample_std():
    acc = [0.91, 0.95, 0.87, 0.99]
    f1 = [0.80, None, 0.90, 0.70]
    rows = [{"accuracy": a, "f1_weighted": f} for a, f in zip(acc, f1)]
    rows[2]["total_seconds"] = 12.5
    out = aggregate(rows)
    assert set(out) == set(METRICS)
    assert np.std(acc, ddof=1) - np.std(acc, ddof=0) > 0.005  # the two conventions are told apart here
    assert out["accuracy"][0] == pytest.approx(np.mean(acc)) and out["accuracy"][1] == pytest.approx(
        np.std(acc, ddof=1), rel=1e-12)
    assert out["f1_weighted"] == (pytest.approx(0.8), pytest.approx(0.1))  # missing values are left out
    assert out["total_seconds"] == (12.5, None)  # one value: no spread
    assert out["model_size_mb"] == (None, None)


def test_seed_script_and_benchmark_report_agree_on_the_spread():
    """benchmarks/se_cnn_seeds.py (the README's headline numbers) and the suite report: one convention."""
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    seeds = importlib.import_module("se_cnn_seeds")
    runs = [{"accuracy": a, "f1_weighted": f, "first_epoch_seconds": 70.0, "mean_epoch_seconds": 65.0,
             "total_seconds": 1300.0} for a, f in ((0.9883, 0.9883), (0.9857, 0.9857), (0.9868, 0.9868))]
    s, agg = seeds.summarize(runs), aggregate(runs)
    assert s["test_accuracy_std"] == round(agg["accuracy"][1], 4) == round(float(np.std([0.9883, 0.9857, 0.9868],
                                                                                        ddof=1)), 4)
    assert s["test_f1_weighted_std"] == round(agg["f1_weighted"][1], 4)


# ---------------------------------------------------------------- serve: glibc malloc settings
def test_serve_tunes_malloc_unless_the_user_set_it(monkeypatch):
    """Arena cap and a fixed mmap threshold by default; a user's MALLOC_* variable or BLOODCELL_MALLOC_TUNING=0
    leaves that setting alone."""
    import ctypes

    from bloodcell.commands import serve

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(serve.sys, "platform", "linux")
    for var in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", serve.MALLOC_TUNING_ENV):
        monkeypatch.delenv(var, raising=False)
    serve.tune_malloc()
    assert calls == [(-8, 2), (-3, 256 * 1024)]
    calls.clear()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    serve.tune_malloc()
    assert calls == [(-8, 2)]
    calls.clear()
    monkeypatch.setenv(serve.MALLOC_TUNING_ENV, "0")
    serve.tune_malloc()
    assert calls == []
