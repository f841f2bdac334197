"""Property-based tests of the CLI on hostile input: split CSVs for ``data prepare`` and image bytes for ``predict``.

Either the command succeeds with a correct result or it ends with a one-line error; an exception escaping
``main`` or a traceback on stderr is always a failure. Bounded to a few dozen examples each (no example
database is written).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from bad_input_helpers import assert_one_line_error, make_image_tree, run_cli, train_tiny_run, write_npz
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

SPLITS = ("train", "val", "test")
# The same examples every run (set BLOODCELL_FUZZ_RANDOM=1 to explore new ones); no example database is written.
FUZZ = dict(deadline=None, database=None, report_multiple_bugs=False,
            derandomize=os.environ.get("BLOODCELL_FUZZ_RANDOM") != "1",
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large])


# ================================================================ (a) split CSVs for data prepare
CLASS_FOLDERS = ["alpha", "beta", "gamma"]
FILES = [f"{c}/{c}_{i:03d}.{'png' if i % 2 == 0 else 'jpg'}" for c in CLASS_FOLDERS for i in range(4)]
FILES.append("alpha/sub/deep.png")
ROOT = "{ROOT}"  # stands for the image tree's absolute path in generated CSVs


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """alpha, beta, gamma with 4 images each (``FILES``), and one more in a nested folder alpha/sub/."""
    root = make_image_tree(tmp_path_factory.mktemp("fuzz_tree") / "cells", classes=CLASS_FOLDERS, per_class=4,
                           size=30)
    (root / "alpha" / "sub").mkdir()
    Image.open(root / "alpha" / "alpha_000.png").save(root / "alpha" / "sub" / "deep.png")
    assert sorted(f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file()) == sorted(FILES)
    return root


def label_of(path: str) -> str:
    return str(CLASS_FOLDERS.index(path.split("/")[0]))


def csv_text(header: list[str], rows: list[list[str]], bom: bool = False) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return ("\ufeff" if bom else "") + buf.getvalue()


# a valid split: per class files 0 and 1 train, 2 val, 3 test
BASE = [[f, label_of(f), ("train", "train", "val", "test")[int(f[-7:-4])]] for f in FILES[:-1]]
HEADER = ["path", "label", "split"]
KNOWN_CASES = {  # the traps found so far; always tried first
    "valid": csv_text(HEADER, BASE),
    "bom": csv_text(HEADER, BASE, bom=True),
    "exact-duplicate": csv_text(HEADER, [*BASE, BASE[0]]),
    "dot-slash-in-two-splits": csv_text(HEADER, [*BASE, ["./" + BASE[0][0], BASE[0][1], "test"]]),
    "absolute-paths": csv_text(HEADER, [[f"{ROOT}/{p}" if p.startswith("beta") else p, y, s] for p, y, s in BASE]),
    "dot-dot-path": csv_text(HEADER, [*BASE, ["../cells/" + FILES[-1], "0", "train"]]),
    "short-row": csv_text(HEADER, [*BASE, [FILES[-1]]]),
    "label-3": csv_text(HEADER, [*BASE, [FILES[-1], "3", "train"]]),
    "huge-label": csv_text(HEADER, [*BASE, [FILES[-1], "99999999999999999999999", "train"]]),
    "label-of-another-folder": csv_text(HEADER, [*BASE, [FILES[-1], "1", "train"]]),
    "one-class": csv_text(HEADER, [r for r in BASE if r[1] == "0"]),
    "form-feed-in-split": csv_text(HEADER, [*BASE, [FILES[-1], "0", "tr\x0cain"]]),
    "carriage-return-in-split": csv_text(HEADER, [*BASE, [FILES[-1], "0", "tr\rain"]]),
    "newline-in-label": csv_text(HEADER, [*BASE, [FILES[-1], "0\n1", "train"]]),
    "nul-in-path": csv_text(HEADER, [*BASE, ["alpha/\x00.png", "0", "train"]]),
    "header-only": csv_text(HEADER, []),
    "reordered-columns-extra": csv_text(["split", "note", "path", "label"], [[s, "n", p, y] for p, y, s in BASE]),
}

HEADER_FORMS = [lambda s: s, str.upper, str.title, lambda s: f" {s}", lambda s: f"{s} "]
ODD_LABELS = ["", " ", "x", "1.0", " 2 ", "+1", "-1", "3", "7", "99999999999999999999999", "1e3", "0x1", "٢", "１",
              "nan", "None", "1_0", "\t0", "0\n1"]
ODD_SPLITS = ["", "TRAIN", " test", "Val", "validation", "tr ain", "trainval", "None", "\ttest", "te\rst", "\x0c"]
ODD_PATHS = ["", " ", ".", "alpha", "alpha/", "alpha/sub", "alpha/missing.png", "delta/x.png", "../cells/alpha",
             "alpha\\alpha_000.png", "alpha/alpha_000.png\n", 'al"pha/x.png', "alpha/a,b.png", "/nonexistent.png",
             f"{ROOT}/alpha/alpha_000.png", "../cells/alpha/alpha_001.jpg", "alpha/./alpha_002.png", "~/x.png"]


@st.composite
def split_csvs(draw) -> str:
    """The text of a split CSV over ``FILES``, from valid to hostile (the tree's path written as ``ROOT``)."""
    order = draw(st.permutations(["path", "label", "split"]))
    if draw(st.integers(0, 9)) == 9:
        order = order[: draw(st.integers(0, 2))]  # a column missing
    header = list(order)
    if draw(st.booleans()):
        header.insert(draw(st.integers(0, len(header))), "note")
    header = [draw(st.sampled_from(HEADER_FORMS))(h) if draw(st.integers(0, 4)) == 4 else h for h in header]

    rows: list[dict] = []
    base_split = {p: sp for p, _, sp in BASE}
    for f in FILES:
        if draw(st.integers(0, 9)) == 9:
            continue
        split = draw(st.sampled_from(SPLITS)) if draw(st.integers(0, 5)) == 5 else base_split.get(f, "train")
        rows.append({"path": f, "label": label_of(f), "split": split})
    for r in rows:
        k = 40 - draw(st.integers(0, 40))  # 6..40: left as it is
        if k == 0:
            r["label"] = draw(st.sampled_from(ODD_LABELS) | st.integers(-5, 5).map(str) | st.text(max_size=3))
        elif k == 1:
            r["split"] = draw(st.sampled_from(ODD_SPLITS) | st.text(max_size=5))
        elif k == 2:
            r["path"] = draw(st.sampled_from(ODD_PATHS) | st.text(max_size=8))
        elif k == 3:
            r["path"] = "./" + r["path"]  # the same file under another spelling
        elif k == 4:
            r["path"] = f"{ROOT}/{r['path']}"  # an absolute path
        elif k == 5:
            r["path"] = f" {r['path']} "
    for _ in range(draw(st.integers(0, 2))):  # exact duplicates, or the same file with another label/split
        if rows:
            r = dict(draw(st.sampled_from(rows)))
            if draw(st.booleans()):
                r["split" if draw(st.booleans()) else "label"] = draw(st.sampled_from([*SPLITS, "0", "1", "2"]))
            rows.insert(draw(st.integers(0, len(rows))), r)
    if draw(st.booleans()):
        rows = draw(st.permutations(rows))

    buf = io.StringIO()
    csv.writer(buf, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])),
               lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerow(header)
    text = buf.getvalue()
    for r in rows:
        fields = [r.get(h.strip().lower(), "") if h.strip().lower() != "note" else "n" for h in header]
        shape = 19 - draw(st.integers(0, 19))  # 19: a normal row
        if shape == 0:
            fields = fields[:-1]  # a short row
        elif shape == 1:
            fields = [*fields, "extra"]  # a long row
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(fields)
        text += buf.getvalue()
        if draw(st.integers(0, 9)) == 9:
            text += "\n"  # a blank line
    return ("\ufeff" if draw(st.booleans()) else "") + text


def expected_dataset(text: str, root: Path) -> dict | None:
    """Per split {absolute path: label} when the CSV may be imported; None when it must be refused."""
    try:
        table = [r for r in csv.reader(io.StringIO(text.removeprefix("\ufeff"))) if r]
    except csv.Error:
        return None
    if len(table) < 2:
        return None
    names = [h.strip().lower() for h in table[0]]
    if not {"path", "label", "split"} <= set(names) or len(set(names)) < len(names):
        return None
    col = {n: names.index(n) for n in ("path", "label", "split")}
    seen: dict[str, tuple[int, str]] = {}
    for fields in table[1:]:
        if len(fields) <= max(col.values()):
            return None  # a short row without a path, label or split
        path, label, split = (fields[col[n]] for n in ("path", "label", "split"))
        p = path.strip()
        key = os.path.normpath(root / p)  # an absolute path or one with '..' may name a file of the tree too
        if not p or not Path(key).is_relative_to(root) or not Path(key).is_file():
            return None
        try:
            y = int(label)
        except ValueError:
            return None
        s = split.strip().lower()
        if s not in SPLITS:
            return None
        if seen.setdefault(key, (y, s)) != (y, s):
            return None  # one file with two labels, or in two splits
    out: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for key, (y, s) in seen.items():
        out[s][key] = y
    return out


def check_prepared(data_dir: Path, name: str, expected: dict, root: Path) -> None:
    meta = json.loads((data_dir / name / f"{name}_28.json").read_text())
    classes = meta["class_names"]
    assert len(classes) >= 2 and len(set(classes)) == len(classes) and set(classes) <= set(CLASS_FOLDERS), \
        f"class names {classes} are not distinct class folders of {CLASS_FOLDERS}"
    with np.load(data_dir / name / f"{name}_28.npz") as z:
        for s in SPLITS:
            labels = z[f"{s}_labels"].reshape(-1)
            keys = [os.path.normpath(root / p) for p in meta["paths"][s]]
            assert len(keys) == len(set(keys)), f"{s}: one file imported more than once: {meta['paths'][s]}"
            assert set(keys) == set(expected[s]), f"{s}: imported {sorted(keys)}, expected {sorted(expected[s])}"
            assert len(labels) == len(keys) == len(z[f"{s}_images"]), f"{s}: counts differ"
            for k, y in zip(keys, labels):
                assert int(y) == expected[s][k], f"{k}: label {int(y)}, the CSV says {expected[s][k]}"
                folder = Path(os.path.relpath(k, root)).parts[0]
                assert classes[int(y)] == folder, f"{k}: class {classes[int(y)]!r}, but its folder is {folder!r}"


def _with_examples(test):
    for text in KNOWN_CASES.values():
        test = example(text=text)(test)
    return test


@settings(max_examples=50, **FUZZ)
@given(text=split_csvs())
@_with_examples
def test_fuzz_split_csv(tree, tmp_path_factory, text):
    text = text.replace(ROOT, str(tree))
    work = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        csv_path = work / "split.csv"
        csv_path.write_text(text, encoding="utf-8", newline="")
        rc, so, se = run_cli(["data", "prepare", "--source", tree, "--split-file", csv_path, "--name", "fz",
                              "--size", "28", "--workers", "1", "--data-dir", work / "ds"])
        expected = expected_dataset(text, tree)
        if rc == 0:
            assert "Traceback" not in se
            assert expected is not None, f"accepted a split CSV that must be refused: {text!r}; stdout {so!r}"
            check_prepared(work / "ds", "fz", expected, tree)
        else:  # warnings may come first; the error is one line
            assert_one_line_error(rc, se, allow_warnings=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ================================================================ (b) image bytes for predict
@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("fuzz_run")
    npz = write_npz(base / "cells28.npz", {"train": 8, "val": 4, "test": 4})
    return train_tiny_run(base / "run", npz, extra=("--train-limit", "32"))


@pytest.fixture(scope="module")
def class_names(fuzz_run) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(fuzz_run / "best.safetensors"), "pt") as f:
        return json.loads(f.metadata()["bloodcell"])["class_names"]


MODE_FORMATS = {"L": ["PNG", "JPEG", "BMP", "TIFF", "GIF"], "RGB": ["PNG", "JPEG", "BMP", "TIFF", "WEBP"],
                "RGBA": ["PNG", "TIFF", "WEBP"], "P": ["PNG", "GIF", "BMP", "TIFF"], "I;16": ["PNG", "TIFF"],
                "1": ["PNG", "BMP", "TIFF"], "CMYK": ["JPEG", "TIFF"], "LA": ["PNG"], "I": ["TIFF"], "F": ["TIFF"]}
EXTENSIONS = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".PNG", ".txt", ".npz", ""]


def encode(arr: np.ndarray, mode: str, fmt: str) -> bytes:
    if mode == "I;16":
        img = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)  # uint16 -> mode I;16
    elif mode == "F":  # 32-bit float, with the odd values a float TIFF can hold
        f = arr[..., 0].astype(np.float32) * np.float32(300.0)
        n = min(3, f.size)
        f.flat[:n] = np.array([np.nan, np.inf, -np.inf], np.float32)[:n]
        img = Image.fromarray(f)
    else:
        img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds no image data (a decompression-bomb probe)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@st.composite
def image_files(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "random", "truncated", "valid", "header-only"]))
    if kind == "header-only":
        return png_header_only(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
    if kind == "random":
        prefix = draw(st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00"]))
        return prefix + draw(st.binary(max_size=600))
    w = draw(st.integers(1, 300))
    h = draw(st.integers(1, max(1, min(300, 3000 // w))))
    seed = draw(st.integers(0, 2**16))
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    mode = draw(st.sampled_from(sorted(MODE_FORMATS)))
    data = encode(arr, mode, draw(st.sampled_from(MODE_FORMATS[mode])))
    if kind == "truncated":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return data


def _known_images() -> dict[str, tuple[bytes, str]]:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    f = np.full((8, 8), 100.0, np.float32)
    f[0, :3] = [np.nan, np.inf, -np.inf]
    buf = io.BytesIO()
    Image.fromarray(f).save(buf, format="TIFF")
    return {
        "1x1": (encode(rgb[:1, :1], "RGB", "PNG"), ".png"),
        "300x1": (encode(np.resize(rgb, (1, 300, 3)), "RGB", "PNG"), ".png"),
        "header-only-10000x10000": (png_header_only(10000, 10000), ".png"),
        "header-only-huge": (png_header_only(2**31 - 1, 2**31 - 1), ".png"),
        "truncated-tiff": (encode(rgb, "RGB", "TIFF")[:10], ".tif"),
        "truncated-jpeg": (encode(rgb, "RGB", "JPEG")[:200], ".jpg"),
        "float-tiff-nan-inf": (buf.getvalue(), ".tif"),
        "cmyk-jpeg": (encode(rgb, "CMYK", "JPEG"), ".jpg"),
        "png-named-txt": (encode(rgb, "RGB", "PNG"), ".txt"),
        "empty": (b"", ".png"),
    }


def _with_images(test):
    for content, ext in _known_images().values():
        test = example(content=content, ext=ext)(test)
    return test


@settings(max_examples=60, **FUZZ)
@given(content=image_files(), ext=st.sampled_from(EXTENSIONS))
@_with_images
def test_fuzz_predict_image_bytes(fuzz_run, class_names, tmp_path_factory, content, ext):
    work = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        path = work / f"img{ext}"
        path.write_bytes(content)
        rc, so, se = run_cli(["predict", fuzz_run, path])
        assert "Traceback" not in se, se
        assert rc in (0, 1), f"exit status {rc}; stderr {se!r}"
        results = [ln for ln in so.splitlines() if ln.startswith(f"{path}\t")]
        others = [ln for ln in so.splitlines() if not ln.startswith(f"{path}\t")]
        assert len(results) == 1, f"expected one result line for {path.name}: {so!r}"
        assert all(re.search("warn", ln, re.I) for ln in others), f"stray stdout lines: {others}"
        fields = results[0].split("\t")
        if rc == 0:
            assert fields[1] in class_names, results[0]
            assert 0.0 <= float(fields[2]) <= 1.0, results[0]
        else:
            assert fields[1].startswith("ERROR: ") and fields[1][len("ERROR: "):].strip(), results[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
