import csv

import numpy as np
import pytest
from conftest import CLASSES, synthetic_arrays

from bloodcell.data.corrections import apply_corrections
from bloodcell.data.store import write_dataset
from bloodcell.errors import BloodcellError
from bloodcell.explain.review import review_dataset

FLIPPED = [("train", 3), ("val", 1)]


def _meta(arrays):
    paths = {s: [f"{s}/img{i}.png" for i in range(len(arrays[f"{s}_labels"]))] for s in ("train", "val", "test")}
    return {"name": "toy", "class_names": list(CLASSES), "paths": paths}


@pytest.fixture
def noisy(tmp_path):
    arrays = synthetic_arrays({"train": 16, "val": 4, "test": 2}, size=16, k=3)
    for split, i in FLIPPED:  # plant label errors: class 0 images called class 2
        assert arrays[f"{split}_labels"][i, 0] == 0
        arrays[f"{split}_labels"][i, 0] = 2
    write_dataset("toy", 16, arrays, _meta(arrays))
    return arrays


def test_review_ranks_planted_label_flips_first(noisy, tmp_path):
    r = review_dataset("toy", size=16, folds=3, epochs=4, out=tmp_path / "rev", threads=1, batch_size=16, lr=3e-3,
                       model_args={"bn_momentum": 0.3, "widths": [8, 16]}, top=10, log=lambda s: None)
    top = [(row["split"], row["index"]) for row in r["rows"][:4]]
    assert set(FLIPPED) <= set(top), r["rows"][:6]
    first = r["rows"][0]
    assert first["path"] == f"{first['split']}/img{first['index']}.png" and first["suggested_label"] == "alpha"
    rows = list(csv.DictReader(open(tmp_path / "rev" / "label_review.csv")))
    assert rows[0]["action"] == "keep" and (tmp_path / "rev" / "suspects.png").stat().st_size > 1000


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "split", "index", "given_label", "action", "new_label"])
        w.writeheader()
        w.writerows(rows)


def test_apply_corrections_relabels_drops_and_records_hash(noisy, tmp_path):
    meta = _meta(noisy)
    fix = tmp_path / "fix.csv"
    _write_csv(fix, [
        {"path": "train/img3.png", "split": "train", "index": 3, "given_label": "gamma", "action": "relabel",
         "new_label": "alpha"},
        {"path": "", "split": "val", "index": 1, "given_label": "gamma", "action": "drop", "new_label": ""},
        {"path": "train/img5.png", "split": "train", "index": 5, "given_label": "alpha", "action": "keep"},
    ])
    out, new_meta, summary = apply_corrections(noisy, {**meta, "paths": {**meta["paths"]}}, fix)
    assert out["train_labels"][3, 0] == 0 and noisy["train_labels"][3, 0] == 2  # input untouched
    assert len(out["val_labels"]) == len(noisy["val_labels"]) - 1 and "val/img1.png" not in new_meta["paths"]["val"]
    assert np.array_equal(out["val_images"][1], noisy["val_images"][2])
    assert summary["relabelled"] == 1 and summary["dropped"] == 1 and len(new_meta["corrections"]["sha256"]) == 64
    assert new_meta["counts"]["val"] == np.bincount(out["val_labels"].ravel(), minlength=3).tolist()


def test_corrections_for_another_dataset_version_fail(noisy, tmp_path):
    fix = tmp_path / "bad.csv"
    _write_csv(fix, [{"path": "train/img3.png", "given_label": "alpha", "action": "relabel", "new_label": "beta"}])
    with pytest.raises(BloodcellError, match="bad.csv:2: given_label 'alpha'"):
        apply_corrections(noisy, _meta(noisy), fix)
    _write_csv(fix, [{"path": "train/nope.png", "action": "drop"}])
    with pytest.raises(BloodcellError, match="not in the dataset"):
        apply_corrections(noisy, _meta(noisy), fix)
    _write_csv(fix, [{"path": "train/img1.png", "action": "rename"}])
    with pytest.raises(BloodcellError, match="action 'rename'"):
        apply_corrections(noisy, _meta(noisy), fix)
