import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bloodcell.data.sources import prepare_from_npz
from bloodcell.errors import BloodcellError
from bloodcell.training import TrainConfig, train
from bloodcell.training.checkpoint import load_model, read_weights
from bloodcell.training.schedules import lr_factor

FAST = dict(model="se-cnn", data="bloodmnist", size=28, batch_size=32, threads=1)


@pytest.fixture
def prepared(tiny_npz):
    prepare_from_npz(tiny_npz)
    return "bloodmnist"


def history(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def without_timing(rows):
    """History rows minus what depends on the machine's speed and load, which no seed fixes."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "load")} for r in rows]


def test_schedules():
    assert lr_factor("paper", 0, 20) == 1.0
    assert 1e-3 * lr_factor("paper", 7, 20) == pytest.approx(6.08e-5, rel=1e-2)  # logged by the paper's code
    assert 1e-3 * lr_factor("paper", 9, 20) == pytest.approx(1.11e-5, rel=1e-2)
    assert lr_factor("exp", 10, 20) == pytest.approx(np.exp(-1.0))
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 5, 10) == pytest.approx(0.5)


def test_run_folder_contents(prepared, tmp_path):
    run = tmp_path / "run"
    summary = train(TrainConfig(**FAST, epochs=2, augment="dihedral", schedule="cosine"), run, log=lambda s: None)
    for name in ("config.json", "history.csv", "metrics.json", "best.safetensors", "last.safetensors", "state.pt"):
        assert (run / name).is_file(), name
    rows = history(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "load"}
    assert float(rows[0]["load"]) >= 0  # the machine's mean 1-min load average over the epoch
    assert float(rows[1]["lr"]) == pytest.approx(5e-4)
    assert summary["first_epoch_seconds"] == float(rows[0]["seconds"]) > 0
    assert TrainConfig.load(run / "config.json") == TrainConfig(**FAST, epochs=2, augment="dihedral", schedule="cosine")
    _, meta = read_weights(run / "last.safetensors")
    assert meta["class_names"][0] == "basophil" and meta["input_size"] == 28
    assert meta["recipe"]["size"] == 28 and meta["model"] == "se-cnn"
    assert json.loads((run / "metrics.json").read_text())["training"]["params_keras"] > 0


def test_bf16_autocast_trains_fp32_weights_and_is_recorded(prepared, tmp_path):
    from bloodcell.cli import PRECISIONS
    from bloodcell.training.config import PRECISIONS as CONFIG_PRECISIONS

    assert PRECISIONS == CONFIG_PRECISIONS
    with pytest.raises(BloodcellError, match="unknown precision 'fp16'"):
        TrainConfig(**FAST, precision="fp16").validate()
    train(TrainConfig(**FAST, epochs=1), tmp_path / "fp32", log=lambda s: None)
    train(TrainConfig(**FAST, epochs=1, precision="bf16"), tmp_path / "bf16", log=lambda s: None)
    assert TrainConfig.load(tmp_path / "bf16" / "config.json").precision == "bf16"
    w32, w16 = load_file(tmp_path / "fp32" / "last.safetensors"), load_file(tmp_path / "bf16" / "last.safetensors")
    assert all(w16[k].dtype == w32[k].dtype for k in w32)  # master weights stay fp32
    conv = next(k for k in w32 if k.endswith("weight") and w32[k].dim() == 4)
    assert not torch.equal(w32[conv], w16[conv])  # the forward pass really ran in bf16
    assert torch.allclose(w32[conv], w16[conv], atol=0.05)  # ...and trained the same way


def test_same_seed_gives_identical_results(prepared, tmp_path):
    cfg = TrainConfig(**FAST, epochs=2, augment="flip")
    train(cfg, tmp_path / "a", log=lambda s: None)
    train(cfg, tmp_path / "b", log=lambda s: None)
    assert without_timing(history(tmp_path / "a")) == without_timing(history(tmp_path / "b"))
    wa, wb = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    train(TrainConfig(**{**FAST, "seed": 1}, epochs=2, augment="flip"), tmp_path / "c", log=lambda s: None)
    wc = load_file(tmp_path / "c" / "last.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_interrupted_run_resumes_to_the_same_result(prepared, tmp_path):
    cfg = TrainConfig(**FAST, epochs=3, augment="dihedral", schedule="cosine")
    train(cfg, tmp_path / "straight", log=lambda s: None)

    def ctrl_c_after_epoch_2(msg):
        if msg.startswith("epoch   2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", log=ctrl_c_after_epoch_2)
    assert len(history(tmp_path / "cut")) == 2
    with pytest.raises(BloodcellError, match="already holds a run"):
        train(cfg, tmp_path / "cut", log=lambda s: None)
    train(cfg, tmp_path / "cut", resume=True, log=lambda s: None)
    assert without_timing(history(tmp_path / "straight")) == without_timing(history(tmp_path / "cut"))
    wa, wb = load_file(tmp_path / "straight" / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("stop_at_save", [2, 4])  # inside epoch 1 after 64 images; inside epoch 2 after 32
def test_run_stopped_inside_an_epoch_resumes_there_to_the_same_result(prepared, tmp_path, monkeypatch, stop_at_save):
    """A large model's epoch can outlast a session: the state saved inside an epoch (here after every batch,
    3 batches per epoch) lets a resumed run replay the rest of that epoch exactly, not restart it."""
    from bloodcell.training import loop

    cfg = TrainConfig(**FAST, epochs=2, augment="dihedral", schedule="cosine")
    train(cfg, tmp_path / "straight", log=lambda s: None)
    real_save, saves = loop.save_state, []

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(state.get("partial"))
        if len(saves) == stop_at_save:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", log=lambda s: None, save_every=0)
    assert [s is None for s in saves] == [False, False, True, False][:stop_at_save]  # inside, inside, epoch end
    monkeypatch.setattr(loop, "save_state", real_save)
    said = []
    train(cfg, tmp_path / "cut", resume=True, log=said.append)
    epoch, images = {2: (1, 64), 4: (2, 32)}[stop_at_save]
    assert said[0].endswith(f"in epoch {epoch} of 2, after {images} images")
    assert sum(s.startswith("epoch ") for s in said) == 3 - epoch
    assert without_timing(history(tmp_path / "cut")) == without_timing(history(tmp_path / "straight"))
    wa, wb = load_file(tmp_path / "straight" / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert float(history(tmp_path / "cut")[epoch - 1]["seconds"]) > 0


def test_broken_or_foreign_training_state_is_a_clear_error(prepared, tmp_path):
    """--resume on a truncated state, one saved by another model, or a stray file: one line naming the file."""
    cfg = TrainConfig(**FAST, epochs=2)

    def stop_after_epoch_1(msg):
        if msg.startswith("epoch   1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", log=stop_after_epoch_1)
    state_path = tmp_path / "run" / "state.pt"
    good = torch.load(state_path, weights_only=True)
    resume = lambda: train(cfg, tmp_path / "run", resume=True, log=lambda s: None)  # noqa: E731
    torch.save({k: v for k, v in good.items() if k != "optimizer"}, state_path)
    with pytest.raises(BloodcellError, match=r"state.pt: corrupt training state \(it lacks \['optimizer'\]\)"):
        resume()
    torch.save({**good, "partial": {"next": 32}}, state_path)
    with pytest.raises(BloodcellError, match=r"state.pt: corrupt training state \(the part-epoch record lacks"):
        resume()
    other = train(TrainConfig(**{**FAST, "model": "cnn"}, epochs=1), tmp_path / "other", log=lambda s: None)
    assert other["model"] == "cnn"
    torch.save(torch.load(tmp_path / "other" / "state.pt", weights_only=True), state_path)
    with pytest.raises(BloodcellError, match="state.pt: weights do not match the model"):
        resume()
    torch.save({**good, "optimizer": {"state": {}, "param_groups": []}}, state_path)
    with pytest.raises(BloodcellError, match="state.pt: the training state does not fit this run"):
        resume()
    torch.save([1, 2, 3], state_path)
    with pytest.raises(BloodcellError, match=r"corrupt training state \(it lacks"):
        resume()
    torch.save(good, state_path)  # and the intact state still resumes
    assert resume()["epochs"] == 2


def test_history_written_before_the_load_column_still_reads(tmp_path):
    from bloodcell.evaluation.evaluate import read_history

    (tmp_path / "history.csv").write_text("epoch,train_acc,seconds,load\n1,0.5,10.0,\n2,0.6,9.5,2.04\n")
    rows = read_history(tmp_path / "history.csv")
    assert rows[0]["seconds"] == 10.0 and np.isnan(rows[0]["load"]) and rows[1]["load"] == 2.04


def test_killed_run_keeps_its_checkpoint_and_resumes(prepared, tmp_path):
    """SIGKILL mid-run (a real process, no chance to clean up) leaves whole files; --resume then ends
    exactly where an uninterrupted run ends."""
    def cmd(out, *extra):
        return [sys.executable, "-m", "bloodcell", "train", "--model", "se-cnn", "--data", "bloodmnist",
                "--size", "28", "--epochs", "8", "--batch-size", "32", "--threads", "1", "--out", str(out), *extra]

    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd(run), **quiet)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "history.csv").is_file():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(history(run))
    assert 1 <= done < 8, "the run should have been killed part-way"
    load_model(run / "last.safetensors")  # intact, not half-written
    subprocess.run(cmd(run, "--resume"), check=True, **quiet)
    subprocess.run(cmd(tmp_path / "straight"), check=True, **quiet)
    assert without_timing(history(run)) == without_timing(history(tmp_path / "straight"))


def test_train_limit_and_size_mismatch(prepared, tmp_path):
    s = train(TrainConfig(**FAST, epochs=1, train_limit=40), tmp_path / "lim", log=lambda s: None)
    assert s["train_images"] == 40
    # bloodmnist at 64px is not prepared: it would be downloaded, which fails here (offline) with advice
    with pytest.raises(BloodcellError, match="could not download BloodMNIST at 64px.*--npz"):
        train(TrainConfig(**{**FAST, "size": 64}, epochs=1), tmp_path / "x", log=lambda s: None)
    with pytest.raises(BloodcellError, match="has 28px images, but --size is 64"):
        train(TrainConfig(**{**FAST, "size": 64}, epochs=1), tmp_path / "y", log=lambda s: None,
              data=__import__("bloodcell.data.store").data.store.load_dataset("bloodmnist", 28))


def test_resume_keeps_the_runs_epochs_unless_asked_to_extend(prepared, tmp_path):
    from bloodcell.cli import main

    run = tmp_path / "r"
    args = ["train", "--data", "bloodmnist", "--size", "28", "--batch-size", "32", "--threads", "1", "--out", str(run)]
    assert main([*args, "--epochs", "2"]) == 0
    assert main([*args, "--resume"]) == 0  # the CLI default must not stretch a finished 2-epoch run to 20
    assert len(history(run)) == 2 and TrainConfig.load(run / "config.json").epochs == 2
    assert main([*args, "--resume", "--epochs", "3"]) == 0
    assert len(history(run)) == 3
