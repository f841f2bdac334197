import csv
import json
import os
import signal
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bloodcell.errors import BloodcellError
from bloodcell.inference.weights import load_model, read_weights
from bloodcell.training import TrainConfig, train
from bloodcell.training.schedules import lr_factor

FAST = dict(model="se-cnn", data="bloodmnist", size=28, batch_size=32, threads=1)



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
    assert float(rows[1]["lr"]) == pytest.approx(5e-4)
    assert summary["first_epoch_seconds"] == float(rows[0]["seconds"]) > 0
    assert TrainConfig.load(run / "config.json") == TrainConfig(**FAST, epochs=2, augment="dihedral", schedule="cosine")
    _, meta = read_weights(run / "last.safetensors")
    assert meta["class_names"][0] == "basophil" and meta["input_size"] == 28
    assert meta["recipe"]["size"] == 28 and meta["model"] == "se-cnn"
    from bloodcell.models import count_params_keras, count_params_trainable, create_model

    reference = create_model("se-cnn", num_classes=8, input_size=28)
    training = json.loads((run / "metrics.json").read_text())["training"]
    assert training["params_keras"] == count_params_keras(reference)
    assert training["params_trainable"] == count_params_trainable(reference) < training["params_keras"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_fp32_weights_and_is_recorded(prepared, tmp_path, precision):
    with pytest.raises(BloodcellError, match="precision 'fp8' is not one of fp32, bf16, fp16"):
        TrainConfig(**FAST, precision="fp8").validate()
    train(TrainConfig(**FAST, epochs=1), tmp_path / "fp32", log=lambda s: None)
    train(TrainConfig(**FAST, epochs=1, precision=precision), tmp_path / "mixed", log=lambda s: None)
    assert TrainConfig.load(tmp_path / "mixed" / "config.json").precision == precision
    w32, w16 = load_file(tmp_path / "fp32" / "last.safetensors"), load_file(tmp_path / "mixed" / "last.safetensors")
    assert all(w16[k].dtype == w32[k].dtype for k in w32)  # master weights stay fp32
    conv = next(k for k in w32 if k.endswith("weight") and w32[k].dim() == 4)
    assert not torch.equal(w32[conv], w16[conv])  # the forward pass really ran in reduced precision
    assert torch.allclose(w32[conv], w16[conv], atol=0.05)  # ...and trained the same way
    if precision == "fp16":  # the gradient scaler's state is saved so a resume continues it
        assert torch.load(tmp_path / "mixed" / "state.pt", weights_only=True)["scaler"]["scale"] > 0


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
    # bloodmnist at 64px is not prepared: loading never downloads, it says how to prepare it
    with pytest.raises(BloodcellError, match="64px.*data prepare"):
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
    # an option that would change the saved run is refused, not silently ignored
    assert main([*args, "--resume", "--lr", "0.5"]) == 2


def test_load_is_sampled_once_per_epoch(prepared, tmp_path, monkeypatch):
    import bloodcell.machine

    calls = []
    monkeypatch.setattr(bloodcell.machine.os, "getloadavg", lambda: calls.append(1) or (1.25, 0.0, 0.0))
    train(TrainConfig(**FAST, epochs=2), tmp_path / "r", log=lambda s: None)  # 3 batches per epoch
    assert len(calls) == 2
    assert [float(r["load"]) for r in history(tmp_path / "r")] == [1.25, 1.25]


RECIPE_OPTIONS_ON = dict(warmup_epochs=1, ema=0.99, mix="cutmix", color_jitter=0.5, scale_jitter=0.2)


@pytest.mark.parametrize("options", [{}, RECIPE_OPTIONS_ON], ids=["defaults", "issue-32-options-on"])
def test_an_epoch_reads_the_device_only_at_its_end(prepared, tmp_path, monkeypatch, options):
    """Losses and correct counts accumulate as tensors: the number of host reads (item/float/int of a tensor)
    in ``run_epoch`` does not grow with the number of batches (warm-up, EMA, mixes and jitter add none)."""
    from bloodcell.data.store import load_dataset
    from bloodcell.training import loop

    def syncs_for(batch_size: int) -> int:
        cfg = TrainConfig(**{**FAST, "batch_size": batch_size}, epochs=1, **options)
        device = torch.device("cpu")
        td = loop.prepare_training_data(cfg, load_dataset("bloodmnist", 28), device)
        model, opt = loop.build_model_and_optimizer(cfg, len(td.class_names), td.size, device)
        state = loop.TrainState(model, opt, torch.amp.GradScaler("cpu", enabled=False), torch.Generator(),
                                ema=loop.make_ema(model, cfg.ema))
        count = [0]
        originals = {name: getattr(torch.Tensor, name) for name in ("item", "__float__", "__int__", "tolist")}

        def counting(name):
            def wrapped(self, *a, **k):
                # reads made by bloodcell's code (torch.optim reads its own CPU step counter, no device sync)
                if "bloodcell" in traceback.extract_stack(limit=2)[0].filename:
                    count[0] += 1
                return originals[name](self, *a, **k)
            return wrapped

        for name in originals:
            monkeypatch.setattr(torch.Tensor, name, counting(name))
        try:
            loop.run_epoch(state, td, cfg, 0)
        finally:
            for name, fn in originals.items():
                monkeypatch.setattr(torch.Tensor, name, fn)
        return count[0]

    few, many = syncs_for(48), syncs_for(8)  # 2 batches vs 12 batches of the 96 training images
    assert few == many <= 4


def test_training_steps_alone(prepared, tmp_path):
    """The named steps of ``train`` work on their own: data on the device, model and optimizer, a checkpoint
    that round-trips the whole state."""
    from bloodcell.data.store import load_dataset
    from bloodcell.training import loop

    cfg = TrainConfig(**FAST, epochs=1, normalize=True, balance="class-weight")
    data = load_dataset("bloodmnist", 28)
    td = loop.prepare_training_data(cfg, data, torch.device("cpu"))
    assert td.x_train.dtype == torch.uint8 and td.x_train.shape == (96, 3, 28, 28) and len(td.y_val) == 32
    x = torch.from_numpy(data.images["train"]).float() / 255
    assert td.normalization["mean"] == pytest.approx(x.mean(dim=(0, 1, 2)).tolist(), abs=1e-5)
    assert td.loss_weight.tolist() == pytest.approx([1.0] * 8)  # balanced tiny set: equal weights
    model, opt = loop.build_model_and_optimizer(cfg, 8, 28, torch.device("cpu"))
    assert isinstance(opt, torch.optim.Adam) and next(model.parameters()).device.type == "cpu"
    state = loop.TrainState(model, opt, torch.amp.GradScaler("cpu", enabled=False), torch.Generator().manual_seed(3))
    stats = loop.run_epoch(state, td, cfg, 0)
    assert stats["train_acc"] * 96 == pytest.approx(round(stats["train_acc"] * 96))  # a count of right answers
    state.history, state.best = [{"epoch": 1}], {"val_acc": 0.5, "epoch": 1}
    loop.save_checkpoint(tmp_path / "state.pt", state, 0)
    model2, opt2 = loop.build_model_and_optimizer(cfg, 8, 28, torch.device("cpu"))
    state2 = loop.TrainState(model2, opt2, torch.amp.GradScaler("cpu", enabled=False), torch.Generator())
    loop.load_checkpoint(tmp_path / "state.pt", state2)
    assert state2.next_epoch == 1 and state2.best == state.best and state2.history == state.history
    assert torch.equal(state2.generator.get_state(), state.generator.get_state())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_devices(monkeypatch):
    from bloodcell.machine import device_name, resolve_device

    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(BloodcellError, match="--device cuda: no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert device_name("cpu").startswith("cpu (")
    with pytest.raises(BloodcellError, match="--device 'tpu'"):
        resolve_device("tpu")


def test_device_is_recorded_and_weights_save_as_cpu_tensors(prepared, tmp_path):
    from bloodcell.cli import main

    run = tmp_path / "r"
    assert main(["train", "--data", "bloodmnist", "--size", "28", "--epochs", "1", "--batch-size", "32",
                 "--threads", "1", "--device", "cpu", "--out", str(run)]) == 0
    assert TrainConfig.load(run / "config.json").device == "cpu"
    assert json.loads((run / "metrics.json").read_text())["training"]["device"].startswith("cpu (")
    assert all(t.device.type == "cpu" for t in load_file(run / "best.safetensors").values())
    state = torch.load(run / "state.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in state["model"].values())


def test_recipe_presets(prepared, tmp_path):
    from bloodcell.choices import RECIPE_SETTINGS
    from bloodcell.cli import main
    from bloodcell.training import preset_config

    assert TrainConfig() == preset_config("recommended")  # the Python API trains what the CLI trains
    paper = preset_config("paper", model="inception")
    assert (paper.schedule, paper.augment, paper.optimizer) == ("paper", "none", None)
    run = tmp_path / "p"
    assert main(["train", "--recipe", "paper", "--data", "bloodmnist", "--size", "28", "--epochs", "1",
                 "--batch-size", "32", "--threads", "1", "--augment", "flip", "--out", str(run)]) == 0
    saved = TrainConfig.load(run / "config.json")
    assert saved.schedule == RECIPE_SETTINGS["paper"]["schedule"] and saved.augment == "flip"  # option wins


def test_bn_momentum_recommended_paper_model_arg_and_old_runs(prepared, tmp_path):
    """--bn-momentum sets every BatchNorm's momentum (any model); by default, and in the paper preset, the model
    keeps its own (Keras 0.01); a model argument wins; an old run's config.json without the field loads as the
    model's own, which is what it trained with."""
    from bloodcell.models import create_model
    from bloodcell.training import preset_config
    from bloodcell.training.loop import build_model_and_optimizer

    def momenta(cfg):
        model, _ = build_model_and_optimizer(cfg, 8, 28, torch.device("cpu"))
        return {m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}

    assert momenta(TrainConfig(**FAST)) == {0.01}
    assert momenta(TrainConfig(**FAST, bn_momentum=0.1)) == {0.1}
    assert momenta(preset_config("paper", **FAST, bn_momentum=0.1)) == {0.1}
    assert momenta(TrainConfig(**FAST, model_args={"bn_momentum": 0.3})) == {0.3}
    assert momenta(TrainConfig(**{**FAST, "model": "mobilenetv3-small"}, bn_momentum=0.05)) == {0.05}
    assert {m.momentum for m in create_model("se-cnn", input_size=28).modules()
            if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}  # the model itself is unchanged
    old = TrainConfig(**FAST).to_dict()
    del old["bn_momentum"]
    assert TrainConfig.from_dict(old).bn_momentum is None
    with pytest.raises(BloodcellError, match="bn_momentum must be in"):
        TrainConfig(**FAST, bn_momentum=0.0).validate()
    run = tmp_path / "r"
    from bloodcell.cli import main
    assert main(["train", "--data", "bloodmnist", "--size", "28", "--epochs", "1", "--batch-size", "32",
                 "--threads", "1", "--bn-momentum", "0.2", "--out", str(run)]) == 0
    assert TrainConfig.load(run / "config.json").bn_momentum == 0.2


def test_bn_recalibration_gives_the_sample_statistics_and_leaves_the_rest_alone():
    from bloodcell.data.tensors import Normalizer
    from bloodcell.training.bn_recalibrate import recalibrate_bn, recalibration_sample

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.01), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5), torch.nn.Flatten())
    images = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8)
    norm = Normalizer()
    model.train()
    recalibrate_bn(model, images, norm, batch_size=100)  # three equal batches: the mean of their statistics
    bn = model[1]
    with torch.no_grad():
        acts = model[0](norm(images))
    means = torch.stack([acts[i:i + 100].mean((0, 2, 3)) for i in (0, 100, 200)]).mean(0)
    var = torch.stack([acts[i:i + 100].transpose(0, 1).flatten(1).var(1) for i in (0, 100, 200)]).mean(0)
    assert torch.allclose(bn.running_mean, means, atol=1e-5) and torch.allclose(bn.running_var, var, rtol=1e-4)
    assert bn.momentum == 0.01 and model.training and model[3].training  # modes and momentum restored
    x = torch.arange(1000).reshape(1000, 1).expand(1000, 2).contiguous()
    a, b = recalibration_sample(x, 64, seed=3), recalibration_sample(x, 64, seed=3)
    assert torch.equal(a, b) and len(a.unique()) == 64 and len(recalibration_sample(x, 5000, seed=3)) == 1000


def test_recommended_recipe_recalibrates_so_the_first_validation_is_sound(prepared, tmp_path):
    """With recalibration the first epoch's validation uses the trained weights' statistics; without it, the
    Keras momentum leaves them near the initial ones, and the two first-epoch validations differ."""
    on = train(TrainConfig(**FAST, epochs=1), tmp_path / "on", progress=False)
    off = train(TrainConfig(**FAST, epochs=1, bn_recalibrate=0), tmp_path / "off", progress=False)
    h_on, h_off = history(tmp_path / "on")[0], history(tmp_path / "off")[0]
    assert h_on["train_loss"] == h_off["train_loss"]  # training itself is the same
    assert h_on["val_loss"] != h_off["val_loss"]
    assert on is not None and off is not None
    bn = load_file(tmp_path / "on" / "best.safetensors")
    assert any(k.endswith("num_batches_tracked") for k in bn)
