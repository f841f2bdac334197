"""The suite runner on tiny synthetic data: skip, resume, seed aggregation, the table and figure writers, compare."""

import csv
import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_arrays

from bloodcell import paper
from bloodcell.cli import main
from bloodcell.data.sources import prepare_from_npz
from bloodcell.errors import BloodcellError
from bloodcell.evaluation import benchmark, suites
from bloodcell.machine import cpu_name
from bloodcell.models import list_models
from bloodcell.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
FAST = dict(data="tiny", size=28, epochs=2, threads=1)
QUIET = dict(log=lambda s: None)


@pytest.fixture
def tiny(tmp_path):
    """Imbalanced 8-class data at 28x28: class c has 11 + c training images."""
    arrays = synthetic_arrays({"train": 10, "val": 3, "test": 3}, size=28)
    keep = np.concatenate([np.flatnonzero(arrays["train_labels"][:, 0] == c)[: 3 + c] for c in range(8)])
    extra = synthetic_arrays({"train": 8}, size=28, seed=1)
    arrays["train_images"] = np.concatenate([arrays["train_images"][keep], extra["train_images"]])
    arrays["train_labels"] = np.concatenate([arrays["train_labels"][keep], extra["train_labels"]])
    path = tmp_path / "tiny.npz"
    np.savez(path, **arrays)
    prepare_from_npz(path, name="tiny", size=28)
    return "tiny"


def run_config(config: dict) -> TrainConfig:
    """The settings a suite entry trains with (the paper's plus its own), for seed 0 on 'tiny'."""
    return benchmark.entry_config(config, seed=0, data="tiny", size=64, data_dir=None, epochs=None, threads=None)


def table(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_suite_entry_is_a_valid_run_of_a_registered_model():
    for suite in suites.SUITES.values():
        assert len({e.name for e in suite.entries}) == len(suite.entries)
        for e in suite.entries:
            assert e.config["model"] in {s.name for s in list_models()}
            run_config(e.config)  # the settings it trains with are valid
    assert len(suites.get_suite("paper-table2").entries) == 13
    t3 = suites.get_suite("paper-table3")
    assert [e.name for e in t3.entries][:11] == list(suites.TABLE3_ORDER)
    assert t3.select(["se-cnn"])[0].paper == {"accuracy": 0.9792, "f1_weighted": 0.9819, "precision_weighted": 0.9819,
                                              "recall_weighted": 0.9819, "first_epoch_seconds": 21}
    assert paper.paper_numbers("cnn-t2-5") == {"accuracy": 0.95, "f1_weighted": 0.95}
    assert paper.paper_numbers("cnn-t2-9") == {"accuracy": 0.90, "f1_weighted": 0.91}
    # the paper's settings: compounding schedule, no augmentation, last epoch tested, SGD for ResNet via the registry
    resnet = t3.select(["resnet34"])[0]
    cfg = run_config(resnet.config)
    assert (cfg.schedule, cfg.augment, cfg.optimizer, resnet.checkpoint) == ("paper", "none", None, "last")
    assert run_config(t3.select(["resnet34-sound"])[0].config).optimizer == "adam"
    with pytest.raises(BloodcellError, match="no entry nope"):
        t3.select(["nope"])
    with pytest.raises(BloodcellError, match="unknown suite"):
        suites.get_suite("paper-table9")


def test_suite_runs_skips_finished_runs_and_reports(tiny, tmp_path):
    out = tmp_path / "bench"
    r = benchmark.run_suite("paper-table2", seeds=[0, 1], out=out, models=["cnn-t2-2", "cnn-t2-5"], **FAST, **QUIET)
    root = out / "paper-table2"
    for name in ("RESULTS.md", "results.csv", "runs.csv", "results.json", "f1_per_model.png",
                 "f1_vs_time_size.png", "val_acc_per_epoch.png", "training_curves.png"):
        assert (root / name).stat().st_size > 0, name
    assert [g["label"] for g in r["groups"]] == ["cnn-t2-2", "cnn-t2-5"]
    for entry in ("cnn-t2-2", "cnn-t2-5"):
        for seed in (0, 1):
            m = json.loads((root / entry / f"seed{seed}" / "metrics.json").read_text())
            assert m["test"]["checkpoint"] == "last" and m["training"]["epochs"] == 2
    assert "Not run yet (no finished run): cnn-t2-1, cnn-t2-3, cnn-t2-4, cnn-t2-6," in (root / "RESULTS.md").read_text()
    for row in table(root / "runs.csv"):  # how busy the machine was in each run's first epoch, as it logged it
        assert float(row["first_epoch_load"]) == float(table(Path(row["run"]) / "history.csv")[0]["load"])
    weights = root / "cnn-t2-2" / "seed0" / "last.safetensors"
    stamp = weights.stat().st_mtime_ns
    lines = []
    benchmark.run_suite("paper-table2", seeds=[0, 1], out=out, models=["cnn-t2-2", "cnn-t2-5"], **FAST,
                        log=lines.append)
    assert weights.stat().st_mtime_ns == stamp  # nothing retrained
    assert not any("new" in x or "resuming" in x for x in lines if x.startswith("["))
    assert all(x.startswith("done") for x in lines[:4])
    # the committed copies (no weights) are enough to rebuild the same table
    sync = importlib.import_module("sync_paper_results")
    assert sync.sync(out, tmp_path / "copy") > 0
    assert not list((tmp_path / "copy").rglob("*.safetensors"))
    benchmark.suite_report("paper-table2", tmp_path / "copy")
    assert table(tmp_path / "copy" / "paper-table2" / "results.csv") == table(root / "results.csv")
    # a fresh clone: the copies restored into an empty runs root are skipped, and a seed they lack is trained
    fresh = tmp_path / "fresh"
    assert sync.restore(tmp_path / "copy", fresh) == 4
    assert sync.restore(tmp_path / "copy", fresh) == 0  # never overwrites a run folder that is there
    lines = []
    r = benchmark.run_suite("paper-table2", seeds=[0, 1, 2], out=fresh, models=["cnn-t2-2"], **FAST, log=lines.append)
    assert [x.split()[0] for x in lines[:3]] == ["done", "done", "new"]
    assert [x["seed"] for x in r["groups"][0]["runs"]] == [0, 1, 2]
    # a different setting in the same folder is refused, not silently mixed
    with pytest.raises(BloodcellError, match="other settings.*epochs 2 vs 3"):
        benchmark.run_suite("paper-table2", seeds=[0], out=out, models=["cnn-t2-2"], **{**FAST, "epochs": 3}, **QUIET)


def test_interrupted_suite_run_resumes_to_the_uninterrupted_result(tiny, tmp_path):
    out = tmp_path / "bench"
    cfg = benchmark.entry_config(suites.get_suite("paper-table2").select(["cnn-t2-1"])[0].config, seed=0,
                                 data="tiny", size=28, data_dir=None, epochs=2, threads=1)
    run = out / "paper-table2" / "cnn-t2-1" / "seed0"

    def stop_after_first_epoch(line):
        if line.startswith("epoch   1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, log=stop_after_first_epoch)
    assert benchmark.run_state(run, cfg, "last") == "resume"
    benchmark.run_suite("paper-table2", seeds=[0], out=out, models=["cnn-t2-1"], **FAST, **QUIET)
    resumed = table(run / "history.csv")
    train(cfg, tmp_path / "straight", **QUIET)
    straight = table(tmp_path / "straight" / "history.csv")
    assert len(resumed) == 2
    for a, b in zip(resumed, straight):
        assert a["train_loss"] == b["train_loss"] and a["val_acc"] == b["val_acc"]
    assert benchmark.run_state(run, cfg, "last") == "done"


def test_oversampling_suite_balances_training_only_and_reuses_the_identical_table2_run(tiny, tmp_path):
    out = tmp_path / "bench"
    benchmark.run_suite("paper-table2", seeds=[0], out=out, models=["cnn-t2-5"], **FAST, **QUIET)
    lines = []
    r = benchmark.run_suite("paper-oversampling", seeds=[0], out=out, **FAST, log=lines.append)
    assert any("same settings as the finished" in x and "cnn-t2-5" in x for x in lines)
    root = out / "paper-oversampling"
    counts = {e: json.loads((root / e / "seed0" / "metrics.json").read_text())["training"]["train_class_counts"]
              for e in ("as-is", "augment", "smote", "class-weight")}
    assert counts["as-is"] == counts["class-weight"] == [11 + c for c in range(8)]
    assert counts["augment"] == counts["smote"] == [18] * 8
    for e in counts:  # validation and test are never resampled
        assert json.loads((root / e / "seed0" / "metrics.json").read_text())["test"]["n"] == 24
    rows = table(root / "results.csv")
    assert [x["label"] for x in rows] == ["as-is", "augment", "smote", "class-weight"]
    assert rows[0]["paper_f1_weighted"] == "0.9643" and rows[2]["paper_f1_weighted"] == ""
    assert [g["label"] for g in r["groups"]] == [x["label"] for x in rows]


def fake_row(seed, acc, f1, model="se-cnn"):
    return {"run": f"r{seed}", "model": model, "seed": seed, "epochs": 2, "checkpoint": "last",
            "params_keras": 466632, "accuracy": acc, "f1_weighted": f1, "precision_weighted": f1,
            "recall_weighted": acc, "f1_macro": f1, "auc_ovr_macro": 0.99, "first_epoch_seconds": 10.0 + seed,
            "mean_epoch_seconds": 9.0, "total_seconds": 18.0, "model_size_mb": 1.9, "infer_images_per_s": 400.0,
            "settings": "2 ep", "history": [{"epoch": 1, "train_acc": 0.5, "val_acc": 0.4, "train_loss": 1.0,
                                              "val_loss": 1.2}, {"epoch": 2, "train_acc": 0.8, "val_acc": 0.7,
                                                                 "train_loss": 0.5, "val_loss": 0.7}]}


def test_seed_aggregation_and_the_table_writers(tmp_path):
    rows = [fake_row(0, 0.98, 0.97), fake_row(1, 0.96, 0.95), fake_row(2, 0.97, 0.96), fake_row(0, 0.90, 0.80, "vgg")]
    groups = benchmark.group_rows(rows, ["se-cnn"] * 3 + ["vgg"])
    acc_mean, acc_std = groups[0]["stats"]["accuracy"]
    assert acc_mean == pytest.approx(0.97) and acc_std == pytest.approx(np.std([0.98, 0.96, 0.97], ddof=1))
    assert groups[1]["stats"]["accuracy"] == (pytest.approx(0.90), None)  # one seed: no spread
    assert groups[1]["paper"]["accuracy"] == 0.9377  # Table 3 looked up by model name
    oversampled = benchmark.group_rows([{**fake_row(0, 0.9, 0.9), "balance": "smote"}], ["x"])
    assert oversampled[0]["paper"] == {}  # Table 3 numbers do not describe a rebalanced training set
    mixed = benchmark.group_rows([fake_row(0, 0.9, 0.9), {**fake_row(1, 0.8, 0.8), "settings": "10 ep"}], ["x", "x"])
    assert [(g["label"], g["entry"], len(g["runs"])) for g in mixed] == [("x (2 ep)", "x", 1), ("x (10 ep)", "x", 1)]
    r = benchmark.write_report(groups, tmp_path / "rep", "T", "D", "P", "bloodcell benchmark x")
    md = (tmp_path / "rep" / "RESULTS.md").read_text()
    assert "| se-cnn | se-cnn | 3 | 466,632 | 0.9700 ± 0.0100 | 0.9792 | -0.92 |" in md
    assert "**-3.77**" in md and "**-13.36**" in md  # vgg: 0.90 vs 0.9377 and 0.80 vs 0.9336 are flagged
    assert "Differing from the paper by more than 1.5 points: se-cnn, vgg" in md  # se-cnn F1 0.96 vs 0.9819
    csv_rows = table(tmp_path / "rep" / "results.csv")
    assert csv_rows[0]["seeds"] == "0 1 2" and float(csv_rows[0]["diff_points_accuracy"]) == pytest.approx(-0.92)
    assert float(csv_rows[1]["accuracy_mean"]) == pytest.approx(0.9) and csv_rows[1]["accuracy_std"] == ""
    assert len(table(tmp_path / "rep" / "runs.csv")) == 4
    assert all(p.endswith(".png") and (tmp_path / "rep" / p.rsplit("/", 1)[-1]).stat().st_size > 5000
               for p in r["files"][3:])
    with pytest.raises(BloodcellError, match="no finished runs"):
        benchmark.write_report([], tmp_path / "empty", "T", "D", "P", "x")


def test_compare_groups_seed_folders_and_tests_untested_runs(tiny, tmp_path):
    for seed in (0, 1):
        train(TrainConfig(model="cnn-t2-2", seed=seed, **FAST), tmp_path / "mine" / "small" / f"seed{seed}", **QUIET)
    train(TrainConfig(model="cnn-t2-1", **FAST), tmp_path / "other", **QUIET)
    r = benchmark.compare([tmp_path / "mine", tmp_path / "other"], tmp_path / "cmp", "best", **QUIET)
    assert [(g["label"], len(g["runs"])) for g in r["groups"]] == [("small", 2), ("other", 1)]
    assert json.loads((tmp_path / "other" / "metrics.json").read_text())["test"]["checkpoint"] == "best"
    assert (tmp_path / "cmp" / "RESULTS.md").is_file()
    with pytest.raises(BloodcellError, match="no run folders"):
        benchmark.compare([tmp_path / "cmp"], tmp_path / "cmp2", **QUIET)


def test_benchmark_cli(tiny, tmp_path, capsys):
    out = str(tmp_path / "b")
    assert main(["benchmark", "paper-table3", "--data", "tiny", "--size", "28", "--models", "se-cnn,sa-cnn",
                 "--seeds", "0,1", "--out", out, "--plan"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert len(plan) == 4 and all(x.startswith("new") for x in plan)
    assert main(["benchmark", "paper-table3", "--models", "nope", "--out", out]) == 2
    assert capsys.readouterr().err.strip().startswith("bloodcell: error: suite paper-table3 has no entry nope")
    assert main(["benchmark", "paper-table2", "--data", "tiny", "--size", "28", "--models", "cnn-t2-2",
                 "--epochs", "1", "--threads", "1", "--out", out]) == 0
    assert "cnn-t2-2" in capsys.readouterr().out
    md = (tmp_path / "b" / "paper-table2" / "RESULTS.md").read_text()
    # Only cnn-t2-2 is finished, so the command names it: without --models it would train all 13 entries.
    one = f"`bloodcell benchmark paper-table2 --data tiny --models cnn-t2-2 --seeds 0 --size 28 --epochs 1 --out {out}`"
    assert one in md
    # A run at other epochs gets its own command, naming only its entries.
    assert main(["benchmark", "paper-table2", "--data", "tiny", "--size", "28", "--models", "cnn-t2-1",
                 "--epochs", "2", "--threads", "1", "--out", out]) == 0
    md = (tmp_path / "b" / "paper-table2" / "RESULTS.md").read_text()
    cmd = "`bloodcell benchmark paper-table2 --data tiny --models {} --seeds 0 --size 28 --epochs {} --out {}`"
    assert f"{cmd.format('cnn-t2-1', 2, out)}; {cmd.format('cnn-t2-2', 1, out)}" in md
    # Seeds of one entry at different epochs are reported apart, never averaged, and reproduced apart.
    assert main(["benchmark", "paper-table2", "--data", "tiny", "--size", "28", "--models", "cnn-t2-1",
                 "--seeds", "1", "--epochs", "1", "--threads", "1", "--out", out]) == 0
    md = (tmp_path / "b" / "paper-table2" / "RESULTS.md").read_text()
    assert "\n| cnn-t2-1 (2 ep" in md and "\n| cnn-t2-1 (1 ep" in md and "\n| cnn-t2-1 |" not in md
    assert cmd.format("cnn-t2-1", 1, out).replace("--seeds 0", "--seeds 1") in md
    # Runs on other data or at another size are never averaged together, nor joined into one --data or --size list.
    entry = tmp_path / "b" / "paper-table2" / "cnn-t2-2"
    shutil.copytree(entry / "seed0", entry / "seed1")
    cfg = json.loads((entry / "seed1" / "config.json").read_text())
    (entry / "seed1" / "config.json").write_text(json.dumps({**cfg, "seed": 1, "data": "other", "size": 64}))
    md = benchmark.suite_report("paper-table2", out)["markdown"]
    assert "\n| cnn-t2-2 (1 ep" in md and "\n| cnn-t2-2 |" not in md
    assert "tiny 28px) | cnn-t2-2 | 1 |" in md and "other 64px) | cnn-t2-2 | 1 |" in md
    assert f"`bloodcell benchmark paper-table2 --data other --models cnn-t2-2 --seeds 1 --epochs 1 --out {out}`" in md
    assert "tiny,other" not in md and "other,tiny" not in md
    # A run under bf16 autocast is reported apart from fp32 runs and reproduced with --precision bf16.
    shutil.copytree(entry / "seed0", entry / "seed2")
    cfg0 = json.loads((entry / "seed0" / "config.json").read_text())
    (entry / "seed2" / "config.json").write_text(json.dumps({**cfg0, "seed": 2, "precision": "bf16"}))
    metrics = json.loads((entry / "seed2" / "metrics.json").read_text())
    del metrics["training"]["machine"]  # as in runs trained before runs recorded their machine
    (entry / "seed2" / "metrics.json").write_text(json.dumps(metrics))
    md = benchmark.suite_report("paper-table2", out)["markdown"]
    assert f"Trained on: {cpu_name()} (4 runs); not recorded (1 run). Report written on: {cpu_name()}" in md
    assert "bf16 autocast, last ckpt, tiny 28px) | cnn-t2-2 | 1 |" in md
    assert "paper, last ckpt, tiny 28px) | cnn-t2-2 | 1 |" in md  # the fp32 seed 0 keeps its own row
    assert f"--models cnn-t2-2 --seeds 2 --size 28 --epochs 1 --precision bf16 --out {out}`" in md
    assert f"--models cnn-t2-2 --seeds 0 --size 28 --epochs 1 --out {out}`" in md
    assert main(["benchmark", "compare", str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    assert main(["benchmark", "compare", str(tmp_path / "missing")]) == 2


def test_every_curve_of_a_full_table3_figure_has_its_own_style(tmp_path):
    """Table 3 has 13 entries and matplotlib 10 colours: the 11th curve must not look like the 1st."""
    from bloodcell.evaluation.plots import curves_png, line_style

    styles = [tuple(line_style(k).values()) for k in range(13)]
    assert len(set(styles)) == 13
    h = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.6}]
    assert curves_png({f"m{k}": h for k in range(13)}, tmp_path / "c.png", ("val_acc",), "t").stat().st_size > 0


def test_sync_copies_reports_and_autoencoder_history_but_no_weights(tmp_path):
    run = tmp_path / "runs" / "paper-table3" / "autoclassifier" / "seed0"
    run.mkdir(parents=True)
    for name in ("config.json", "metrics.json", "history.csv", "history_autoencoder.csv", "last.safetensors",
                 "state.pt", "pretrain_state.pt"):
        (run / name).write_text(name)
    unfinished = tmp_path / "runs" / "paper-table3" / "vgg" / "seed0"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")
    (tmp_path / "runs" / "paper-table3" / "RESULTS.md").write_text("# table")
    sync = importlib.import_module("sync_paper_results")
    with pytest.raises(SystemExit) as exit_:  # a missing folder is a usage error, not a traceback
        sync.main([str(tmp_path / "missing")])
    assert exit_.value.code == 2
    sync.sync(tmp_path / "runs", tmp_path / "copy")
    copied = sorted(p.relative_to(tmp_path / "copy").as_posix() for p in (tmp_path / "copy").rglob("*.*"))
    assert copied == ["paper-table3/RESULTS.md"] + [
        f"paper-table3/autoclassifier/seed0/{n}"
        for n in ("config.json", "history.csv", "history_autoencoder.csv", "metrics.json")]


def test_paper_suites_script_runs_seeds_one_at_a_time_and_syncs_after_each(tmp_path):
    """The driver script: a multi-seed step becomes one command per seed, `;` splits a step, a sync follows each."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(repo / "benchmarks" / "paper_suites.sh", tmp_path / "benchmarks")
    fake = tmp_path / ".venv" / "bin"
    fake.mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    for tool in ("bloodcell", "python"):
        (fake / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n')
        (fake / tool).chmod(0o755)
    (fake / "activate").write_text(f'PATH="{fake}:$PATH"\n')
    subprocess.run(["bash", "benchmarks/paper_suites.sh", "8", "9", "10"], cwd=tmp_path, check=True,
                   capture_output=True)
    d = "--data pbc --out runs/benchmarks"
    sync = "python benchmarks/sync_paper_results.py"
    assert calls.read_text().splitlines() == [
        f"{sync} --restore",
        *[line for s in (0, 1, 2) for line in
          (f"bloodcell benchmark paper-table3 {d} --models se-vgg15,cbam-vgg15 --seeds {s}", sync)],
        f"bloodcell benchmark paper-table3 {d} --models cnn --epochs 10", sync,
        f"bloodcell benchmark paper-table3 {d} --models inception --epochs 10", sync,
        f"bloodcell benchmark paper-table3 {d} --models inception-sound --epochs 10 --precision bf16", sync,
    ]


def test_frontier_suite_trains_the_recommended_recipe_per_size_and_writes_the_frontier(tiny, tmp_path):
    from bloodcell.evaluation.frontier import on_frontier

    out = tmp_path / "bench"
    frontier = suites.get_suite("frontier")
    cfg = benchmark.entry_config(frontier.entries[0].config, seed=0, data="tiny", size=28, recipe=frontier.recipe)
    assert (cfg.augment, cfg.schedule, cfg.bn_recalibrate, frontier.entries[0].checkpoint) == ("dihedral", "cosine",
                                                                                              2048, "best")
    r = benchmark.run_suite("frontier", seeds=[0, 1], out=out, models=["se-cnn", "mobilenetv3-small"],
                            data="tiny", size=28, epochs=1, threads=1, **QUIET)
    root = out / "frontier-28"  # each size in its own folder
    assert {Path(f).name for f in r["files"]} >= {"FRONTIER.md", "frontier.json", "frontier.png"}
    data = json.loads((root / "frontier.json").read_text())
    assert data["size"] == 28 and [p["model"] for p in data["points"]] == ["se-cnn", "mobilenetv3-small"]
    for p in data["points"]:
        assert p["seeds"] == [0, 1] and p["params"] > 0 and p["mflops"] > 0 and p["train_cpu_min"] >= 0
        runs = [json.loads((root / p["model"] / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
        assert p["accuracy"] == pytest.approx(np.mean([m["test"]["accuracy"] for m in runs]))
    assert data["paper"] == []  # the paper's accuracies are at 64 px only
    from bloodcell.evaluation.frontier import paper_points
    assert {p["label"] for p in paper_points(64)} >= {"paper se-cnn", "paper vgg"}
    assert data["published_best"][0] == paper.PUBLISHED_BEST[28][0]
    assert "## Frontier at 28x28" in (root / "FRONTIER.md").read_text()
    # a point is dominated when another is as accurate for less cost, and the frontier keeps the rest
    pts = [{"accuracy": 0.99, "params": 10}, {"accuracy": 0.98, "params": 20}, {"accuracy": 0.995, "params": 30},
           {"accuracy": 0.9, "params": None}]
    assert [on_frontier(p, pts, "params") for p in pts] == [True, False, True, None]
