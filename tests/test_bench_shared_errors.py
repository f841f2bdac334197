"""benchmarks/shared_errors.py: the error-overlap counts by hand, and the script end to end on a tiny run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_error_overlap_counts_images_by_how_many_members_miss_them():
    from shared_errors import error_overlap

    labels = np.array([0, 1, 2, 3, 4])
    preds = np.array([[0, 1, 0, 0, 4],   # misses images 2, 3
                      [0, 0, 0, 3, 4],   # misses 1, 2
                      [0, 1, 0, 0, 0]])  # misses 2, 3, 4
    out = error_overlap(labels, preds)
    assert out["member_accuracy"] == [0.6, 0.6, 0.4]
    assert (out["wrong_by_all"], out["wrong_by_majority"], out["wrong_by_any"]) == (1, 2, 4)
    assert out["oracle_accuracy"] == 0.8  # only image 2 has no member right


def test_the_report_lists_the_images_every_run_misses(run, tmp_path):
    import shared_errors

    report = tmp_path / "shared.md"
    shared_errors.main(["--data", "bloodmnist", "--size", "28", "--report", str(report), str(run), str(run)])
    saved = json.loads(report.with_suffix(".json").read_text())
    assert saved["members"] == 2 and saved["images"] == 32
    # two copies of one run miss exactly the same images: all = majority = any, and the vote is the run
    assert saved["wrong_by_all"] == saved["wrong_by_majority"] == saved["wrong_by_any"] == len(
        saved["wrong_by_all_images"])
    assert saved["soft_vote_accuracy"] == saved["member_accuracy"][0] == round(1 - saved["wrong_by_all"] / 32, 4)
    text = report.read_text()
    assert "python benchmarks/shared_errors.py --data bloodmnist" in text and saved["machine"]["cpu"] in text


def test_a_missing_run_is_one_line_not_a_traceback(prepared, tmp_path):
    import pytest
    import shared_errors

    with pytest.raises(SystemExit, match=r"shared_errors.py: .*nope"):
        shared_errors.main(["--data", prepared, "--size", "28", str(tmp_path / "nope")])
