"""The issue-32 recipe options: warm-up, EMA of the weights, mixup/cutmix, colour and scale jitter.

Each one changes training as intended, is seeded (same seed, same history and weights), resumes exactly, and
round-trips through the CLI into config.json; old configs without the fields load with them off.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from bloodcell.data.jitter import (
    apply_colour_jitter,
    apply_mix,
    apply_scale_jitter,
    beta_quantile,
    colour_draws,
    mix_draws,
    zoom_draws,
)
from bloodcell.errors import BloodcellError
from bloodcell.training import TrainConfig, train
from bloodcell.training.schedules import step_lr, warmup_factor

FAST = dict(model="se-cnn", data="bloodmnist", size=28, batch_size=32, threads=1)



def history(run):
    with open(run / "history.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("seconds", "load")} for r in csv.DictReader(f)]


def weights(run, name="last"):
    return load_file(run / f"{name}.safetensors")


def same_weights(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def batch(n=6, size=16, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---------------------------------------------------------------- warm-up
def test_warmup_factors_ramp_per_step_then_hand_over_to_the_schedule():
    assert warmup_factor(0.5, 0) == 1.0
    assert warmup_factor(0.25, 2) == pytest.approx(0.125) and warmup_factor(3, 2) == 1.0
    lrs = [step_lr(1e-3, "constant", e, 4, s, 4, 1) for e in range(2) for s in range(4)]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    assert step_lr(1e-3, "cosine", 2, 4, 0, 4, 1) == pytest.approx(5e-4)  # after warm-up: the schedule alone


def test_warmup_changes_training_and_is_seeded(prepared, tmp_path):
    cfg = TrainConfig(**FAST, epochs=2, schedule="constant", warmup_epochs=2)
    train(cfg, tmp_path / "a", log=lambda s: None)
    train(cfg, tmp_path / "b", log=lambda s: None)
    train(TrainConfig(**FAST, epochs=2, schedule="constant"), tmp_path / "plain", log=lambda s: None)
    assert history(tmp_path / "a") == history(tmp_path / "b")
    assert [float(r["lr"]) for r in history(tmp_path / "a")] == pytest.approx([5e-4, 1e-3])  # last step of each
    assert not same_weights(weights(tmp_path / "a"), weights(tmp_path / "plain"))


# ---------------------------------------------------------------- jitter
def test_colour_and_scale_jitter_keep_dtype_range_shape_and_are_identity_at_zero():
    x, g = batch(), torch.Generator().manual_seed(1)
    for out in (apply_colour_jitter(x, colour_draws(6, 0.0, g)), apply_scale_jitter(x, zoom_draws(6, 0.0, g))):
        assert out.dtype == torch.uint8 and out.shape == x.shape and torch.equal(out, x)
    col, zoom = apply_colour_jitter(x, colour_draws(6, 1.0, g)), apply_scale_jitter(x, zoom_draws(6, 0.5, g))
    for out in (col, zoom):
        assert out.dtype == torch.uint8 and out.shape == x.shape and not torch.equal(out, x)
    assert (zoom_draws(1000, 0.3, g) - 1).abs().max() <= 0.3
    f = colour_draws(1000, 0.5, g)
    assert (f[:, :3] - 1).abs().max() <= 0.2 and f[:, 3].abs().max() <= 0.05


def test_colour_jitter_brightness_only_scales_and_scale_jitter_zooms_in():
    x = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    draws = torch.tensor([[1.2, 1.0, 1.0, 0.0], [0.5, 1.0, 1.0, 0.0]])
    assert apply_colour_jitter(x, draws)[:, 0, 0, 0].tolist() == [120, 50]
    grad = torch.arange(16, dtype=torch.uint8).repeat(1, 3, 16, 1) * 10  # columns 0..150
    zoomed = apply_scale_jitter(grad, torch.tensor([2.0]))
    assert zoomed[0, 0, 0, 0] > grad[0, 0, 0, 0] and zoomed[0, 0, 0, -1] < grad[0, 0, 0, -1]  # the middle, enlarged


def test_jitter_draws_are_seeded():
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(colour_draws(5, 0.5, a), colour_draws(5, 0.5, b))
    assert torch.equal(zoom_draws(5, 0.5, a), zoom_draws(5, 0.5, b))


@pytest.mark.parametrize("option", [{"color_jitter": 0.5}, {"scale_jitter": 0.2}])
def test_jitter_changes_training_and_is_seeded(prepared, tmp_path, option):
    cfg = TrainConfig(**FAST, epochs=1, **option)
    train(cfg, tmp_path / "a", log=lambda s: None)
    train(cfg, tmp_path / "b", log=lambda s: None)
    train(TrainConfig(**FAST, epochs=1), tmp_path / "plain", log=lambda s: None)
    assert history(tmp_path / "a") == history(tmp_path / "b")
    assert same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert not same_weights(weights(tmp_path / "a"), weights(tmp_path / "plain"))


# ---------------------------------------------------------------- mixup / cutmix
def test_beta_quantile_has_the_beta_mean_and_spread():
    lam = beta_quantile(torch.rand(20000, generator=torch.Generator().manual_seed(0)), 0.2)
    assert lam.min() >= 0 and lam.max() <= 1
    assert lam.mean() == pytest.approx(0.5, abs=0.02)
    assert lam.var() == pytest.approx(1 / (4 * 1.4), rel=0.05)  # Beta(a, a): 1 / (4 (2a + 1))


def test_mixup_gives_soft_targets_summing_to_one_and_blends_the_pairs():
    x, y = batch(8).float() / 255, torch.arange(8) % 3
    draws = mix_draws(8, "mixup", torch.Generator().manual_seed(0))
    mixed, t = apply_mix(x, y, draws, "mixup", 0.4, 3)
    assert t.shape == (8, 3) and torch.allclose(t.sum(1), torch.ones(8))
    lam, partner = beta_quantile(draws[:, 0], 0.4), draws[:, 1].argsort()
    assert torch.allclose(mixed, lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[partner], atol=1e-6)
    assert torch.allclose(t[torch.arange(8), y] >= lam - 1e-6, torch.ones(8, dtype=torch.bool))


def test_cutmix_box_area_matches_lambda():
    x = torch.zeros(16, 3, 20, 20)
    x += torch.arange(16).view(-1, 1, 1, 1)  # image i is all i, so a pasted pixel tells its source
    y = torch.arange(16)  # one class per image, so the target's own-label weight is lambda
    draws = mix_draws(16, "cutmix", torch.Generator().manual_seed(2))
    mixed, t = apply_mix(x, y, draws, "cutmix", 1.0, 16)
    partner = draws[:, 1].argsort()
    own = (mixed[:, 0] == x[:, 0]).float().mean(dim=(1, 2))
    moved = partner != y
    lam = t[y, y]
    assert torch.allclose(t.sum(1), torch.ones(16))
    assert torch.allclose(own[moved], lam[moved], atol=1e-6)  # the kept area is exactly lambda
    assert (own[moved] < 1).any()  # some boxes really were pasted


def test_mix_trains_seeded_with_class_weights_and_label_smoothing(prepared, tmp_path):
    for mix in ("mixup", "cutmix"):
        cfg = TrainConfig(**FAST, epochs=1, mix=mix, label_smoothing=0.1, balance="class-weight")
        train(cfg, tmp_path / f"{mix}-a", log=lambda s: None)
        train(cfg, tmp_path / f"{mix}-b", log=lambda s: None)
        assert history(tmp_path / f"{mix}-a") == history(tmp_path / f"{mix}-b")
    train(TrainConfig(**FAST, epochs=1, label_smoothing=0.1, balance="class-weight"), tmp_path / "plain",
          log=lambda s: None)
    assert not same_weights(weights(tmp_path / "mixup-a"), weights(tmp_path / "plain"))
    assert not same_weights(weights(tmp_path / "mixup-a"), weights(tmp_path / "cutmix-a"))


# ---------------------------------------------------------------- EMA
def test_ema_equals_the_manual_average_on_a_tiny_model():
    from bloodcell.training.loop import make_ema

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = make_ema(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manual = None
    for _ in range(4):
        model.train()
        loss = model(torch.randn(8, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        now = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}
        manual = now if manual is None else {k: 0.9 * manual[k] + 0.1 * now[k] for k in now}
    got = ema.module.state_dict()
    assert all(torch.allclose(got[k], manual[k], atol=1e-6) for k in manual)  # BatchNorm statistics included
    assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"])
    assert make_ema(model, 0.0) is None


def test_ema_weights_are_validated_and_saved_and_differ_from_the_raw_ones(prepared, tmp_path):
    cfg = TrainConfig(**FAST, epochs=2, ema=0.9)
    train(cfg, tmp_path / "a", log=lambda s: None)
    train(cfg, tmp_path / "b", log=lambda s: None)
    train(TrainConfig(**FAST, epochs=2), tmp_path / "raw", log=lambda s: None)
    assert history(tmp_path / "a") == history(tmp_path / "b")
    state = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    assert int(state["ema"]["n_averaged"]) == 6  # 3 steps per epoch
    saved = weights(tmp_path / "a")
    ema_weights = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    assert same_weights(saved, ema_weights) and not same_weights(saved, state["model"])
    raw = history(tmp_path / "raw")
    # training is the same (the raw model does not see the average); validation is the average's
    assert [r["train_loss"] for r in history(tmp_path / "a")] == [r["train_loss"] for r in raw]
    assert [r["val_loss"] for r in history(tmp_path / "a")] != [r["val_loss"] for r in raw]


def test_resume_with_ema_and_every_option_on_ends_as_an_uninterrupted_run(prepared, tmp_path, monkeypatch):
    """Stopped inside epoch 2 and after epoch 1: the EMA (and every new option's draws) continue exactly."""
    from bloodcell.training import loop

    cfg = TrainConfig(**FAST, epochs=3, ema=0.8, warmup_epochs=1.5, mix="cutmix", color_jitter=0.3,
                      scale_jitter=0.1)
    train(cfg, tmp_path / "straight", log=lambda s: None)
    real_save, saves = loop.save_state, []

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(state.get("partial"))
        if len(saves) == 5:  # inside, inside, end of epoch 1, inside epoch 2, inside epoch 2
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", log=lambda s: None, save_every=0)
    monkeypatch.setattr(loop, "save_state", real_save)
    train(cfg, tmp_path / "cut", resume=True, log=lambda s: None)
    assert history(tmp_path / "cut") == history(tmp_path / "straight")
    for name in ("last", "best"):
        assert same_weights(weights(tmp_path / "cut", name), weights(tmp_path / "straight", name))


def test_state_without_ema_for_a_run_with_ema_is_a_clear_error(prepared, tmp_path):
    cfg = TrainConfig(**FAST, epochs=2, ema=0.9)
    train(TrainConfig(**FAST, epochs=1, ema=0.9), tmp_path / "r", log=lambda s: None)
    state = torch.load(tmp_path / "r" / "state.pt", weights_only=True)
    state["ema"] = None
    torch.save(state, tmp_path / "r" / "state.pt")
    with pytest.raises(BloodcellError, match="holds no moving average"):
        train(cfg, tmp_path / "r", resume=True, log=lambda s: None)


# ---------------------------------------------------------------- config and CLI
@pytest.mark.parametrize("field, value, message", [
    ("warmup_epochs", -1, "warmup_epochs must be in"), ("warmup_epochs", 30, "warmup_epochs must be in"),
    ("ema", 1.0, "ema must be in"), ("mix", "blend", "mix 'blend' is not one of"),
    ("mix_alpha", 0.0, "mix_alpha must be a positive"), ("color_jitter", 1.5, "color_jitter must be in"),
    ("scale_jitter", 1.0, "scale_jitter must be in"), ("ema", "0.9", "field 'ema' must be"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(BloodcellError, match=message):
        TrainConfig(**FAST, **{field: value}).validate()


def test_old_configs_load_with_the_options_off_and_presets_keep_them_off():
    from bloodcell.training import preset_config

    old = TrainConfig(**FAST).to_dict()
    for k in ("warmup_epochs", "ema", "mix", "mix_alpha", "color_jitter", "scale_jitter"):
        del old[k]
    loaded = TrainConfig.from_dict(old)
    assert (loaded.warmup_epochs, loaded.ema, loaded.mix, loaded.mix_alpha, loaded.color_jitter,
            loaded.scale_jitter) == (0, 0.0, "none", None, 0.0, 0.0)
    for recipe in ("recommended", "paper"):
        cfg = preset_config(recipe)
        assert (cfg.warmup_epochs, cfg.ema, cfg.mix, cfg.color_jitter, cfg.scale_jitter) == (0, 0, "none", 0, 0)


def test_cli_round_trip_into_config_json_with_and_without_recipe(prepared, tmp_path):
    from bloodcell.cli import main

    options = ["--warmup-epochs", "0.5", "--ema", "0.99", "--mix", "mixup", "--mix-alpha", "0.4",
               "--color-jitter", "0.2", "--scale-jitter", "0.1"]
    base = ["train", "--data", "bloodmnist", "--size", "28", "--epochs", "1", "--batch-size", "32",
            "--threads", "1", "--train-limit", "32"]
    for recipe in ([], ["--recipe", "paper"]):
        run = tmp_path / ("paper" if recipe else "rec")
        assert main([*base, *recipe, *options, "--out", str(run)]) == 0
        saved = json.loads((run / "config.json").read_text())
        assert {k: saved[k] for k in ("warmup_epochs", "ema", "mix", "mix_alpha", "color_jitter",
                                      "scale_jitter")} == dict(warmup_epochs=0.5, ema=0.99, mix="mixup",
                                                               mix_alpha=0.4, color_jitter=0.2, scale_jitter=0.1)
        assert saved["schedule"] == ("paper" if recipe else "cosine")
    assert main([*base, "--resume", "--ema", "0.9", "--out", str(tmp_path / "rec")]) == 2  # resume keeps 0.99
