"""Ensembles (``bloodcell ensemble``) and distillation (``bloodcell train --teacher``) on tiny 28 px runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_arrays, synthetic_cell
from PIL import Image

from bloodcell.cli import main
from bloodcell.errors import BloodcellError
from bloodcell.inference import Classifier
from bloodcell.inference.ensemble import EnsembleClassifier, combine, make_ensemble
from bloodcell.training import TrainConfig, train
from bloodcell.training.distill import distillation_loss

FAST = dict(model="se-cnn", data="bloodmnist", size=28, epochs=1, batch_size=32, threads=1, train_limit=48)


def one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("bloodcell: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Three 1-epoch runs of the same data (seeds 0-2), a fourth at another size, and their dataset folder."""
    from bloodcell.data.sources import prepare_from_npz

    root = tmp_path_factory.mktemp("ensemble")
    data = root / "datasets"
    for size in (28, 64):
        npz = root / f"bloodmnist_{size}.npz"
        np.savez(npz, **synthetic_arrays({"train": 12, "val": 4, "test": 4}, size=size))
        prepare_from_npz(npz, root=data)
    out = {"root": root, "data": data}
    for seed in range(3):
        out[seed] = root / f"seed{seed}"
        train(TrainConfig(**FAST, seed=seed, data_dir=str(data)), out[seed], log=lambda s: None)
    out["big"] = root / "size64"
    train(TrainConfig(**{**FAST, "size": 64}, data_dir=str(data)), out["big"], log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def soft(runs) -> Path:
    folder = runs["root"] / "soft"
    assert main(["ensemble", str(runs[0]), str(runs[1]), str(runs[2]), "--vote", "soft", "--out", str(folder),
                 "--device", "cpu"]) == 0
    return folder


@pytest.fixture(scope="module")
def cells(runs) -> list[Path]:
    folder = runs["root"] / "cells"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(folder / f"cell_{i}.png")
        Image.fromarray(synthetic_cell(i % 3, rng, size=60)).save(paths[-1])
    return paths


def test_ensemble_json_and_metrics(soft, runs):
    spec = json.loads((soft / "ensemble.json").read_text())
    assert spec["vote"] == "soft" and spec["checkpoint"] == "best" and spec["input_size"] == 28
    assert [m["path"] for m in spec["members"]] == ["../seed0", "../seed1", "../seed2"]  # relative to the folder
    assert all(m["model"] == "se-cnn" and m["params_trainable"] > 0 for m in spec["members"])
    assert all(m["test_accuracy"] is None for m in spec["members"])  # the members were never evaluated
    metrics = json.loads((soft / "metrics.json").read_text())["test"]
    member = json.loads((runs[0] / "metrics.json").read_text())["training"]
    for key in ("accuracy", "f1_macro", "confusion_matrix", "calibration", "params_keras", "class_names"):
        assert key in metrics, key
    assert metrics["params_trainable"] == 3 * member["params_trainable"]
    assert (soft / "confusion_test.png").is_file()


def test_soft_vote_is_the_mean_of_member_probabilities(soft, runs):
    x = torch.randint(0, 256, (16, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ens = Classifier.from_run(soft, device="cpu")
    assert isinstance(ens, EnsembleClassifier) and ens.input_size == 28 and ens.num_classes == 8
    manual = torch.stack([Classifier.from_run(runs[s], device="cpu", calibrated=False).probabilities(x)
                          for s in range(3)]).mean(0)
    assert torch.allclose(ens.probabilities(x), manual, atol=1e-6)
    assert torch.allclose(ens.logits(x).exp(), manual, atol=1e-6)  # the "logits" are log probabilities
    arrays = x.permute(0, 2, 3, 1).numpy()
    assert np.allclose(ens.predict_arrays(arrays), manual.numpy(), atol=1e-6)


def test_majority_vote_counts_votes_and_breaks_ties_by_the_soft_mean():
    big = 5.0
    # member 0 and 1 vote class 0, member 2 votes class 1 with great confidence: majority 0, soft mean 1
    z = torch.tensor([[[1.0, 0.0, 0.0]], [[1.0, 0.9, 0.0]], [[0.0, 20.0, 0.0]]])
    assert combine(z, "soft").argmax(1).item() == 1
    assert combine(z, "majority").argmax(1).item() == 0
    # a tie (one vote each for classes 0 and 1, two members): the soft mean decides
    tie = torch.tensor([[[big, 0.0, 0.0]], [[0.0, big + 1, 0.0]]])
    soft_mean = torch.softmax(tie, -1).mean(0)
    assert soft_mean.argmax(1).item() == 1
    p = combine(tie, "majority").exp()
    assert p.argmax(1).item() == 1
    assert torch.allclose(p, (torch.tensor([[1.0, 1.0, 0.0]]) + soft_mean) / 3)  # documented probabilities
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-6)


def test_majority_ensemble_decisions_are_the_votes(runs, tmp_path):
    folder = tmp_path / "majority"
    make_ensemble([runs[0], runs[1], runs[2]], folder, vote="majority")
    ens = Classifier.from_run(folder, device="cpu")
    x = torch.randint(0, 256, (32, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    z = ens.member_logits(x)
    votes = F.one_hot(z.argmax(-1), 8).sum(0).float()
    soft = torch.softmax(z, -1).mean(0)
    best = votes.max(1, keepdim=True).values
    expected = torch.where(votes == best, soft, torch.full_like(soft, -1.0)).argmax(1)
    assert torch.equal(ens.logits(x).argmax(1), expected)


def test_members_must_be_compatible_finished_runs(runs, tmp_path):
    with pytest.raises(BloodcellError, match=f"{runs['big']}: its input size 64 differ"):
        make_ensemble([runs[0], runs["big"]], tmp_path / "e")
    with pytest.raises(BloodcellError, match="at least 2 member runs, got 1"):
        make_ensemble([runs[0]], tmp_path / "e")
    with pytest.raises(BloodcellError, match="given twice"):
        make_ensemble([runs[0], runs[0]], tmp_path / "e")
    with pytest.raises(BloodcellError, match="run folder not found"):
        make_ensemble([runs[0], tmp_path / "nowhere"], tmp_path / "e")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((runs[1] / "config.json").read_text())
    with pytest.raises(BloodcellError, match="not a finished run"):
        make_ensemble([runs[0], unfinished], tmp_path / "e")


def test_members_with_other_class_names_are_named(runs, tmp_path):
    """A run whose weights name the classes differently (made by re-saving a member's weights)."""
    from bloodcell.inference.weights import load_model, save_weights

    other = tmp_path / "renamed"
    other.mkdir()
    model, meta = load_model(runs[1] / "best.safetensors")
    meta["class_names"] = list(reversed(meta["class_names"]))
    save_weights(other / "best.safetensors", model, meta)
    (other / "config.json").write_text((runs[1] / "config.json").read_text())
    (other / "metrics.json").write_text(json.dumps({"training": {"params_trainable": 1}}))
    with pytest.raises(BloodcellError, match=f"{other}: its class names .* differ from {runs[0]}'s"):
        make_ensemble([runs[0], other], tmp_path / "e")


def test_evaluate_and_predict_through_the_cli(soft, cells, capsys, tmp_path):
    assert main(["evaluate", str(soft), "--json", "--device", "cpu"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["accuracy"] == json.loads((soft / "metrics.json").read_text())["test"]["accuracy"]
    out = tmp_path / "p.json"
    assert main(["predict", str(soft), *map(str, cells), "--out", str(out), "--device", "cpu"]) == 0
    got = json.loads(out.read_text())
    api = Classifier.from_run(soft, device="cpu").predict_files(cells)
    assert [r["top"][0]["class"] for r in got] == [r.top[0][0] for r in api]
    assert np.allclose([r["top"][0]["probability"] for r in got], [r.top[0][1] for r in api], atol=1e-6)


def test_calibrate_is_refused_for_an_ensemble(soft, capsys):
    assert main(["calibrate", str(soft), "--device", "cpu"]) != 0
    assert "calibrate' on its member runs" in one_error_line(capsys)


def test_explain_draws_each_member(soft, runs, cells, tmp_path, capsys):
    out = tmp_path / "explain"
    assert main(["explain", str(soft), str(cells[0]), "--out", str(out), "--device", "cpu"]) == 0
    pngs = sorted(p.relative_to(out).parts[0] for p in out.rglob("*.png"))
    assert pngs == ["seed0", "seed1", "seed2"]
    assert main(["explain", str(soft), "--grid", "--per-class", "1", "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "gradcam_grid_test.png").is_file()
    capsys.readouterr()
    assert main(["explain", str(soft), "--report"]) != 0
    assert "explain a member run" in one_error_line(capsys)


@pytest.mark.parametrize("vote", ["soft", "majority"])
def test_export_holds_every_member_and_the_vote(runs, soft, tmp_path, vote):
    pytest.importorskip("onnxruntime")
    from bloodcell.deploy import export_bundle
    from bloodcell.deploy.bundle import ort_logits

    folder = soft if vote == "soft" else tmp_path / "majority"
    if vote == "majority":
        make_ensemble([runs[0], runs[1], runs[2]], folder, vote="majority")
    b = export_bundle(folder, tmp_path / "bundle", log=lambda s: None)
    assert b["parity"]["fp32"]["ok"] and b["parity"]["fp32"]["data"] == "test"
    assert b["source"]["vote"] == vote and len(b["source"]["members"]) == 3
    x = torch.randint(0, 256, (40, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ens = Classifier.from_run(folder, device="cpu")
    ref = ens.logits(x).numpy()
    got = ort_logits(tmp_path / "bundle" / "model.onnx", x.numpy(), ens.normalization)
    assert np.array_equal(ref.argmax(1), got.argmax(1))
    assert np.allclose(np.exp(ref), np.exp(got), atol=1e-5)


# ------------------------------------------------------------ distillation
def test_distillation_loss_is_the_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0])
    ce = F.cross_entropy(s, y)
    temp, alpha = 3.0, 0.3
    p_t, p_s = torch.softmax(t / temp, 1), torch.softmax(s / temp, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    got = distillation_loss(ce, s, t, alpha=alpha, temperature=temp)
    assert torch.allclose(got, (1 - alpha) * ce + alpha * temp**2 * kl, atol=1e-6)
    assert torch.equal(distillation_loss(ce, s, t, alpha=0.0, temperature=temp), ce)
    assert torch.allclose(distillation_loss(ce, s, s, alpha=1.0, temperature=temp), torch.zeros(()), atol=1e-6)


def test_alpha_zero_trains_as_without_a_teacher(runs, tmp_path):
    data = str(runs["data"])
    plain = train(TrainConfig(**FAST, data_dir=data), tmp_path / "plain", log=lambda s: None)
    taught = train(TrainConfig(**FAST, data_dir=data, teacher=str(runs[1]), distill_alpha=0.0), tmp_path / "a0",
                   log=lambda s: None)
    assert plain["best_val_acc"] == taught["best_val_acc"]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "plain" / "last.safetensors"), load_file(tmp_path / "a0" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_distilled_run_from_an_ensemble_records_its_teacher(runs, soft, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["train", "--model", "se-cnn", "--size", "28", "--epochs", "1", "--train-limit", "48",
                 "--batch-size", "32", "--threads", "1", "--data-dir", str(runs["data"]), "--teacher", str(soft),
                 "--distill-alpha", "0.7", "--distill-temperature", "2", "--out", str(out)]) == 0
    cfg = TrainConfig.load(out / "config.json")
    assert (cfg.teacher, cfg.distill_alpha, cfg.distill_temperature) == (str(soft), 0.7, 2.0)
    training = json.loads((out / "metrics.json").read_text())["training"]
    assert training["distillation"] == {"teacher": str(soft), "alpha": 0.7, "temperature": 2.0}
    capsys.readouterr()
    assert main(["train", "--size", "28", "--distill-alpha", "0.3", "--out", str(tmp_path / "x")]) != 0
    assert "give --teacher" in one_error_line(capsys)


def test_a_teacher_of_another_size_is_refused(runs, tmp_path):
    cfg = TrainConfig(**FAST, data_dir=str(runs["data"]), teacher=str(runs["big"]))
    with pytest.raises(BloodcellError, match=f"--teacher {runs['big']}: its input size 64 differ"):
        train(cfg, tmp_path / "s", log=lambda s: None)


def test_older_configs_load_without_distillation_fields(runs):
    d = json.loads((runs[0] / "config.json").read_text())
    for k in ("teacher", "distill_alpha", "distill_temperature"):
        d.pop(k)
    assert TrainConfig.from_dict(d).teacher is None
    with pytest.raises(BloodcellError, match="distill_alpha must be in"):
        TrainConfig(distill_alpha=1.5).validate()
    with pytest.raises(BloodcellError, match="distill_temperature must be a positive"):
        TrainConfig(distill_temperature=0).validate()
    with pytest.raises(BloodcellError, match="field 'teacher' must be str/null"):
        TrainConfig(teacher=3).validate()


def test_distilled_run_resumes_to_the_same_result(runs, tmp_path):
    from safetensors.torch import load_file

    cfg = TrainConfig(**{**FAST, "epochs": 2}, data_dir=str(runs["data"]), teacher=str(runs[0]), distill_alpha=0.5)
    train(cfg, tmp_path / "straight", log=lambda s: None)

    def ctrl_c_after_epoch_1(msg):
        if msg.startswith("epoch   1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", log=ctrl_c_after_epoch_1)
    train(cfg, tmp_path / "cut", resume=True, log=lambda s: None)
    wa, wb = load_file(tmp_path / "straight" / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_serve_answers_with_the_ensemble(soft, cells):
    """In-process (FastAPI's TestClient): /v1/predict gives the Python API's answers; /v1/explain says why not."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from bloodcell.serve import create_app, load_served

    served = load_served(soft, device="cpu")
    assert served.kind == "ensemble" and len(served.info["source"]["members"]) == 3
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in cells[:3]]
    with TestClient(create_app(served)) as client:
        got = client.post("/v1/predict", files=files).json()["results"]
        assert client.get("/v1/model").json()["kind"] == "ensemble"
        explain = client.post("/v1/explain", files=[("file", files[0][1])])
        assert explain.status_code == 501 and "member" in explain.text
    api = Classifier.from_run(soft, device="cpu").predict_files(cells[:3])
    assert [r["class"] for r in got] == [r.top[0][0] for r in api]
    assert np.allclose([r["probability"] for r in got], [r.top[0][1] for r in api], atol=1e-6)


def test_predict_with_onnx_runtime_caches_the_ensemble_bundle(soft, cells, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "p.json"
    assert main(["predict", str(soft), *map(str, cells), "--engine", "onnx", "--out", str(out)]) == 0
    assert "exporting" in capsys.readouterr().err
    assert main(["predict", str(soft), *map(str, cells), "--engine", "onnx", "--out", str(out)]) == 0
    assert "exporting" not in capsys.readouterr().err  # re-used while ensemble.json and the members' weights hold
    api = Classifier.from_run(soft, device="cpu").predict_files(cells)
    assert [r["top"][0]["class"] for r in json.loads(out.read_text())] == [r.top[0][0] for r in api]


def test_compare_lists_an_ensemble_and_each_tta_evaluation(runs, tmp_path, capsys):
    """`benchmark compare` takes ensemble folders like runs: its own test metrics, its members' summed cost; and a
    row per recorded `evaluate --tta` of a run or an ensemble."""
    import csv
    import shutil

    for seed in range(3):
        shutil.copytree(runs[seed], tmp_path / "members" / f"seed{seed}")
    members = [str(tmp_path / "members" / f"seed{s}") for s in range(3)]
    ens = tmp_path / "ens"
    assert main(["ensemble", *members, "--out", str(ens), "--device", "cpu"]) == 0
    assert main(["evaluate", str(ens), "--tta", "dihedral", "--device", "cpu"]) == 0
    for m in members:  # an ensemble's row needs only its members' training, not their own test results
        metrics = json.loads((Path(m) / "metrics.json").read_text())
        metrics.pop("test", None)
        (Path(m) / "metrics.json").write_text(json.dumps(metrics))
    assert main(["benchmark", "compare", str(ens), "--out", str(tmp_path / "alone"), "--device", "cpu"]) == 0
    assert not any("test" in json.loads((Path(m) / "metrics.json").read_text()) for m in members)
    assert main(["evaluate", members[0], "--tta", "flip", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["benchmark", "compare", str(tmp_path / "members"), str(ens), "--out", str(tmp_path / "cmp"),
                 "--device", "cpu"]) == 0
    rows = {r["label"]: r for r in csv.DictReader((tmp_path / "cmp" / "results.csv").open())}
    assert set(rows) == {"members", "members + TTA flip", "ens", "ens + TTA dihedral"}, rows
    metrics = json.loads((ens / "metrics.json").read_text())
    assert float(rows["ens"]["accuracy_mean"]) == pytest.approx(metrics["test"]["accuracy"])
    assert float(rows["ens + TTA dihedral"]["accuracy_mean"]) == pytest.approx(metrics["test_tta_dihedral"]["accuracy"])
    assert rows["ens"]["model"] == "ensemble of 3x se-cnn" and rows["ens"]["seeds"] == "0"
    assert int(rows["ens"]["params_keras"]) == 3 * int(rows["members"]["params_keras"])
    member_seconds = [json.loads((Path(m) / "metrics.json").read_text())["training"]["total_seconds"] for m in members]
    assert float(rows["ens"]["total_seconds_mean"]) == pytest.approx(sum(member_seconds), rel=1e-5)
    assert rows["members + TTA flip"]["seeds"] == "0"  # only seed 0 was evaluated with flips
    flip = json.loads((Path(members[0]) / "metrics.json").read_text())["test_tta_flip"]["accuracy"]
    assert float(rows["members + TTA flip"]["accuracy_mean"]) == pytest.approx(flip)
    assert "soft vote of 3" in rows["ens"]["settings"] and rows["members + TTA flip"]["settings"].endswith("TTA flip")
    shutil.rmtree(members[2])
    capsys.readouterr()
    assert main(["benchmark", "compare", str(ens), "--out", str(tmp_path / "gone")]) == 2
    assert "member run" in one_error_line(capsys) and "seed2" in members[2]
