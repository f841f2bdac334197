"""The CLI's behaviour on bad input: refused with a one-line error, or handled correctly, never a traceback.

One test (parametrised over its sub-cases) per point of the bad-input issue, numbered as there. The CLI runs
in-process (``bad_input_helpers.run_cli``) except where separate processes are the point (the run lock, and
``--help`` not importing torch).
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from bad_input_helpers import (
    assert_one_line_error,
    copy_run,
    edit_weights_meta,
    make_image_tree,
    no_speed,
    run_cli,
    save_png,
    strict_json,
    synthetic_arrays,
    train_tiny_run,
    write_npz,
)
from PIL import Image


# ---------------------------------------------------------------- module-wide data (built once)
@pytest.fixture(scope="module")
def mod_npz(tmp_path_factory) -> Path:
    """A MedMNIST-format npz, 8 classes at 28 px: 96 train, 32 val, 32 test images."""
    return write_npz(tmp_path_factory.mktemp("npz") / "cells28.npz", {"train": 12, "val": 4, "test": 4})


@pytest.fixture(scope="module")
def mod_run(mod_npz, tmp_path_factory) -> Path:
    """A finished SE-CNN run (1 epoch, 28 px) on ``mod_npz``; tests that change it use ``run_copy``."""
    return train_tiny_run(tmp_path_factory.mktemp("run") / "run", mod_npz)


@pytest.fixture
def run_copy(mod_run, tmp_path) -> Path:
    return copy_run(mod_run, tmp_path / "run")


@pytest.fixture
def cell_png(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "cell.png"
    Image.fromarray(rng.integers(0, 255, (60, 50, 3), dtype=np.uint8)).save(path)
    return path


def train_args(npz: Path, out: Path, *extra, **settings) -> list:
    """A tiny training; ``settings`` (e.g. epochs="0", batch_size="0") replace the defaults."""
    opts = {"epochs": "1", "batch_size": "16", "train_limit": "16", "threads": "1", **settings}
    flat = [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", v)]
    return ["train", "--data", npz, "--size", "28", *flat, "--out", out, *extra]


def split_rows(tree: Path) -> list[list[str]]:
    """path,label,split rows for every file of ``tree``: per class 12 train, 4 val, the rest test."""
    rows = []
    for c, name in enumerate(sorted(d.name for d in tree.iterdir() if d.is_dir())):
        for i, f in enumerate(sorted((tree / name).iterdir())):
            rows.append([f"{name}/{f.name}", str(c), "train" if i < 12 else "val" if i < 16 else "test"])
    return rows


def write_split(path: Path, rows, header=("path", "label", "split"), encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def prepare_args(tree: Path, data_dir: Path, *extra) -> list:
    return ["data", "prepare", "--source", tree, "--size", "28", "--workers", "1", "--data-dir", data_dir, *extra]


def prepared_counts(data_dir: Path, name: str) -> dict[str, int]:
    with np.load(data_dir / name / f"{name}_28.npz") as z:
        return {s: len(z[f"{s}_labels"]) for s in ("train", "val", "test")}


# ================================================================ silent wrong results
# ---- 1. train refuses epochs / batch size / lr that are not positive (0 is not "unset")
@pytest.mark.parametrize("setting, value", [
    ("epochs", "0"), ("epochs", "-2"), ("batch_size", "0"), ("lr", "0"), ("lr", "-0.01"),
], ids=["epochs0", "epochs-2", "batch0", "lr0", "lr-neg"])
def test_1_train_refuses_non_positive_settings(mod_npz, tmp_path, setting, value):
    out = tmp_path / "run"
    rc, so, se = run_cli(train_args(mod_npz, out, **{setting: value}))
    assert_one_line_error(rc, se, "--" + setting.replace("_", "-"))
    assert not (out / "best.safetensors").exists(), "trained although the setting was refused"


# ---- 1b. train refuses recipe options out of range (issue 32's warm-up, EMA, mix and jitter)
@pytest.mark.parametrize("setting, value", [
    ("warmup_epochs", "-1"), ("warmup_epochs", "5"), ("ema", "1"), ("ema", "-0.1"), ("mix", "blend"),
    ("mix_alpha", "0"), ("color_jitter", "1.5"), ("scale_jitter", "1"), ("scale_jitter", "x"),
], ids=["warmup-neg", "warmup-beyond-epochs", "ema1", "ema-neg", "mix-blend", "alpha0", "colour1.5", "scale1",
        "scale-x"])
def test_1b_train_refuses_recipe_options_out_of_range(mod_npz, tmp_path, setting, value):
    out = tmp_path / "run"
    rc, so, se = run_cli(train_args(mod_npz, out, **{setting: value}))
    assert_one_line_error(rc, se, ("--" + setting.replace("_", "-"), setting))
    assert not (out / "best.safetensors").exists(), "trained although the setting was refused"


# ---- 2. data prepare refuses a crop that is not positive
@pytest.mark.parametrize("crop", ["0", "-5"])
def test_2_prepare_refuses_non_positive_crop(image_tree, tmp_path, crop):
    rc, so, se = run_cli(prepare_args(image_tree, tmp_path / "ds", "--crop", crop))
    assert_one_line_error(rc, se, "--crop")


# ---- 3. split CSVs: label outside the class folders, duplicated rows, one file in two splits
@pytest.mark.parametrize("label", ["3", "-1"])
def test_3_split_label_outside_class_folders_is_an_error(image_tree, tmp_path, label):
    rows = split_rows(image_tree)
    rows[0][1] = label  # alpha/alpha_000.png: label 3 of 3 folders (0..2)
    csv_path = write_split(tmp_path / "split.csv", rows)
    rc, so, se = run_cli(prepare_args(image_tree, tmp_path / "ds", "--split-file", csv_path))
    assert_one_line_error(rc, se, "split.csv")


def test_3_split_duplicated_row_is_an_error_or_warned_and_counted_once(image_tree, tmp_path):
    rows = split_rows(image_tree)
    csv_path = write_split(tmp_path / "split.csv", [*rows, list(rows[1])])  # alpha_001, train, twice
    ds = tmp_path / "ds"
    rc, so, se = run_cli(prepare_args(image_tree, ds, "--split-file", csv_path, "--name", "dup"))
    if rc == 2:
        assert_one_line_error(rc, se, "split.csv")
        return
    assert rc == 0, (rc, se)
    assert "Traceback" not in se
    warned = [ln for ln in (so + se).splitlines() if "warn" in ln.lower() or "duplicate" in ln.lower()]
    assert warned and any("split.csv" in ln or rows[1][0] in ln for ln in warned), \
        f"no warning naming the file about the duplicated row; stdout {so!r} stderr {se!r}"
    assert prepared_counts(ds, "dup")["train"] == 36, "the duplicated row was imported twice"


def test_3_split_one_file_in_two_splits_is_an_error(image_tree, tmp_path):
    rows = split_rows(image_tree)
    leak = [rows[0][0], rows[0][1], "test"]  # alpha/alpha_000.png is in train already
    csv_path = write_split(tmp_path / "split.csv", [*rows, leak])
    rc, so, se = run_cli(prepare_args(image_tree, tmp_path / "ds", "--split-file", csv_path))
    assert_one_line_error(rc, se, ("alpha_000.png", "split.csv"))


# ---- 4. fewer than 2 classes is refused; metrics.json is strict JSON
@pytest.mark.parametrize("how", ["one-class-folder", "split-file-with-one-class"])
def test_4_one_class_is_refused(tmp_path, how):
    if how == "one-class-folder":
        tree = make_image_tree(tmp_path / "cells", classes=["alpha"], per_class=20)
        args = prepare_args(tree, tmp_path / "ds")
    else:
        tree = make_image_tree(tmp_path / "cells", per_class=20)
        rows = [r for r in split_rows(tree) if r[1] == "0"]
        args = prepare_args(tree, tmp_path / "ds", "--split-file", write_split(tmp_path / "split.csv", rows))
    rc, so, se = run_cli(args)
    assert_one_line_error(rc, se, "at least 2 classes")


@pytest.mark.parametrize("case", ["test-split-of-one-class", "diverged-weights"])
def test_4_metrics_json_never_contains_nan(tmp_path, case):
    arrays = synthetic_arrays({"train": 12, "val": 4, "test": 4}, size=28)
    extra: tuple = ()
    if case == "test-split-of-one-class":
        arrays["test_labels"][:] = 0  # only basophils in the test split: per-class scores and AUC undefined
    else:
        extra = ("--optimizer", "sgd", "--lr", "1e12")  # the weights blow up to inf/nan
    npz = tmp_path / "d.npz"
    np.savez(npz, **arrays)
    run = tmp_path / "run"
    rc, so, se = run_cli(["train", "--data", npz, "--size", "28", "--epochs", "1", "--threads", "1", "--out", run,
                          *extra])
    if rc != 0:  # refusing to go on with a diverged training is fine, as a one-line error
        assert case == "diverged-weights", (rc, se)
        assert_one_line_error(rc, se)
        if (run / "metrics.json").is_file():
            strict_json((run / "metrics.json").read_text())
        return
    rc, so, se = run_cli(["evaluate", run, "--split", "test", *no_speed(), "--json"])
    assert "Traceback" not in se
    if rc == 0:
        strict_json(so)
    else:  # only a diverged model may be refused, as a one-line error that says why
        assert case == "diverged-weights", (rc, se)
        assert_one_line_error(rc, se, re.compile(r"nan|finite|diverge|inf", re.I))
    strict_json((run / "metrics.json").read_text())


# ---- 5. two trainings into the same --out: an OS lock that names the holder and dies with it
def _lock_npz(tmp_path: Path) -> Path:
    return write_npz(tmp_path / "lock.npz", {"train": 40, "val": 2, "test": 2})  # 320 training images


def _start_training(npz: Path, out: Path, epochs: int = 3) -> tuple[subprocess.Popen, list]:
    cmd = [sys.executable, "-m", "bloodcell", "train", "--data", str(npz), "--size", "28", "--epochs", str(epochs),
           "--batch-size", "32", "--threads", "1", "--out", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (out / "config.json").is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if first.poll() is not None:
        pytest.fail(f"the first training ended before the test could start the second: rc {first.returncode}, "
                    f"stderr {first.stderr.read()[-400:]!r}")
    assert (out / "config.json").is_file(), "the first training wrote no config.json within 90 s"
    return first, cmd


@pytest.mark.parametrize("second", [[], ["--resume"]], ids=["plain", "resume"])
def test_5_second_training_into_same_out_names_the_holder_pid(tmp_path, second):
    out = tmp_path / "run"
    first, cmd = _start_training(_lock_npz(tmp_path), out)
    try:
        os.kill(first.pid, signal.SIGSTOP)  # frozen while holding its lock: no race with its end
        p = subprocess.run(cmd + second, capture_output=True, text=True, timeout=180)
        assert_one_line_error(p.returncode, p.stderr, str(first.pid))
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate()


def test_5_killed_training_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    first, _ = _start_training(_lock_npz(tmp_path), out)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    rc, so, se = run_cli(["train", "--resume", "--out", out, "--threads", "1"])
    assert rc == 0, f"resume after SIGKILL: rc {rc}, stderr {se.strip()[-400:]!r}"
    assert strict_json((out / "metrics.json").read_text())["training"]["epochs"] == 3


# ---- 6. predict --out: a real .xlsx (or refused), unknown extensions refused, --top-k positive
def test_6_predict_xlsx_is_a_real_spreadsheet_or_refused(mod_run, cell_png, tmp_path):
    out = tmp_path / "preds.xlsx"
    rc, so, se = run_cli(["predict", mod_run, cell_png, "--out", out])
    if rc != 0:
        assert_one_line_error(rc, se, ".xlsx")
        assert "cell.png" not in so and not out.exists(), "refused only after predicting"
        return
    import openpyxl

    try:
        wb = openpyxl.load_workbook(out)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{out.name} is not a spreadsheet: {type(e).__name__}: {e}")
    rows = [r for r in wb.active.iter_rows(values_only=True) if any(c is not None for c in r)]
    assert len(rows) == 2, rows
    assert any("path" in str(c).lower() for c in rows[0]), rows[0]
    assert any("cell.png" in str(c) for c in rows[1]), rows[1]


def test_6_predict_unknown_out_extension_is_refused_before_predicting(mod_run, cell_png, tmp_path):
    out = tmp_path / "preds.txt"
    rc, so, se = run_cli(["predict", mod_run, cell_png, "--out", out])
    assert_one_line_error(rc, se, ("preds.txt", ".txt"))
    assert "cell.png" not in so, f"predicted before refusing: {so!r}"
    assert not out.exists()


@pytest.mark.parametrize("k", ["0", "-1"])
def test_6_predict_refuses_non_positive_top_k(mod_run, cell_png, k):
    rc, so, se = run_cli(["predict", mod_run, cell_png, "--top-k", k])
    assert_one_line_error(rc, se, "--top-k")


# ---- 7. predict refuses weights whose class names disagree with the run
# the other header entries (e.g. a digest of the metadata) kept, now stale; or dropped, as in older weights files
HEADER_EXTRAS = {"header-kept": "keep", "header-dropped": "drop"}


@pytest.mark.parametrize("extras", ["header-kept", "header-dropped"])
@pytest.mark.parametrize("edit", ["reordered", "renamed"])
def test_7_predict_refuses_weights_whose_classes_disagree_with_the_run(run_copy, cell_png, edit, extras):
    def change(meta):
        names = meta["class_names"]
        if edit == "reordered":
            names[0], names[1] = names[1], names[0]
        else:
            names[0] = "not-a-cell"

    edit_weights_meta(run_copy / "best.safetensors", change, HEADER_EXTRAS[extras])
    rc, so, se = run_cli(["predict", run_copy, cell_png])
    assert_one_line_error(rc, se, "best.safetensors")
    rc, so, se = run_cli(["evaluate", run_copy, *no_speed()])
    assert_one_line_error(rc, se, "class")  # evaluate refuses too (the reference behaviour)


# ---- 8. files bloodcell writes honour the umask
def test_8_written_files_honour_the_umask(tiny_npz, tmp_path):
    ds, run = tmp_path / "ds", tmp_path / "run"
    old = os.umask(0o022)
    try:
        rc, so, se = run_cli(["data", "prepare", "--npz", tiny_npz, "--size", "28", "--data-dir", ds])
        assert rc == 0, se
        rc, so, se = run_cli(["train", "--data", "bloodmnist", "--data-dir", ds, "--size", "28", "--epochs", "1",
                              "--train-limit", "16", "--threads", "1", "--out", run])
        assert rc == 0, se
        rc, so, se = run_cli(["evaluate", run, *no_speed()])
        assert rc == 0, se
    finally:
        os.umask(old)
    files = [run / "config.json", run / "metrics.json", run / "best.safetensors",
             ds / "bloodmnist" / "bloodmnist_28.npz"]
    modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert all(m == "0o644" for m in modes.values()), f"expected 0o644 under umask 022: {modes}"


# ================================================================ tracebacks that must be one-line errors
# ---- 9. train --out / predict --out that cannot be written
@pytest.mark.parametrize("case", ["out-is-a-file", "out-under-a-file", "out-read-only"])
def test_9_train_out_that_cannot_be_written(mod_npz, tmp_path, case):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder\n")
    if case == "out-is-a-file":
        out = blocker
    elif case == "out-under-a-file":
        out = blocker / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores folder permissions (out-under-a-file covers this path for root)")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "run"
    try:
        rc, so, se = run_cli(train_args(mod_npz, out))
    finally:
        if case == "out-read-only":
            (tmp_path / "ro").chmod(0o755)
    assert_one_line_error(rc, se, (str(out), out.parent.name if case == "out-read-only" else "afile"))


@pytest.mark.parametrize("case", ["out-is-a-folder", "out-under-a-file"])
def test_9_predict_out_that_cannot_be_written(mod_run, cell_png, tmp_path, case):
    if case == "out-is-a-folder":
        out = tmp_path / "preds.csv"
        out.mkdir()
        named = "preds.csv"
    else:
        (tmp_path / "afile").write_text("x\n")
        out = tmp_path / "afile" / "preds.csv"
        named = "afile"
    rc, so, se = run_cli(["predict", mod_run, cell_png, "--out", out])
    assert_one_line_error(rc, se, named)


# ---- 10. train --resume after config.json was edited
CONFIG_EDITS = {  # edit -> what the error must name (besides no traceback)
    "empty-object": ("{}", [re.compile(r"\b(missing|lacks|required)\b", re.I),
                            re.compile(r"\b(model|data|size|epochs)\b")]),
    "epochs-five": ({"epochs": "five"}, ["epochs"]),
    "lr-negative": ({"lr": -1}, ["lr"]),
    "model-nope": ({"model": "nope"}, ["nope"]),
    "ema-one": ({"ema": 1.0}, ["ema"]),
    "mix-unknown": ({"mix": "blend"}, ["mix"]),
    "not-json": ("{not json", ["config.json"]),
    "json-list": ("[1, 2]", ["config.json"]),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_10_resume_with_an_edited_config_is_a_one_line_error(run_copy, monkeypatch, case):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # falling back to defaults must not reach the network
    edit, named = CONFIG_EDITS[case]
    cfg_path = run_copy / "config.json"
    if isinstance(edit, dict):
        cfg = json.loads(cfg_path.read_text())
        cfg["epochs"] += 1  # one more epoch than done, so the resume has to train
        cfg.update(edit)
        cfg_path.write_text(json.dumps(cfg))
    else:
        cfg_path.write_text(edit)
    rc, so, se = run_cli(["train", "--resume", "--out", run_copy, "--threads", "1"])
    line = assert_one_line_error(rc, se, *named, strip=(str(run_copy),))
    if case == "empty-object":
        assert "download" not in line.lower() and "medmnist" not in line.lower(), f"fell back to defaults: {line}"


# ---- 11. weights metadata with a bad recipe or normalisation
WEIGHTS_EDITS = {
    "crop-abc": lambda m: m["recipe"].update(crop="abc"),
    "no-recipe": lambda m: m.pop("recipe"),
    "bad-normalization": lambda m: m.update(normalization={"mean": [0.5], "std": "x"}),
}


@pytest.mark.parametrize("extras", ["header-kept", "header-dropped"])
@pytest.mark.parametrize("command", ["predict", "explain"])
@pytest.mark.parametrize("case", list(WEIGHTS_EDITS))
def test_11_bad_weights_metadata_is_a_one_line_error(run_copy, cell_png, tmp_path, case, command, extras):
    edit_weights_meta(run_copy / "best.safetensors", lambda m: (WEIGHTS_EDITS[case](m), None)[1],
                      HEADER_EXTRAS[extras])
    args = [command, run_copy, cell_png] + (["--out", tmp_path / "explain"] if command == "explain" else [])
    rc, so, se = run_cli(args)
    assert_one_line_error(rc, se, "best.safetensors")


# ================================================================ unclear messages and small wrongs
# ---- 12. a split CSV saved by Excel (UTF-8 with BOM)
def test_12_split_csv_with_bom_is_read(image_tree, tmp_path):
    csv_path = write_split(tmp_path / "split.csv", split_rows(image_tree), encoding="utf-8-sig")
    assert csv_path.read_bytes().startswith(b"\xef\xbb\xbf")
    ds = tmp_path / "ds"
    rc, so, se = run_cli(prepare_args(image_tree, ds, "--split-file", csv_path, "--name", "bom"))
    assert rc == 0, f"rc {rc}, stderr {se.strip()!r}"
    assert prepared_counts(ds, "bom") == {"train": 36, "val": 12, "test": 12}


# ---- 13. prepare --npz on a file that is not an npz
@pytest.mark.parametrize("kind", ["text", "random-bytes", "zip-of-text"])
def test_13_prepare_npz_of_a_non_npz_file_says_so(tmp_path, kind):
    path = tmp_path / "fake.npz"
    if kind == "text":
        path.write_text("this is not an npz\n")
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    rc, so, se = run_cli(["data", "prepare", "--npz", path, "--size", "28", "--data-dir", tmp_path / "ds"])
    line = assert_one_line_error(rc, se, "fake.npz", re.compile(r"not an? (valid )?(\S+ )?(\.)?npz", re.I))
    assert "pickle" not in line.lower(), f"mentions pickling: {line!r}"


# ---- 14. prepare --npz takes the size from the file
def test_14_prepare_npz_without_size_uses_the_files_size(tiny_npz, tmp_path):
    ds = tmp_path / "ds"
    rc, so, se = run_cli(["data", "prepare", "--npz", tiny_npz, "--data-dir", ds])
    assert rc == 0, f"rc {rc}, stderr {se.strip()!r}"
    assert "28px" in so and (ds / "bloodmnist" / "bloodmnist_28.npz").is_file(), so


# ---- 15. explain exits like predict when files cannot be read
@pytest.mark.parametrize("readable, expected", [(False, 1), (True, 0)], ids=["none-readable", "one-readable"])
def test_15_explain_exit_status_matches_predict(mod_run, cell_png, tmp_path, readable, expected):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    files = [bad, tmp_path / "missing.png"] + ([cell_png] if readable else [])
    rc_p, so_p, se_p = run_cli(["predict", mod_run, *files])
    rc_e, so_e, se_e = run_cli(["explain", mod_run, *files, "--out", tmp_path / "explain"])
    assert "Traceback" not in se_p + se_e
    assert (rc_p, rc_e) == (expected, expected), f"predict rc {rc_p}, explain rc {rc_e}; explain stderr {se_e!r}"


# ---- 16. a tiny image is classified with a warning
def test_16_tiny_image_is_classified_with_a_warning(mod_run, tmp_path):
    tiny = save_png(tmp_path / "tiny.png", (1, 1))
    normal = save_png(tmp_path / "normal.png", (200, 200))
    rc, so, se = run_cli(["predict", mod_run, tiny, normal])
    assert rc == 0, (rc, se)
    lines = (so + se).splitlines()
    result = [ln for ln in so.splitlines() if ln.startswith(f"{tiny}\t")]
    assert result and "ERROR" not in result[0], f"not classified: {so!r}"
    warned = [ln for ln in lines if "tiny.png" in ln and re.search(r"warn|smaller", ln, re.I)]
    assert warned, f"no warning that tiny.png is much smaller than the crop: stdout {so!r} stderr {se!r}"
    assert not [ln for ln in lines if "normal.png" in ln and re.search(r"warn|smaller", ln, re.I)], (so, se)


# ---- 17. --help: no torch, fast, descriptions, help texts
HELP_COMMANDS = [[], ["data"], ["data", "prepare"], ["data", "list"], ["data", "info"], ["data", "audit"],
                 ["models"], ["train"], ["evaluate"], ["predict"], ["explain"], ["errors"], ["review"],
                 ["benchmark"], ["benchmark", "compare"]]


def _subparsers(p) -> dict:
    return dict(p._subparsers._group_actions[0].choices) if p._subparsers else {}


def _walk(p, path=()):
    yield path, p
    for name, sp in _subparsers(p).items():
        yield from _walk(sp, (*path, name))


def _parser_for(cmd: list[str]):
    from bloodcell.cli import build_parser

    p = build_parser()
    for name in cmd:
        p = _subparsers(p)[name]
    return p


@pytest.mark.parametrize("cmd", HELP_COMMANDS, ids=lambda c: " ".join(c) or "bloodcell")
def test_17_help_does_not_import_torch(cmd):
    code = ("import sys\nfrom bloodcell.cli import build_parser\n"
            f"try:\n    build_parser().parse_args({[*cmd, '--help']!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "usage: bloodcell" in p.stdout, p.stderr[-500:]
    assert "TORCH False" in p.stderr, f"'bloodcell {' '.join(cmd)} --help' imported torch"


def test_17_help_is_fast():
    _parser_for([]).format_help()  # the first build may import modules
    slow = {}
    for cmd in HELP_COMMANDS:
        t0 = time.perf_counter()
        _parser_for(cmd).format_help()
        dt = time.perf_counter() - t0
        if dt >= 1.0:
            slow[" ".join(cmd) or "bloodcell"] = round(dt, 2)
    assert not slow, f"build_parser()+format_help() took >= 1 s: {slow}"


@pytest.mark.parametrize("cmd", [["data"], ["models"], ["data", "list"], ["data", "info"], ["data", "audit"],
                                 ["review"], ["errors"]], ids=" ".join)
def test_17_command_has_a_description(cmd):
    description = (_parser_for(cmd).description or "").strip()
    assert description, f"'bloodcell {' '.join(cmd)}' has no description"


DEFAULT_ONLY = re.compile(r"\(?\s*default:?\s*%\(default\)s\s*\)?|\(?\s*default:[^)]*\)?", re.I)


def test_17_split_and_checkpoint_options_have_real_help():
    bare = []
    for path, p in _walk(_parser_for([])):
        for a in p._actions:
            if {"--split", "--checkpoint"} & set(a.option_strings):
                rest = DEFAULT_ONLY.sub("", a.help or "").strip(" .;,:")
                if not re.search(r"[a-z]{3}", rest, re.I):
                    bare.append(f"bloodcell {' '.join(path)} {a.option_strings[0]}: {a.help!r}")
    assert not bare, "help is only the default: " + "; ".join(bare)


def test_17_required_options_do_not_show_default_none():
    shown = []
    for path, p in _walk(_parser_for([])):
        formatter = p._get_formatter()
        for a in p._actions:
            if a.required and a.help and "default: None" in formatter._expand_help(a):
                shown.append(f"bloodcell {' '.join(path)} {(a.option_strings or [a.dest])[0]}")
    assert not shown, f"required options showing '(default: None)': {shown}"


# ---- 18. --max-pixels: per-file error above it, one bloodcell warning line for a large-but-allowed image
def test_18_predict_max_pixels_gives_a_per_file_error(mod_run, tmp_path):
    big = save_png(tmp_path / "big.png", (100, 100))  # 10,000 pixels
    small = save_png(tmp_path / "small.png", (40, 40))
    rc, so, se = run_cli(["predict", mod_run, big, small, "--max-pixels", "5000"])
    assert rc == 0 and "Traceback" not in se, (rc, se)
    big_line = [ln for ln in so.splitlines() if ln.startswith(f"{big}\t")]
    assert big_line and "ERROR" in big_line[0], f"no per-file error for big.png: {so!r}"
    assert [ln for ln in so.splitlines() if ln.startswith(f"{small}\t") and "ERROR" not in ln], so


def test_18_prepare_max_pixels_skips_the_file_naming_it(image_tree, tmp_path):
    save_png(image_tree / "alpha" / "huge.png", (120, 120))  # 14,400 pixels; the tree's images have 9,312
    rc, so, se = run_cli(prepare_args(image_tree, tmp_path / "ds", "--max-pixels", "10000"))
    assert rc == 0 and "Traceback" not in se, (rc, se)
    assert re.search(r"huge\.png.*:", so) and "skipped 1 file" in so, f"huge.png not reported as skipped: {so!r}"


def test_18_large_but_allowed_image_gives_one_bloodcell_warning_line(mod_run, tmp_path):
    big = save_png(tmp_path / "big.png", (100, 100))  # 10,000 pixels: within --max-pixels, above half of it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, so, se = run_cli(["predict", mod_run, big, "--max-pixels", "12000"])
    assert rc == 0, (rc, se)
    assert [ln for ln in so.splitlines() if ln.startswith(f"{big}\t") and "ERROR" not in ln], so
    python_warnings = [f"{w.category.__name__}: {w.message}" for w in caught
                       if issubclass(w.category, Image.DecompressionBombWarning)]
    assert not python_warnings and "DecompressionBombWarning" not in se, python_warnings or se
    warning_lines = [ln for ln in se.splitlines() if "warn" in ln.lower()]
    assert len(warning_lines) <= 1 and all(ln.startswith("bloodcell: warning") for ln in warning_lines), se


def test_18_pil_decompression_bomb_warning_does_not_reach_the_user(mod_run, cell_png, tmp_path):
    """A PNG declaring 10,000 x 10,000 pixels (PIL's default warning band) and holding no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, so, se = run_cli(["predict", mod_run, bomb, cell_png])
    assert rc == 0 and "Traceback" not in se, (rc, se)
    assert [ln for ln in so.splitlines() if ln.startswith(f"{bomb}\t") and "ERROR" in ln], so
    python_warnings = [f"{w.category.__name__}: {w.message}" for w in caught
                       if issubclass(w.category, Image.DecompressionBombWarning)]
    assert not python_warnings, f"a Python warning, two lines on the user's stderr: {python_warnings}"
    warning_lines = [ln for ln in se.splitlines() if "warn" in ln.lower()]
    assert len(warning_lines) <= 1 and all(ln.startswith("bloodcell: warning") for ln in warning_lines), se


# ---- --device
def test_train_device_cpu_works(mod_npz, tmp_path):
    rc, so, se = run_cli(train_args(mod_npz, tmp_path / "run", "--device", "cpu"))
    assert rc == 0 and (tmp_path / "run" / "best.safetensors").is_file(), (rc, se.strip()[-300:])


def test_train_device_nonsense_is_refused_by_argparse(mod_npz, tmp_path):
    rc, so, se = run_cli(train_args(mod_npz, tmp_path / "run", "--device", "nonsense"))
    assert rc == 2 and "--device" in se and "Traceback" not in se, (rc, se)
    assert not (tmp_path / "run").exists()



# ---------------------------------------------------------------- found while exploring, beyond the list
def test_explain_takes_files_after_options(mod_run, cell_png, tmp_path):
    rc, so, se = run_cli(["explain", mod_run, "--out", tmp_path / "ex", cell_png])
    assert rc == 0 and so.startswith(f"{cell_png}\t"), (rc, se)
    rc, so, se = run_cli(["predict", mod_run, cell_png, "--no-such-option"])
    assert_one_line_error(rc, se, "unrecognized arguments: --no-such-option")


def test_explain_out_naming_a_file_is_refused(mod_run, cell_png):
    rc, so, se = run_cli(["explain", mod_run, cell_png, "--out", cell_png])
    assert_one_line_error(rc, se, "--out", "not a folder")


@pytest.mark.parametrize("control", ["\n", "\x0c", "\x00"], ids=["newline", "form-feed", "nul"])
def test_control_characters_in_a_split_csv_stay_in_one_line(image_tree, tmp_path, control):
    rows = split_rows(image_tree)
    rows[3][2] = f"tr{control}ain"
    rc, so, se = run_cli(prepare_args(image_tree, tmp_path / "ds", "--split-file",
                                      write_split(tmp_path / "split.csv", rows)))
    assert_one_line_error(rc, se)


def test_train_limit_below_the_class_count_is_refused(mod_npz, tmp_path):
    rc, so, se = run_cli(train_args(mod_npz, tmp_path / "run", train_limit="3"))
    assert_one_line_error(rc, se, "--train-limit 3", "8 classes")


def test_review_needs_two_folds(mod_npz):
    rc, so, se = run_cli(["review", "--data", mod_npz, "--size", "28", "--folds", "1", "--epochs", "1"])
    assert_one_line_error(rc, se, "--folds must be at least 2")


def test_float_image_with_nan_pixels_is_a_per_file_error(mod_run, cell_png, tmp_path):
    f = np.full((8, 8), 100, np.float32)
    f[0, :3] = [np.nan, np.inf, -np.inf]
    Image.fromarray(f).save(tmp_path / "nan.tif")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, so, se = run_cli(["predict", mod_run, tmp_path / "nan.tif", cell_png])
    assert rc == 0 and "nan.tif\tERROR: image has NaN or infinite pixel values" in so, (so, se)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_decoder_warnings_become_one_bloodcell_line(mod_run, tmp_path):
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(buf, "TIFF")
    (tmp_path / "t.tif").write_bytes(buf.getvalue()[:10])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, so, se = run_cli(["predict", mod_run, tmp_path / "t.tif"])
    assert rc == 1 and "t.tif\tERROR:" in so, (rc, so, se)
    assert not caught, [str(w.message) for w in caught]
    assert all(ln.startswith(("bloodcell: warning: ", "classified ")) for ln in se.splitlines()), se


def test_an_unexpected_exception_is_one_line_with_the_traceback_on_request(mod_run, cell_png, monkeypatch):
    from bloodcell.inference import Classifier

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Classifier, "predict_files", broken)
    rc, so, se = run_cli(["predict", mod_run, cell_png])
    assert rc == 3 and se.count("\n") == 1 and se.startswith("bloodcell: internal error: ZeroDivisionError: a bug")
    monkeypatch.setenv("BLOODCELL_DEBUG", "1")
    with pytest.raises(AssertionError, match="ZeroDivisionError"):  # run_cli: the exception escapes main
        run_cli(["predict", mod_run, cell_png])


# ---------------------------------------------------------------- ensembles and distillation (issue 32)
def _unfinished(tmp_path: Path, run: Path) -> Path:
    d = tmp_path / "unfinished"
    d.mkdir()
    (d / "config.json").write_text((run / "config.json").read_text())
    return d


def _bad_vote(tmp_path: Path, run: Path) -> Path:
    d = tmp_path / "ens"
    d.mkdir()
    (d / "ensemble.json").write_text(json.dumps({"format": "bloodcell-ensemble-1", "vote": "loudest",
                                                 "checkpoint": "best", "members": [{"path": str(run)}] * 2}))
    return d


ENSEMBLE_CASES = {  # args (given the module's run, a copy of it and tmp_path) -> what the one error line names
    "one-member": (lambda r, c, t: ["ensemble", r, "--out", t / "e"], ["at least 2 member runs"]),
    "member-missing": (lambda r, c, t: ["ensemble", r, t / "nowhere", "--out", t / "e"], ["nowhere", "not found"]),
    "member-twice": (lambda r, c, t: ["ensemble", r, r, "--out", t / "e"], ["given twice"]),
    "member-unfinished": (lambda r, c, t: ["ensemble", r, _unfinished(t, r), "--out", t / "e"],
                          ["unfinished", "not a finished run"]),
    "out-is-a-member": (lambda r, c, t: ["ensemble", r, c, "--out", c], ["--out", "member"]),
    "vote-unknown": (lambda r, c, t: ["ensemble", r, c, "--vote", "loudest", "--out", t / "e"], ["--vote"]),
    "ensemble-json-edited": (lambda r, c, t: ["evaluate", _bad_vote(t, r)], ["ensemble.json", "vote"]),
    "teacher-missing": (lambda r, c, t: ["train", "--teacher", t / "nowhere", "--out", t / "s"], ["--teacher"]),
    "alpha-out-of-range": (lambda r, c, t: ["train", "--teacher", r, "--distill-alpha", "1.5", "--out", t / "s"],
                           ["--distill-alpha"]),
    "temperature-zero": (lambda r, c, t: ["train", "--teacher", r, "--distill-temperature", "0", "--out", t / "s"],
                         ["--distill-temperature"]),
}


@pytest.mark.parametrize("case", list(ENSEMBLE_CASES))
def test_ensemble_and_teacher_bad_input_is_a_one_line_error(mod_run, mod_npz, run_copy, tmp_path, case):
    args, named = ENSEMBLE_CASES[case]
    argv = args(mod_run, run_copy, tmp_path)
    if argv[0] == "train":
        argv = [*train_args(mod_npz, argv[-1])[:-2], *argv[1:]]
    rc, so, se = run_cli(argv)
    assert_one_line_error(rc, se, *named)
    assert not (tmp_path / "e" / "ensemble.json").exists()
