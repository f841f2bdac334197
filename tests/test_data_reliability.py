"""Bad inputs to the data layer: each is a one-line BloodcellError or handled correctly, never a traceback or a
silently wrong dataset. Every test makes its own small files in tmp_path."""

from __future__ import annotations

import csv
import gzip
import inspect
import json
import os
import pickle
import stat
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, synthetic_arrays
from PIL import Image

from bloodcell.data import images as images_mod
from bloodcell.data.audit import as_words, hamming_pairs, popcount64, run_audit, summary_text
from bloodcell.data.balance import target_counts
from bloodcell.data.corrections import apply_corrections
from bloodcell.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_rgb, set_max_pixels
from bloodcell.data.recipe import Recipe, apply_recipe
from bloodcell.data.sources import prepare_from_folder, prepare_from_npz, read_split_file, scan_class_folders
from bloodcell.data.store import BLOODMNIST_CLASSES, load_dataset, read_npz, write_dataset
from bloodcell.data.tensors import stratified_subset
from bloodcell.errors import BloodcellError
from bloodcell.io import atomic_write, read_json, write_json, write_text

SPLITS = ("train", "val", "test")


def _split_rows(tree: Path) -> list[list]:
    """path,label,split for every file of the tree: per class 12 train, 4 val, 4 test."""
    rows = []
    for c, name in enumerate(CLASSES):
        for i, f in enumerate(sorted((tree / name).iterdir())):
            rows.append([f"{name}/{f.name}", c, "train" if i < 12 else "val" if i < 16 else "test"])
    return rows


def _write_csv(path: Path, rows, header=("path", "label", "split"), encoding="utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f, lineterminator="\n")
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def _npz(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def default_pixel_limit():
    """Tests that change the pixel limit leave PIL and bloodcell as they found them."""
    saved = (images_mod._max_pixels, Image.MAX_IMAGE_PIXELS)
    yield
    images_mod._max_pixels, Image.MAX_IMAGE_PIXELS = saved


# ---------------------------------------------------------------- 1. the recipe
@pytest.mark.parametrize("kwargs, named", [
    ({"crop": 0}, "crop (--crop)"), ({"crop": -5}, "crop (--crop)"), ({"size": 0}, "size (--size)"),
    ({"crop": True}, "crop (--crop)"), ({"crop": 2.5}, "crop (--crop)"), ({"size": "64"}, "size (--size)"),
])
def test_recipe_refuses_non_positive_or_non_integer_pixels(kwargs, named):
    with pytest.raises(BloodcellError, match=rf"^{named.replace('(', '.').replace(')', '.')} must be a positive"):
        Recipe(**kwargs)


@pytest.mark.parametrize("d, named", [
    ("abc", "recipe must be a mapping"), ([64, 200], "recipe must be a mapping"), (None, "recipe must be a mapping"),
    ({"crop": 200}, "no 'size'"), ({"size": 64}, "no 'crop'"),
    ({"size": 64, "crop": "abc"}, "recipe crop must be a positive"), ({"size": 64, "crop": -1}, "recipe crop"),
    ({"size": 64, "crop": True}, "recipe crop"), ({"size": 64, "crop": 2.5}, "recipe crop"),
    ({"size": 0, "crop": 200}, "recipe size"), ({"size": 64, "crop": 200, "interpolation": "nearest"}, "'nearest'"),
])
def test_recipe_from_dict_names_the_bad_field_and_the_file(d, named):
    with pytest.raises(BloodcellError, match=r"^run/best\.safetensors: .*" + named.replace("(", ".")):
        Recipe.from_dict(d, where="run/best.safetensors")


def test_recipe_from_dict_round_trip_and_numpy_ints():
    r = Recipe(size=28, crop=120)
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict({"size": np.int64(28), "crop": np.int32(120)}) == r
    assert isinstance(Recipe(size=np.int64(28)).size, int)


def test_crop_larger_than_the_image_takes_the_shorter_side():
    arr = np.random.default_rng(0).integers(0, 255, (60, 50, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    assert np.array_equal(apply_recipe(img, Recipe(size=28, crop=500)), apply_recipe(img, Recipe(size=28, crop=50)))


def test_prepare_refuses_a_bad_crop_before_reading_any_file(image_tree, monkeypatch):
    def no_decoding(*a, **k):
        raise AssertionError("decoded although the crop is invalid")

    monkeypatch.setattr("bloodcell.data.sources.decode_all", no_decoding)
    monkeypatch.setattr("bloodcell.data.sources.scan_class_folders", no_decoding)
    for crop in (0, -3, 1.5):
        with pytest.raises(BloodcellError, match=r"--crop"):
            prepare_from_folder(image_tree, size=28, crop=crop, progress=False)


# ---------------------------------------------------------------- 2. split files
def test_split_file_with_excel_bom_is_read(image_tree, tmp_path):
    split = _write_csv(tmp_path / "split.csv", _split_rows(image_tree), encoding="utf-8-sig")
    assert split.read_bytes().startswith(b"\xef\xbb\xbf")
    info = prepare_from_folder(image_tree, size=28, split_file=split, progress=False)
    assert info["counts"] == {"train": [12] * 3, "val": [4] * 3, "test": [4] * 3}


def _edit_rows(tree: Path, case: str) -> list:
    rows = _split_rows(tree)
    first = rows[0]  # alpha/alpha_000.png, label 0, train
    edits = {
        "label-past-the-folders": lambda: rows.__setitem__(0, [first[0], 3, "train"]),
        "negative-label": lambda: rows.__setitem__(0, [first[0], -1, "train"]),
        "label-of-another-folder": lambda: rows.__setitem__(0, [first[0], 1, "train"]),
        "folder-not-a-class": lambda: rows.__setitem__(0, ["delta/x.png", 0, "train"]),
        "file-at-top-level": lambda: rows.__setitem__(0, ["x.png", 0, "train"]),
        "absolute-path": lambda: rows.__setitem__(0, ["/etc/passwd", 0, "train"]),
        "parent-path": lambda: rows.__setitem__(0, ["alpha/../../x.png", 0, "train"]),
        "empty-path": lambda: rows.__setitem__(0, ["", 0, "train"]),
        "bad-split": lambda: rows.__setitem__(0, [first[0], 0, "training"]),
        "label-not-int": lambda: rows.__setitem__(0, [first[0], "1.0", "train"]),
        "two-splits": lambda: rows.append([first[0], 0, "test"]),
        "two-labels": lambda: rows.append([first[0], 1, "train"]),
        "short-row": lambda: rows.__setitem__(0, [first[0], 0]),
        "long-row": lambda: rows.__setitem__(0, [first[0], 0, "train", "extra"]),
    }
    edits[case]()
    return rows


SPLIT_ERRORS = {
    "label-past-the-folders": r"split\.csv:2: label 3 is outside 0\.\.2: there are 3 class folders \(0=alpha",
    "negative-label": r"split\.csv:2: label -1 is outside 0\.\.2",
    "label-of-another-folder": r"split\.csv:2: 'alpha/alpha_000\.png' is in class folder 'alpha' \(label 0\) but "
                               r"the row says label 1 \('beta'\)",
    "folder-not-a-class": r"split\.csv:2: 'delta/x\.png' is not in one of the class folders",
    "file-at-top-level": r"split\.csv:2: path 'x\.png' is not inside a class folder",
    "absolute-path": r"split\.csv:2: path '/etc/passwd' must be relative",
    "parent-path": r"split\.csv:2: path 'alpha/\.\./\.\./x\.png' must be relative",
    "empty-path": r"split\.csv:2: empty path",
    "bad-split": r"split\.csv:2: split 'training' is not one of",
    "label-not-int": r"split\.csv:2: label '1\.0' is not an integer",
    "two-splits": r"split\.csv: alpha/alpha_000\.png is listed in two splits, train \(line 2\) and test \(line 62\)",
    "two-labels": r"split\.csv:62: alpha/alpha_000\.png is listed again with label 1 \(line 2 gives label 0\)",
    "short-row": r"split\.csv:2: too few fields",
    "long-row": r"split\.csv:2: more fields than the header",
}


@pytest.mark.parametrize("case", list(SPLIT_ERRORS))
def test_bad_split_rows_are_one_line_errors_naming_the_row(image_tree, tmp_path, case):
    split = _write_csv(tmp_path / "split.csv", _edit_rows(image_tree, case))
    with pytest.raises(BloodcellError, match=SPLIT_ERRORS[case]) as e:
        prepare_from_folder(image_tree, size=28, split_file=split, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content, match", [
    (b"", "split file is empty"),
    (b"path,label,split\n", "split file has no rows"),
    (b"file,label,split\nalpha/alpha_000.png,0,train\n", "expected columns path,label,split"),
    (b"path,label,split\n\xff\xfe,0,train\n", "not UTF-8 text"),
])
def test_malformed_split_files(image_tree, tmp_path, content, match):
    split = tmp_path / "split.csv"
    split.write_bytes(content)
    with pytest.raises(BloodcellError, match=match):
        read_split_file(split, image_tree, CLASSES)


def test_split_file_that_is_a_folder(image_tree, tmp_path):
    with pytest.raises(BloodcellError, match="is a folder, expected a split CSV file"):
        read_split_file(tmp_path, image_tree, CLASSES)


def test_split_header_case_and_spaces_and_normalised_paths(image_tree, tmp_path):
    rows = _split_rows(image_tree)
    rows[0][0] = "./" + rows[0][0].replace("/", "//")
    split = _write_csv(tmp_path / "split.csv", rows, header=(" Path", "LABEL ", "split"))
    out = read_split_file(split, image_tree, CLASSES)
    assert out[0] == ("alpha/alpha_000.png", 0, "train")


def test_exact_duplicate_rows_are_dropped_with_one_warning(image_tree, tmp_path, capsys):
    rows = _split_rows(image_tree)
    split = _write_csv(tmp_path / "split.csv", [*rows, rows[1], rows[1], rows[5]])
    notes: list[str] = []
    out = read_split_file(split, image_tree, CLASSES, notes)
    assert len(out) == len(rows)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bloodcell: warning: ") and "split.csv" in err[0]
    assert "alpha/alpha_001.jpg (lines 3, 62, 63)" in err[0] and "alpha/alpha_005.jpg (lines 7, 64)" in err[0]
    assert notes == [err[0].removeprefix("bloodcell: warning: ")]
    info = prepare_from_folder(image_tree, size=28, split_file=split, progress=False)
    assert info["counts"]["train"] == [12] * 3 and info["warnings"] == notes


# ---------------------------------------------------------------- 3. at least two classes
def test_one_class_folder_is_refused(tmp_path):
    (tmp_path / "src" / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "only" / "a.png")
    with pytest.raises(BloodcellError, match=r"need at least 2 classes, found 1 class folder \('only'\)"):
        prepare_from_folder(tmp_path / "src", size=28, progress=False)


@pytest.mark.parametrize("one_class_split, reason", [
    ("train", "a classifier needs at least 2 classes"),
    ("val", "AUC are undefined"),
    ("test", "AUC are undefined"),
])
def test_split_file_with_a_one_class_split_is_refused_before_decoding(image_tree, tmp_path, monkeypatch,
                                                                        one_class_split, reason):
    rows = [r for r in _split_rows(image_tree) if r[2] != one_class_split or r[1] == 0]
    split = _write_csv(tmp_path / "split.csv", rows)
    monkeypatch.setattr("bloodcell.data.sources.decode_all", lambda *a, **k: pytest.fail("decoded first"))
    with pytest.raises(BloodcellError, match=rf"need at least 2 classes in every split, but the {one_class_split} "
                                             rf"split has 1 \(alpha\): .*{reason}"):
        prepare_from_folder(image_tree, size=28, split_file=split, progress=False)


def test_split_file_with_one_class_overall_is_refused(image_tree, tmp_path):
    split = _write_csv(tmp_path / "split.csv", [r for r in _split_rows(image_tree) if r[1] == 0])
    with pytest.raises(BloodcellError, match="need at least 2 classes"):
        prepare_from_folder(image_tree, size=28, split_file=split, progress=False)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_npz_with_a_one_class_split_is_refused_at_prepare(tmp_path, split):
    arrays = synthetic_arrays({"train": 3, "val": 2, "test": 2}, size=8, k=3)
    arrays[f"{split}_labels"][:] = 1
    with pytest.raises(BloodcellError, match=f"the {split} split has 1 .label 1."):
        prepare_from_npz(_npz(tmp_path / "one.npz", arrays))


def test_loading_an_npz_needs_two_training_classes_but_allows_a_one_class_test_split(tmp_path):
    arrays = synthetic_arrays({"train": 3, "val": 2, "test": 2}, size=8, k=3)
    arrays["test_labels"][:] = 0  # can still be evaluated; its metrics say what is undefined
    assert load_dataset(_npz(tmp_path / "onetest.npz", arrays)).counts()["test"] == [6, 0, 0]
    arrays["train_labels"][:] = 0
    with pytest.raises(BloodcellError, match="train split has 1 .label 0.: a classifier needs at least 2"):
        load_dataset(_npz(tmp_path / "onetrain.npz", arrays))


def test_val_class_missing_from_train_is_refused_at_prepare(tmp_path):
    arrays = synthetic_arrays({"train": 3, "val": 2, "test": 2}, size=8, k=3)
    keep = arrays["train_labels"][:, 0] != 2
    arrays["train_images"], arrays["train_labels"] = arrays["train_images"][keep], arrays["train_labels"][keep]
    with pytest.raises(BloodcellError, match="val_labels has label.s. 2 that train_labels never has"):
        prepare_from_npz(_npz(tmp_path / "unseen.npz", arrays))


def test_class_folder_of_only_non_images_is_refused(image_tree):
    (image_tree / "delta").mkdir()
    (image_tree / "delta" / "notes.txt").write_text("not an image")
    (image_tree / "delta" / "table.csv").write_text("a,b\n")
    with pytest.raises(BloodcellError, match=r"delta: none of the 2 file\(s\) of class 'delta' could be decoded"):
        prepare_from_folder(image_tree, size=28, progress=False)


def test_class_folder_with_only_hidden_files_says_so(image_tree):
    (image_tree / "delta").mkdir()
    (image_tree / "delta" / ".DS_Store").write_bytes(b"\0" * 10)
    with pytest.raises(BloodcellError, match=r"class folder 'delta' is empty \(only hidden files: delta/\.DS_Store"):
        prepare_from_folder(image_tree, size=28, progress=False)


# ---------------------------------------------------------------- 4. file modes and strict JSON
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode_not_0600(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        write_json(tmp_path / "b.json", {"a": 1})
        atomic_write(tmp_path / "sub" / "c.bin", lambda tmp: Path(tmp).write_bytes(b"1"))
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json", "sub/c.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_prepared_dataset_files_are_readable_by_the_group(image_tree):
    old = os.umask(0o022)
    try:
        info = prepare_from_folder(image_tree, size=28, progress=False)
    finally:
        os.umask(old)
    for key in ("npz", "json"):
        assert stat.S_IMODE(Path(info[key]).stat().st_mode) == 0o644


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("value, expected", [
    (float("nan"), None), (float("inf"), None), (-float("inf"), None), (np.float32("nan"), None),
    (np.float64(0.5), 0.5), (np.int64(7), 7), (np.bool_(True), True), (np.array([1.0, np.nan]), [1.0, None]),
    ({"a": [1, (2.0, float("nan"))], "b": {"c": np.inf}}, {"a": [1, [2.0, None]], "b": {"c": None}}),
    ({np.int64(3): 1}, {"3": 1}), (Path("x/y"), "x/y"),
])
def test_write_json_is_strict_json(tmp_path, value, expected):
    write_json(tmp_path / "m.json", {"v": value})
    assert _strict((tmp_path / "m.json").read_text()) == {"v": expected}


def test_read_json_of_a_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(BloodcellError, match="is a folder, expected a JSON file"):
        read_json(tmp_path)


# ---------------------------------------------------------------- 5. npz files: not an npz, class count
def _not_npz(path: Path, kind: str) -> Path:
    if kind == "text":
        path.write_text("this is not an npz\n")
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "pickled-npy":
        with open(path, "wb") as f:
            np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"train_images": [1, 2]}))
    elif kind == "gzip":
        path.write_bytes(gzip.compress(b"x" * 100))
    return path


@pytest.mark.parametrize("kind, why", [
    ("text", "it is a text file"), ("random-bytes", "unrecognised binary data"), ("empty", "the file is empty"),
    ("npy", "a single .npy array"), ("pickled-npy", "a single .npy array"), ("pickle", "looks like a Python pickle"),
    ("gzip", "gzip-compressed"),
])
def test_a_file_that_is_not_an_npz_says_so(tmp_path, kind, why):
    path = _not_npz(tmp_path / "fake.npz", kind)
    with pytest.raises(BloodcellError, match=rf"fake\.npz: not an npz file \((it is |it )?{why}") as e:
        prepare_from_npz(path)
    assert "allow_pickle" not in str(e.value)


def test_npz_with_object_arrays_is_refused_without_suggesting_allow_pickle(tmp_path):
    arrays = synthetic_arrays({"train": 2, "val": 1, "test": 1}, size=8, k=2)
    arrays["train_labels"] = np.array([{"x": 1}] * 4, dtype=object)
    np.savez(tmp_path / "obj.npz", **arrays)
    with pytest.raises(BloodcellError, match="'train_labels' holds Python objects") as e:
        read_npz(tmp_path / "obj.npz")
    assert "allow_pickle" not in str(e.value)


@pytest.mark.parametrize("kind, match", [
    ("zip-of-text", "missing key.s. train_images"), ("truncated-zip", "not a valid npz file"),
    ("folder", "is a folder, expected an npz file"),
])
def test_broken_npz_containers(tmp_path, kind, match):
    path = tmp_path / "x.npz"
    if kind == "zip-of-text":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    elif kind == "truncated-zip":
        np.savez(path, **synthetic_arrays({"train": 2, "val": 1, "test": 1}, size=8, k=2))
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.mkdir()
    with pytest.raises(BloodcellError, match=match):
        read_npz(path)


@pytest.mark.parametrize("k", [3, 8, 10])
def test_npz_gets_its_own_class_count(tmp_path, k):
    path = _npz(tmp_path / f"k{k}.npz", synthetic_arrays({"train": 2, "val": 1, "test": 1}, size=8, k=k))
    expected = list(BLOODMNIST_CLASSES) if k == 8 else [f"class_{i}" for i in range(k)]
    # a plain npz file, no metadata
    assert load_dataset(path).class_names == expected
    # registered: BloodMNIST's name only for 8 classes, else the file's own name
    info = prepare_from_npz(path)
    assert info["class_names"] == expected and info["name"] == ("bloodmnist" if k == 8 else f"k{k}")
    assert info["counts"]["train"] == [2] * k and info["size"] == 8
    assert load_dataset(info["name"], 8).class_names == expected


def test_npz_class_names_can_be_given(tmp_path):
    path = _npz(tmp_path / "k3.npz", synthetic_arrays({"train": 2, "val": 1, "test": 1}, size=8, k=3))
    assert prepare_from_npz(path, name="three", class_names=["a", "b", "c"])["class_names"] == ["a", "b", "c"]
    for bad, match in ((["a", "b"], "only 2 names"), (["a", "a", "b"], "distinct"), ("abc", "list of distinct")):
        with pytest.raises(BloodcellError, match=match):
            prepare_from_npz(path, name="three", class_names=bad)


def test_npz_size_comes_from_the_file(tmp_path):
    path = _npz(tmp_path / "s.npz", synthetic_arrays({"train": 2, "val": 1, "test": 1}, size=12, k=2))
    assert prepare_from_npz(path, size=None)["size"] == 12
    with pytest.raises(BloodcellError, match="images are 12x12, but --size 28"):
        prepare_from_npz(path, size=28)


@pytest.mark.parametrize("edit, match", [
    (lambda a: a.update(train_labels=np.zeros((len(a["train_labels"]), 2), np.uint8)),
     r"shape \(\d+, 2\), expected N x 1"),
    (lambda a: a.update(train_labels=a["train_labels"].astype(np.int64) - 1), r"train_labels range -1\.\.0"),
    (lambda a: a.update(train_images=a["train_images"].astype(np.float32) / 255),
     r"dtype float32, expected uint8 .scale"),
    (lambda a: a.update(val_images=a["val_images"][..., 0]), r"val_images has shape .*expected N x S x S x 3"),
    (lambda a: a.update(test_labels=a["test_labels"][:1]), r"test has 2 images but 1 labels"),
    (lambda a: a.update(train_labels=a["train_labels"].astype(bool)), r"dtype bool, expected integers"),
])
def test_malformed_npz_arrays(tmp_path, edit, match):
    arrays = synthetic_arrays({"train": 2, "val": 1, "test": 1}, size=8, k=2)
    edit(arrays)
    with pytest.raises(BloodcellError, match=match):
        load_dataset(_npz(tmp_path / "bad.npz", arrays))


def test_more_than_256_classes_are_not_wrapped_to_uint8(tmp_path):
    k = 300
    arrays = {"train_images": np.zeros((k, 1, 1, 3), np.uint8), "train_labels": np.arange(k).reshape(-1, 1),
              "val_images": np.zeros((2, 1, 1, 3), np.uint8), "val_labels": np.array([[0], [k - 1]]),
              "test_images": np.zeros((2, 1, 1, 3), np.uint8), "test_labels": np.array([[1], [k - 2]])}
    write_dataset("many", 1, arrays, {"class_names": [f"c{i}" for i in range(k)]})
    d = load_dataset("many", 1)
    assert d.labels["train"].max() == k - 1 and d.labels["val"].tolist() == [0, k - 1]


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", ".hidden", " "])
def test_dataset_names_that_are_paths_are_refused(tmp_path, name):
    path = _npz(tmp_path / "k2.npz", synthetic_arrays({"train": 2, "val": 1, "test": 1}, size=8, k=2))
    with pytest.raises(BloodcellError, match="must be a plain name"):
        prepare_from_npz(path, name=name)


def test_dataset_metadata_that_is_not_an_object(tmp_path):
    arrays = synthetic_arrays({"train": 2, "val": 1, "test": 1}, size=8, k=2)
    path = _npz(tmp_path / "m.npz", arrays)
    (tmp_path / "m.json").write_text("[1, 2]")
    with pytest.raises(BloodcellError, match="m.json: dataset metadata must be a JSON object"):
        load_dataset(path)


# ---------------------------------------------------------------- 6. no download inside the loader
def test_loader_never_downloads(monkeypatch):
    import bloodcell.data.sources as sources

    monkeypatch.setattr(sources, "download_bloodmnist", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(BloodcellError, match=r"bloodcell data prepare --download --size 64"):
        load_dataset("bloodmnist", 64)


# ---------------------------------------------------------------- 7. popcount without np.bitwise_count
def test_popcount_matches_a_naive_count():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2**64, 2000, dtype=np.uint64, endpoint=False)
    x[:4] = [0, 1, 2**63, 2**64 - 1]
    assert popcount64(x).tolist() == [bin(int(v)).count("1") for v in x]


def test_hamming_pairs_work_without_bitwise_count(monkeypatch):
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # as on NumPy 1.x
    rng = np.random.default_rng(4)
    packed = rng.integers(0, 256, (150, 32), dtype=np.uint8)
    packed[10] = packed[2]
    packed[20] = packed[3] ^ np.eye(32, dtype=np.uint8)[0]  # one bit apart
    i, j, d = hamming_pairs(as_words(packed), 100, block=32)
    bits = np.unpackbits(packed, axis=1)
    full = (bits[:, None, :] != bits[None, :, :]).sum(2)
    ii, jj = np.nonzero(np.triu(full <= 100, k=1))
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(ii.tolist(), jj.tolist()))
    assert (d == full[i, j]).all() and {(2, 10), (3, 20)} <= set(zip(i.tolist(), j.tolist()))


# ---------------------------------------------------------------- 8. hidden files are named, not silently dropped
def _add_hidden(tree: Path) -> None:
    (tree / "alpha" / "._alpha_000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tree / "beta" / ".DS_Store").write_bytes(b"\0" * 16)
    (tree / "gamma" / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(tree / "gamma" / ".thumbs" / "t.png")


def test_prepare_names_every_hidden_file_it_skips(image_tree):
    _add_hidden(image_tree)
    info = prepare_from_folder(image_tree, size=28, progress=False)
    hidden = {s["path"]: s["reason"] for s in info["skipped"]}
    assert hidden == {"alpha/._alpha_000.jpg": "hidden file (name starts with '.'), not imported",
                      "beta/.DS_Store": "hidden file (name starts with '.'), not imported",
                      "gamma/.thumbs/": "hidden folder (name starts with '.'), not imported"}
    assert sum(sum(c) for c in info["counts"].values()) == 60
    assert json.loads(Path(info["json"]).read_text())["skipped"] == info["skipped"]
    assert prepare_from_folder(image_tree, size=28, progress=False)["reused"]


def test_hidden_files_keep_the_fingerprint_of_unchanged_inputs(image_tree):
    clean = prepare_from_folder(image_tree, size=28, progress=False)
    (image_tree / "beta" / ".DS_Store").write_bytes(b"\0")
    with_hidden = prepare_from_folder(image_tree, size=28, progress=False)
    assert not with_hidden["reused"] and with_hidden["skipped"][0]["path"] == "beta/.DS_Store"
    (image_tree / "beta" / ".DS_Store").unlink()
    again = prepare_from_folder(image_tree, size=28, progress=False)
    assert again["fingerprint"] == clean["fingerprint"] and again["skipped"] == []


def test_with_a_split_file_hidden_files_are_not_reported(image_tree, tmp_path):
    rows = _split_rows(image_tree)
    _add_hidden(image_tree)
    info = prepare_from_folder(image_tree, size=28, split_file=_write_csv(tmp_path / "s.csv", rows), progress=False)
    assert info["skipped"] == []


def test_scan_reports_hidden_files_in_sorted_order(image_tree):
    _add_hidden(image_tree)
    hidden: list[dict] = []
    classes, items = scan_class_folders(image_tree, hidden)
    assert [h["path"] for h in hidden] == ["alpha/._alpha_000.jpg", "beta/.DS_Store", "gamma/.thumbs/"]
    assert len(items) == 60 and items == sorted(items, key=lambda t: (t[1], Path(t[0])))


def test_audit_names_hidden_files_in_summary_and_json(image_tree, tmp_path):
    _add_hidden(image_tree)
    r = run_audit(image_tree, out=tmp_path / "audit")
    paths = ["alpha/._alpha_000.jpg", "beta/.DS_Store", "gamma/.thumbs/"]
    assert [h["path"] for h in r["hidden"]] == paths and r["summary"]["hidden"] == 3
    text = summary_text(r["summary"])
    assert "3 hidden skipped" in text and all(p in text for p in paths)
    saved = _strict((tmp_path / "audit" / "audit.json").read_text())
    assert [h["path"] for h in saved["hidden"]] == paths and saved["summary"]["images_read"] == 60
    assert "gamma/.thumbs/" in (tmp_path / "audit" / "audit.md").read_text()


# ---------------------------------------------------------------- 9. keyword-only parameters
@pytest.mark.parametrize("func", [prepare_from_folder, run_audit])
def test_everything_after_the_first_parameter_is_keyword_only(func):
    params = list(inspect.signature(func).parameters.values())
    assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
    with pytest.raises(TypeError):
        func("x", 64)


# ---------------------------------------------------------------- 10. the pixel limit
def _png(path: Path, side: int) -> Path:
    Image.new("RGB", (side, side), (200, 100, 50)).save(path)
    return path


def test_default_pixel_limit_is_pils():
    assert DEFAULT_MAX_PIXELS == 2 * 89_478_485 == 178_956_970


def test_images_over_the_limit_are_refused_per_file(tmp_path, default_pixel_limit):
    set_max_pixels(5000)
    with pytest.raises(ImageDecodeError, match=r"image has 10,000 pixels, over the --max-pixels limit of 5,000"):
        load_rgb(_png(tmp_path / "big.png", 100))
    assert load_rgb(_png(tmp_path / "small.png", 40)).size == (40, 40)
    set_max_pixels(None)
    assert load_rgb(tmp_path / "big.png").size == (100, 100)


@pytest.mark.parametrize("limit, side, warned", [(12000, 100, True), (30000, 100, False), (None, 100, False)])
def test_large_but_allowed_images_give_one_bloodcell_warning_line(tmp_path, capfd, default_pixel_limit,
                                                                  limit, side, warned):
    set_max_pixels(limit)
    path = _png(tmp_path / "big.png", side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_rgb(path).size == (side, side)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    if warned:
        assert len(err) == 1 and err[0].startswith(f"bloodcell: warning: {path}: 10,000 pixels is large"), err
        assert "--max-pixels limit of 12,000" in err[0] and "MB" in err[0]
    else:
        assert err == []


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "100"])
def test_set_max_pixels_refuses_bad_values(bad, default_pixel_limit):
    with pytest.raises(BloodcellError, match="--max-pixels"):
        set_max_pixels(bad)


def test_prepare_skips_a_file_over_the_limit_naming_it(image_tree, default_pixel_limit):
    _png(image_tree / "alpha" / "huge.png", 120)  # 14,400 pixels; the tree's images have 9,312
    set_max_pixels(10000)
    info = prepare_from_folder(image_tree, size=28, progress=False)
    assert [s["path"] for s in info["skipped"]] == ["alpha/huge.png"]
    assert "over the --max-pixels limit of 10,000" in info["skipped"][0]["reason"]


def test_set_max_pixels_sets_pils_limit_so_pil_never_refuses_first(default_pixel_limit):
    for n in (5000, 5001, DEFAULT_MAX_PIXELS):
        set_max_pixels(n)
        assert 2 * Image.MAX_IMAGE_PIXELS >= n and Image.MAX_IMAGE_PIXELS <= n // 2 + 1
    set_max_pixels(DEFAULT_MAX_PIXELS)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485


# ---------------------------------------------------------------- 11. other bad inputs
def _corrections_base(tmp_path):
    arrays = synthetic_arrays({"train": 3, "val": 2, "test": 2}, size=8, k=3)
    meta = {"class_names": ["a", "b", "c"],
            "paths": {s: [f"{s}/{i}.png" for i in range(len(arrays[f"{s}_labels"]))] for s in SPLITS}}
    return arrays, meta


@pytest.mark.parametrize("content, match", [
    (b"path,action,new_label\ntrain/0.png,relabel,b\ntrain/0.png,drop,\n", r"review\.csv:3: train #0 already has "
                                                                           r"an action on line 2"),
    (b"path,action\n\xff\xfe,drop\n", "not UTF-8 text"),
    (b"", "corrections file is empty"),
    (b"path,action,new_label\ntrain/0.png,relabel,x,y\n", "more fields than the header"),
    (b"split,index,action\ntrain,\xc2\xb2,drop\n", r"split 'train' / index '.' does not name an image"),
    (b"split,index,action\ntrain,-1,drop\n", r"index '-1' does not name an image"),
    (b"path,action,new_label\ntrain/0.png,relabel,\n", "relabel needs a new_label"),
    (b"path,action,new_label\ntrain/0.png,relabel,\xc2\xb2\n", "is not a class"),
])
def test_bad_correction_rows_are_one_line_errors(tmp_path, content, match):
    arrays, meta = _corrections_base(tmp_path)
    path = tmp_path / "review.csv"
    path.write_bytes(content)
    with pytest.raises(BloodcellError, match=match):
        apply_corrections(arrays, meta, path)


def test_corrections_with_a_bom_and_by_path_without_recorded_paths(tmp_path):
    arrays, meta = _corrections_base(tmp_path)
    path = tmp_path / "review.csv"
    path.write_bytes("path,action\ntrain/0.png,drop\n".encode("utf-8-sig"))
    out, new_meta, summary = apply_corrections(arrays, meta, path)
    assert summary["dropped"] == 1 and len(out["train_labels"]) == 8
    with pytest.raises(BloodcellError, match="recorded no file paths, so rows must name images by split and index"):
        apply_corrections(arrays, {"class_names": meta["class_names"]}, path)
    with pytest.raises(BloodcellError, match="is a folder"):
        apply_corrections(arrays, meta, tmp_path)


def test_corrections_that_leave_a_split_with_one_class_are_refused(image_tree, tmp_path):
    base = prepare_from_folder(image_tree, size=28, progress=False)
    drops = [p for p in base["paths"]["test"] if not p.startswith("alpha/")]
    fix = _write_csv(tmp_path / "review.csv", [[p, "drop"] for p in drops], header=("path", "action"))
    with pytest.raises(BloodcellError, match="test split has 1 .label 0.*AUC"):
        prepare_from_folder(image_tree, size=28, progress=False, corrections=fix)


@pytest.mark.parametrize("kwargs, match", [
    ({"workers": 0}, "--workers must be a whole number >= 1"), ({"workers": -2}, "--workers"),
    ({"seed": -1}, "--seed must be a whole number >= 0"), ({"name": "../x"}, "must be a plain name"),
    ({"corrections": "."}, "is a folder, expected a corrections CSV"),
])
def test_bad_prepare_options(image_tree, kwargs, match):
    with pytest.raises(BloodcellError, match=match):
        prepare_from_folder(image_tree, size=28, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": -1}, "--threshold must be a whole number >= 0"), ({"hash_size": 1}, "--hash-size"),
    ({"threshold": True}, "--threshold"), ({"workers": 0}, "--workers"),
    ({"split_file": "x.csv", "data": "bloodmnist", "source": None}, "--split-file applies to --source"),
])
def test_bad_audit_options(image_tree, tmp_path, kwargs, match):
    args = {"source": image_tree, "out": tmp_path / "a", **kwargs}
    with pytest.raises(BloodcellError, match=match):
        run_audit(args.pop("source"), **args)


def test_audit_of_a_tree_where_nothing_decodes(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        (tmp_path / "src" / c / "x.jpg").write_text("not an image")
    r = run_audit(tmp_path / "src", out=tmp_path / "out")
    assert r["summary"]["images_read"] == 0 and r["summary"]["unreadable"] == 2 and r["pairs"] == []


def test_unreadable_files_do_not_break_the_fingerprint(image_tree, monkeypatch):
    """A file that cannot be read (permission denied) fails later, in decoding, as a skipped file."""
    import bloodcell.data.sources as sources
    import bloodcell.io

    readable = sources.fingerprint(image_tree, ["alpha/alpha_003.jpg", "alpha/alpha_001.jpg"], {})

    def failing_open(path, *a, **k):
        if str(path).endswith("alpha_003.jpg"):
            raise PermissionError(13, "Permission denied")
        return open(path, *a, **k)

    monkeypatch.setattr(bloodcell.io, "open", failing_open, raising=False)  # file_sha256 reads it
    fp = sources.fingerprint(image_tree, ["alpha/alpha_003.jpg", "alpha/alpha_001.jpg"], {})
    assert len(fp) == 64 and fp != readable


@pytest.mark.parametrize("limit", [0, -1])
def test_stratified_subset_needs_a_positive_limit(limit):
    with pytest.raises(BloodcellError, match="subset limit"):
        stratified_subset(np.array([0, 1, 1]), limit, 0)


def test_balancing_target_must_be_positive():
    with pytest.raises(BloodcellError, match="balancing target"):
        target_counts(np.array([0, 1, 1]), 2, target=-3)


# ---------------------------------------------------------------- the real PBC folder (skipped when absent)
def test_real_pbc_hidden_file_is_found_and_split_csv_is_consistent(pbc, capsys):
    hidden: list[dict] = []
    classes, items = scan_class_folders(pbc, hidden)
    assert "neutrophil/.DS_169665.jpg" in [h["path"] for h in hidden]
    assert len(items) == 17092 and classes == list(BLOODMNIST_CLASSES)
    rows = read_split_file(pbc / "split.csv", pbc, classes)
    assert len(rows) == 17092 and capsys.readouterr().err == ""  # every label matches its folder, no duplicates
