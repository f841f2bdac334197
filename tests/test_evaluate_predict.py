import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from bloodcell.cli import main
from bloodcell.errors import BloodcellError
from bloodcell.evaluation.evaluate import evaluate, evaluate_run
from bloodcell.evaluation.metrics import classification_metrics
from bloodcell.inference import Classifier
from bloodcell.inference.weights import load_model, meta_digest


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4), 200)
    probs[np.arange(100), y[:100]] += 1  # make half of them right
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    m = classification_metrics(y, probs, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    for avg in ("weighted", "macro"):
        assert m[f"f1_{avg}"] == pytest.approx(f1_score(y, pred, average=avg))
        assert m[f"precision_{avg}"] == pytest.approx(precision_score(y, pred, average=avg))
        assert m[f"recall_{avg}"] == pytest.approx(recall_score(y, pred, average=avg))
    assert m["auc_ovr_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert m["recall_weighted"] == pytest.approx(m["accuracy"])  # one pass: weighted recall is accuracy
    assert np.array(m["confusion_matrix"]).sum() == 200


def test_evaluate_writes_report(run):
    from bloodcell.data.store import load_dataset

    m = evaluate_run(run, "test", speed=True)
    test = load_dataset("bloodmnist", 28)
    probs = Classifier.from_run(run).predict_arrays(test.images["test"])  # the same pass, by hand
    assert m["accuracy"] == pytest.approx(float((probs.argmax(1) == test.labels["test"]).mean())) and m["n"] == 32
    assert m["params_keras"] > m["params_trainable"] > 0
    assert m["model_size_mb"] == pytest.approx((run / "best.safetensors").stat().st_size / 1e6, abs=1e-3)
    assert m["speed"]["throughput_images_per_s"] > 0 and m["speed"]["latency_ms_batch1"] > 0
    assert m["device"].startswith("cpu (") and m["speed"]["device"] == m["device"]
    assert "speed" not in evaluate_run(run, "test")  # off unless asked for
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test"]["accuracy"] == m["accuracy"] and "training" in saved
    with open(run / "confusion_test.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][1] == "basophil" and sum(int(v) for r in rows[1:] for v in r[1:]) == 32
    assert (run / "confusion_test.png").stat().st_size > 1000
    assert (run / "history.png").is_file()


def test_corrupt_and_mismatched_weights_are_clear_errors(run, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((run / "best.safetensors").read_bytes()[:500])
    with pytest.raises(BloodcellError, match="corrupt or not a safetensors"):
        load_model(bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / "best.safetensors")
    save_file(tensors, tmp_path / "nometa.safetensors")
    with pytest.raises(BloodcellError, match="without bloodcell metadata"):
        load_model(tmp_path / "nometa.safetensors")
    import json as _json

    from safetensors import safe_open

    with safe_open(str(run / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    wrong = _json.loads(meta["bloodcell"])
    wrong["model"] = "cbam-cnn"
    save_file(tensors, tmp_path / "edited.safetensors", metadata={**meta, "bloodcell": _json.dumps(wrong)})
    with pytest.raises(BloodcellError, match="metadata was changed after training"):
        load_model(tmp_path / "edited.safetensors")
    save_file(tensors, tmp_path / "wrong.safetensors",
              metadata={**meta, "bloodcell": _json.dumps(wrong), "bloodcell_sha256": meta_digest(wrong)})
    with pytest.raises(BloodcellError, match="do not match the model"):
        load_model(tmp_path / "wrong.safetensors")


def test_predict_any_file_and_bad_files(run, tmp_path):
    rng = np.random.default_rng(0)
    files = tmp_path / "in"
    files.mkdir()
    rgb = rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(files / "a.jpg")
    Image.fromarray(rgb).convert("L").save(files / "b.png")
    Image.fromarray(rgb).convert("RGBA").save(files / "c.tiff")
    Image.fromarray(rgb).save(files / "d.bmp")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(files / "e16.png")
    (files / "f.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    results = Classifier.from_run(run).predict_files([files], top_k=2)
    assert [r.path.split("/")[-1] for r in results] == ["a.jpg", "b.png", "c.tiff", "d.bmp", "e16.png", "f.jpg"]
    assert all(r.top and len(r.top) == 2 and r.top[0][1] >= r.top[1][1] for r in results[:5])
    assert results[5].top is None and "not an image" in results[5].error
    assert results[2].top == results[3].top  # an opaque RGBA TIFF and a BMP of the same pixels: the same input


def test_predict_cli_exit_status_and_outputs(run, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run), str(good), str(bad), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bad.jpg\tERROR:" in text and "good.png\t" in text
    rows = list(csv.DictReader(open(out)))
    assert rows[0]["class1"] and rows[1]["error"]
    assert main(["predict", str(run), str(bad), "--out", str(tmp_path / "p.json")]) == 1
    assert json.loads((tmp_path / "p.json").read_text())[0]["error"]
    assert main(["predict", str(tmp_path / "norun"), str(good)]) == 2
    assert "run folder or weights file not found" in capsys.readouterr().err


def test_one_classifier_from_a_run_or_a_bare_weights_file(run, tmp_path):
    import shutil

    import torch

    bare = tmp_path / "alone" / "model.safetensors"
    bare.parent.mkdir()
    shutil.copy(run / "best.safetensors", bare)
    a, b = Classifier.from_run(run, device="cpu"), Classifier.from_run(bare, device="cpu")
    assert a.class_names == b.class_names and a.recipe == b.recipe and a.device == torch.device("cpu")
    x = torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8)
    assert torch.equal(a.logits(x), b.logits(x)) and a.logits(x).shape == (5, 8)
    last = Classifier.from_run(run, "last")
    assert last.meta["epoch"] == 2
    with pytest.raises(BloodcellError, match="expected N x 28 x 28 x 3"):
        a.predict_arrays(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(BloodcellError, match="--checkpoint must be one of best, last"):
        Classifier.from_run(run, "newest")
    a.temperature = 2.0  # what calibration will set: softer probabilities, same ranking
    p1, p2 = b.probabilities(x), a.probabilities(x)
    assert torch.equal(p1.argmax(1), p2.argmax(1)) and bool((p2.max(1).values <= p1.max(1).values + 1e-6).all())


def test_evaluate_is_pure(run):
    from bloodcell.data.store import load_dataset

    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    d = load_dataset("bloodmnist", 28)
    m = evaluate(Classifier.from_run(run), d.images["test"], d.labels["test"])
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    assert m["n"] == 32 and np.array(m["confusion_matrix"]).sum() == 32


def test_weights_metadata_that_disagrees_with_the_run_is_refused(run, tmp_path, capsys):
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"] = "cbam-cnn"  # the folder now claims another model than its weights hold
    (run / "config.json").write_text(json.dumps(cfg))
    good = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(good)
    assert main(["predict", str(run), str(good)]) == 2
    assert "differs from model 'cbam-cnn'" in capsys.readouterr().err
