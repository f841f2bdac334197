"""The paper's full model zoo: every registered model builds, trains a step, and matches the paper's counts."""

import csv

import numpy as np
import pytest
import torch
from conftest import synthetic_arrays
from PIL import Image
from safetensors.torch import load_file

from bloodcell.data.sources import prepare_from_npz
from bloodcell.data.store import load_dataset
from bloodcell.errors import BloodcellError
from bloodcell.evaluation.evaluate import evaluate_run
from bloodcell.inference.weights import load_model
from bloodcell.models import count_params_keras, count_params_trainable, create_model, get_spec, list_models
from bloodcell.models.blocks import ChannelAttention, Conv2dSame, MaxPool2dSame, SqueezeExcite
from bloodcell.models.vgg import vgg_depths
from bloodcell.training import TrainConfig, train

# Keras count_params() of the authors' models (../shared/reference/paper-facts.md), and our vgg15 (see vgg.py).
PAPER_COUNTS = {
    "cnn": 8_778_952, "se-cnn": 466_632, "sa-cnn": 423_504, "cbam-cnn": 467_024,
    "vgg": 1_208_872, "se-vgg15": 7_273_000, "sa-vgg15": 7_098_898, "cbam-vgg15": 7_273_490,
    "inception": 15_586_888, "resnet34": 21_323_016, "autoclassifier": 2_245_224,
}
# The facts say "about 11.09M" for the authors' vgg15; the stated layout (2,2,2,3,3 convs 32..512, Dense
# 512/256/8) counts 8,855,592 in Keras terms. We pin our number so a change to the layout is noticed.
OWN_COUNTS = {"vgg15": 8_855_592}
ALL_NAMES = [s.name for s in list_models()]


def bn_channels(model: torch.nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("name,expected", {**PAPER_COUNTS, **OWN_COUNTS}.items())
def test_parameter_counts_match_the_paper(name, expected):
    model = create_model(name, input_size=64)
    assert count_params_keras(model) == expected
    assert sum(p.numel() for p in model.parameters()) == expected - 2 * bn_channels(model)
    # trainable: all weights, less the AutoClassifier's encoder, which is frozen from the start
    frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.")) \
        if name == "autoclassifier" else 0
    assert count_params_trainable(model) == expected - 2 * bn_channels(model) - frozen


def test_table2_has_13_rows_and_only_row_5_has_batch_norm():
    rows = [f"cnn-t2-{i}" for i in range(1, 14)]
    with_bn = [n for n in rows if bn_channels(create_model(n)) > 0]
    assert with_bn == ["cnn-t2-5"]
    assert all(f"row {i}:" in get_spec(n).description for i, n in enumerate(rows, start=1))


@pytest.mark.parametrize("pool,dense,flat", [(0, 0, 8 * 8 * 256), (1, 0, 4 * 4 * 256), (1, 128, 128)])
def test_table2_pooling_and_dense_reading(pool, dense, flat):
    """Maxpool 0 leaves the last block unpooled (8x8 after 3 pools), 1 pools it too (4x4); dense adds a layer."""
    row = {(0, 0): 3, (1, 0): 4, (1, 128): 12}[(pool, dense)]
    model = create_model(f"cnn-t2-{row}")
    assert model.head[-1].in_features == flat


def test_vgg_depth_rule():
    assert [vgg_depths(d) for d in (8, 12, 15, 18)] == [(1,) * 5, (1, 2, 2, 2, 2), (2, 2, 2, 3, 3), (3,) * 5]
    for depth in (8, 12, 15, 18):
        model = create_model(f"vgg{depth}")
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        dense = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert convs + dense == depth


def test_resnet_projects_only_where_the_shape_changes():
    model = create_model("resnet34")
    projections = [n for n, m in model.named_modules() if n.endswith("shortcut") and isinstance(m, Conv2dSame)]
    assert len(projections) == 3


def test_optimizer_defaults_follow_the_paper():
    assert {s.name for s in list_models() if s.optimizer == "sgd"} == {"inception", "resnet34"}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_model_gives_logits_and_takes_a_training_step(name):
    torch.manual_seed(0)
    model = create_model(name, input_size=64).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, 1e-3)
    before = [p.detach().clone() for p in trainable]
    logits = model(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 8)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 7]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))


@pytest.mark.parametrize("name", [s.name for s in list_models() if s.input_sizes is None])
@pytest.mark.parametrize("size", [28, 128])
def test_models_without_declared_sizes_work_at_28_and_128(name, size):
    model = create_model(name, input_size=size).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, size, size)).shape == (1, 8)


@pytest.mark.parametrize("name", [s.name for s in list_models() if s.input_sizes is not None])
def test_models_with_declared_sizes_build_at_them_and_refuse_others(name):
    spec = get_spec(name)
    assert 64 in spec.input_sizes
    for size in spec.input_sizes:
        model = create_model(name, input_size=size).eval()
        with torch.no_grad():
            assert model(torch.rand(1, 3, size, size)).shape == (1, 8), size
    for size in (28, 100):
        with pytest.raises(BloodcellError, match=f"model '{name}' is defined for input sizes .*not {size}"):
            create_model(name, input_size=size)


def test_classic_squeeze_excitation_is_selectable_by_name():
    model = create_model("se-classic-cnn")
    assert sum(isinstance(m, SqueezeExcite) for m in model.modules()) == 4
    assert not any(isinstance(m, ChannelAttention) for m in model.modules())


@pytest.mark.parametrize("size", [7, 8, 9])
def test_keras_same_padding_halves_rounding_up(size):
    x = torch.rand(1, 4, size, size)
    assert Conv2dSame(4, 4, 3, 2)(x).shape[-1] == (size + 1) // 2
    assert MaxPool2dSame(3, 2)(x).shape[-1] == (size + 1) // 2
    assert (MaxPool2dSame(3, 2)(-x - 1) <= -1).all()  # -inf padding never wins the max


def test_autoclassifier_trains_in_two_stages_and_evaluates(tmp_path):
    npz = tmp_path / "bloodmnist_32.npz"
    np.savez(npz, **synthetic_arrays({"train": 4, "val": 2, "test": 2}, size=32))
    prepare_from_npz(npz)
    run = tmp_path / "run"
    cfg = TrainConfig(model="autoclassifier", model_args={"pretrain_epochs": 2}, data="bloodmnist", size=32,
                      epochs=2, batch_size=16, threads=1)
    train(cfg, run, log=lambda s: None)

    with open(run / "history_autoencoder.csv") as f:
        ae_rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in ae_rows] == ["1", "2"] and float(ae_rows[1]["val_mse"]) > 0
    with open(run / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert Image.open(run / "autoencoder_reconstructions.png").size == (8 * 32, 2 * 32)

    # Stage 1 moved the encoder away from its initialisation; stage 2 left it alone (frozen, BN statistics too).
    torch.manual_seed(cfg.seed)
    fresh = create_model("autoclassifier", input_size=32, pretrain_epochs=2).state_dict()
    best, last = load_file(run / "best.safetensors"), load_file(run / "last.safetensors")
    enc = [k for k in last if k.startswith("encoder.")]
    assert not torch.equal(last["encoder.features.0.weight"], fresh["encoder.features.0.weight"])
    assert all(torch.equal(best[k], last[k]) for k in enc)
    assert not torch.equal(last["head.0.0.0.weight"], fresh["head.0.0.0.weight"])

    model, meta = load_model(run / "last.safetensors")
    assert meta["model"] == "autoclassifier" and not any(p.requires_grad for p in model.encoder.parameters())
    assert count_params_trainable(model) == sum(p.numel() for n, p in model.named_parameters()
                                                if not n.startswith("encoder."))
    metrics = evaluate_run(run, "test", speed=False)
    best, _ = load_model(run / "best.safetensors")
    test = load_dataset("bloodmnist", 32)
    with torch.no_grad():
        x = torch.from_numpy(np.array(test.images["test"])).permute(0, 3, 1, 2).float() / 255
        pred = best(x).argmax(1).numpy()
    assert metrics["n"] == 16 and metrics["accuracy"] == pytest.approx(float((pred == test.labels["test"]).mean()))

    # A resumed run continues stage 2 from its saved state; it does not pre-train again.
    ae_history = (run / "history_autoencoder.csv").read_bytes()
    train(cfg, run, resume=True, log=lambda s: None, extend_to=3)
    assert (run / "history_autoencoder.csv").read_bytes() == ae_history
    assert torch.equal(load_file(run / "last.safetensors")["encoder.features.0.weight"],
                       last["encoder.features.0.weight"])
    with open(run / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 3


@pytest.mark.parametrize("stop_after", [2, 3])  # 3: the stage had ended, the first classifier epoch had not
def test_autoclassifier_interrupted_in_pretraining_resumes_to_the_same_result(tmp_path, stop_after):
    """A run stopped during the autoencoder stage continues it (not from scratch) and ends as an uninterrupted run."""
    npz = tmp_path / "bloodmnist_32.npz"
    np.savez(npz, **synthetic_arrays({"train": 4, "val": 2, "test": 2}, size=32))
    prepare_from_npz(npz)
    cfg = TrainConfig(model="autoclassifier", model_args={"pretrain_epochs": 3}, data="bloodmnist", size=32,
                      epochs=2, batch_size=16, threads=1)
    train(cfg, tmp_path / "straight", log=lambda s: None)

    def stop_after_autoencoder_epoch(msg):
        if msg.startswith(f"autoencoder   {stop_after}/"):
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, cut, log=stop_after_autoencoder_epoch)
    assert (cut / "pretrain_state.pt").is_file() and not (cut / "state.pt").exists()
    said = []
    train(cfg, cut, resume=True, log=said.append)
    assert f"resuming the autoencoder stage after epoch {stop_after} of 3" in said
    assert sum(s.startswith("autoencoder ") for s in said) == 3 - stop_after

    def rows(run, name):
        with open(run / name) as f:
            return [{k: v for k, v in r.items() if k not in ("seconds", "load")} for r in csv.DictReader(f)]

    for name in ("history_autoencoder.csv", "history.csv"):
        assert rows(cut, name) == rows(tmp_path / "straight", name)
    a, b = load_file(tmp_path / "straight" / "last.safetensors"), load_file(cut / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
