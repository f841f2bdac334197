"""benchmarks/recipe_ablation.py on the tiny fixture data: the base, one variant and the TTA row, then a second
call that finds every run finished and trains nothing (the ablation is resumable)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bloodcell.data.sources import prepare_from_npz

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_smoke_ablation_writes_the_table_and_resumes(tiny_npz, tmp_path, monkeypatch):
    import recipe_ablation

    prepare_from_npz(tiny_npz)  # "bloodmnist" at 28 px in this test's BLOODCELL_DATA_DIR
    report = tmp_path / "results" / "ablation.md"
    argv = ["--data", "bloodmnist", "--size", "28", "--epochs", "1", "--seeds", "0", "--train-limit", "32",
            "--threads", "1", "--variants", "base,mixup,tta-dihedral", "--out", str(tmp_path / "runs"),
            "--report", str(report)]
    assert recipe_ablation.main(argv) == 0
    saved = json.loads(report.with_suffix(".json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["base", "mixup", "tta-dihedral"]
    assert json.loads((tmp_path / "runs" / "mixup" / "seed0" / "config.json").read_text())["mix"] == "mixup"
    assert all(v["n"] == 1 and 0 <= v["accuracy_mean"] <= 1 for v in saved["variants"])
    assert saved["variants"][0]["cpu_minutes_mean"] > 0 and saved["machine"]["cpu"]
    text = report.read_text()
    assert "python benchmarks/recipe_ablation.py --data bloodmnist" in text and saved["machine"]["cpu"] in text
    assert "| mixup | mixup (alpha 0.2) |" in text and "delta vs base" in text

    def no_child(*a, **k):
        raise AssertionError(f"a finished ablation started {a[0]}")

    monkeypatch.setattr(subprocess, "run", no_child)
    assert recipe_ablation.main(argv) == 0  # every run finished: nothing trains or evaluates again


def test_every_variant_changes_exactly_one_setting():
    import recipe_ablation

    for v in recipe_ablation.variants(20).values():
        one_setting = len(v.args) in (0, 2) and v.tta == "none"
        assert one_setting or v.name in ("adamw", "adamw-ls", "issue-probe") or v.tta != "none", v
    assert "epochs20" not in recipe_ablation.variants(20)  # the base is the 20-epoch run
    assert recipe_ablation.variants(1)["warmup"].args == ("--warmup-epochs", "1")


def test_committed_corrections_drop_the_flagged_images_of_the_real_split_and_leave_test_alone(pbc):
    """The drop-flagged variant's CSV (and the conflicting-duplicate one) apply to the real PBC split: 34 flagged
    train/val images go, the neutrophil copy of the pixel-identical eosinophil image among them; test is untouched."""
    import numpy as np
    import recipe_ablation

    from bloodcell.data.sources import prepare_from_folder
    from bloodcell.data.store import read_npz

    split = pbc / "split.csv"
    base = prepare_from_folder(pbc, size=28, split_file=split, progress=False, name="pbc")
    fixed = prepare_from_folder(pbc, size=28, split_file=split, progress=False, name="pbc-fixed",
                                corrections=recipe_ablation.FLAGGED)
    dup = prepare_from_folder(pbc, size=28, split_file=split, progress=False, name="pbc-dup",
                              corrections=recipe_ablation.REVIEW / "corrections_conflicting_duplicate.csv")
    assert fixed["corrections"]["dropped"] == 34 and fixed["corrections"]["relabelled"] == 0
    assert sum(base["counts"]["train"]) - sum(fixed["counts"]["train"]) == 28
    assert sum(base["counts"]["val"]) - sum(fixed["counts"]["val"]) == 6
    assert sum(base["counts"]["train"]) - sum(dup["counts"]["train"]) == 1
    for info in (fixed, dup):
        assert "neutrophil/BNE_191112.jpg" not in info["paths"]["train"]
        assert "eosinophil/EO_225902.jpg" in info["paths"]["train"]  # the same pixels stay, as eosinophil
        a, b = read_npz(base["npz"]), read_npz(info["npz"])
        assert np.array_equal(a["test_images"], b["test_images"]) and np.array_equal(a["test_labels"], b["test_labels"])


def test_the_base_is_pinned_as_options_so_later_runs_train_what_the_finished_ones_did():
    import recipe_ablation

    from bloodcell.cli import build_parser

    a = build_parser().parse_args(["train", "--model", "se-cnn", "--out", "x", *recipe_ablation.base_args()])
    for field, value in recipe_ablation.ABLATION_BASE.items():
        assert getattr(a, field) == value, field
    for v in recipe_ablation.variants(20).values():  # a variant is the base plus its own options, nothing else
        if v.args:
            b = build_parser().parse_args(["train", "--model", "se-cnn", "--out", "x", *recipe_ablation.base_args(),
                                           *v.args])
            changed = {f for f, value in recipe_ablation.ABLATION_BASE.items() if getattr(b, f) != value}
            named = all(f"--{f.replace('_', '-')}" in v.args for f in changed)
            assert (changed or "--epochs" in v.args) and named, v.name


def test_report_only_tables_the_finished_seeds_and_trains_nothing(tiny_npz, tmp_path, monkeypatch, capsys):
    import recipe_ablation

    prepare_from_npz(tiny_npz)
    common = ["--data", "bloodmnist", "--size", "28", "--epochs", "1", "--train-limit", "32", "--threads", "1",
              "--out", str(tmp_path / "runs")]
    assert recipe_ablation.main([*common, "--seeds", "0", "--variants", "base",
                                 "--report", str(tmp_path / "first.md")]) == 0
    assert recipe_ablation.main([*common, "--seeds", "1", "--variants", "mixup",
                                 "--report", str(tmp_path / "second.md")]) == 0

    def no_child(*a, **k):
        raise AssertionError(f"--report-only started {a[0]}")

    monkeypatch.setattr(subprocess, "run", no_child)
    report = tmp_path / "all.md"
    argv = [*common, "--seeds", "0,1", "--variants", "base,mixup,ema,tta-dihedral", "--report-only",
            "--report", str(report)]
    assert recipe_ablation.main(argv) == 0
    saved = json.loads(report.with_suffix(".json").read_text())
    # base has seed 0 only, mixup seed 1 only; ema and the TTA evaluation were never run, so they have no row
    assert {v["name"]: v["seed_list"] for v in saved["variants"]} == {"base": [0], "mixup": [1]}
    text = report.read_text()
    assert "Report of the finished runs (nothing trained)" in text and "| base |" in text and "| ema |" not in text
    assert saved["variants"][0]["machines"][0] in text
    capsys.readouterr()
    assert recipe_ablation.main([*common, "--seeds", "2", "--variants", "base", "--report-only",
                                 "--report", str(report)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("recipe_ablation: error: no finished runs of base for seeds 2") and "\n" not in err


def test_the_delta_compares_the_base_over_the_variants_own_seeds():
    import recipe_ablation

    base = {"seeds": [{"seed": 0, "accuracy": 0.97}, {"seed": 1, "accuracy": 0.98}, {"seed": 2, "accuracy": 0.90}]}
    two = {"seeds": [{"seed": 0, "accuracy": 0.975}, {"seed": 1, "accuracy": 0.985}]}
    assert recipe_ablation.paired_delta(two, base) == "+0.0050"  # not against the base's 3-seed mean of 0.95
    assert recipe_ablation.paired_delta({"seeds": [{"seed": 5, "accuracy": 0.99}]}, base) == ""
