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
        assert (len(v.args) in (0, 2) and v.tta == "none") or v.name == "adamw" or v.tta != "none", v
    assert "epochs20" not in recipe_ablation.variants(20)  # the base is the 20-epoch run
    assert recipe_ablation.variants(1)["warmup"].args == ("--warmup-epochs", "1")
