import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from bloodcell.cli import main
from bloodcell.errors import BloodcellError
from bloodcell.evaluation.evaluate import evaluate_run
from bloodcell.evaluation.metrics import classification_metrics
from bloodcell.predict import Predictor
from bloodcell.training.checkpoint import load_model


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
    m = evaluate_run(run, "test")
    assert 0 <= m["accuracy"] <= 1 and m["n"] == 32
    assert m["params_keras"] > m["params_trainable"] > 0
    assert m["model_size_mb"] == pytest.approx((run / "best.safetensors").stat().st_size / 1e6, abs=1e-3)
    assert m["cpu"]["throughput_images_per_s"] > 0 and m["cpu"]["latency_ms_batch1"] > 0
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
    save_file(tensors, tmp_path / "wrong.safetensors", metadata={**meta, "bloodcell": _json.dumps(wrong)})
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
    results = Predictor(run).predict_files([files], top_k=2)
    assert [r.path.split("/")[-1] for r in results] == ["a.jpg", "b.png", "c.tiff", "d.bmp", "e16.png", "f.jpg"]
    assert all(r.top and len(r.top) == 2 and r.top[0][1] >= r.top[1][1] for r in results[:5])
    assert results[5].top is None and "not an image" in results[5].error


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
