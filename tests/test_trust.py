"""Trust: calibration, test-time augmentation, abstention, conformal sets, OOD scores and corruptions.

Synthetic data first (where the right answer is known), then a tiny trained run through the commands, then the
real PBC images (skipped when absent).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from crepes import ConformalClassifier
from PIL import Image
from scipy.special import softmax

from bloodcell.cli import main
from bloodcell.errors import BloodcellError
from bloodcell.evaluation.evaluate import calibrate_run, evaluate_run
from bloodcell.inference import Classifier
from bloodcell.inference.classifier import OOD_STATUS
from bloodcell.models import create_model
from bloodcell.trust.calibration import calibration_metrics, fit_temperature, mean_probabilities
from bloodcell.trust.conformal import (
    conformal_quantile,
    coverage_and_size,
    nonconformity,
    prediction_sets,
    true_class_scores,
)
from bloodcell.trust.corruptions import CORRUPTIONS, corrupt
from bloodcell.trust.ood import FeatureStats, energy_score, msp_score, separation, threshold_at_rate
from bloodcell.trust.selective import risk_coverage, selective_at, threshold_for_accuracy
from bloodcell.trust.store import load_calibration
from bloodcell.trust.tta import n_views, tta_views


def calibrated_logits(n: int, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution (labels are drawn from it): calibrated by design."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (n, k))
    p = softmax(z, 1)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z, y


# ---------------------------------------------------------------- calibration
def test_an_over_confident_model_gets_a_temperature_above_one_and_a_lower_ece():
    z, y = calibrated_logits(6000)
    over = 3.0 * z  # the same ranking, three times too sure
    t = fit_temperature(over, y)
    assert 2.5 < t < 3.5
    before = calibration_metrics(mean_probabilities(over), y)
    after = calibration_metrics(mean_probabilities(over, t), y)
    assert after["ece"] < before["ece"] / 3 and after["nll"] < before["nll"] and after["brier"] < before["brier"]
    assert after["accuracy"] == before["accuracy"]  # a temperature never changes the argmax
    assert 0.85 < fit_temperature(z, y) < 1.15  # already calibrated: T stays near 1


def test_temperature_of_tta_views_is_fitted_on_the_view_average():
    z, y = calibrated_logits(3000)
    views = np.stack([3 * z, 3 * z])  # two identical views average to the same probabilities
    assert fit_temperature(views, y) == pytest.approx(fit_temperature(3 * z, y), rel=1e-3)
    with pytest.raises(BloodcellError, match="one label per image"):
        fit_temperature(z, y[:-1])


def test_calibration_metrics_follow_their_definitions():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])
    m = calibration_metrics(probs, y)
    # bins of 1/15: 0.95 -> bin 14 (acc 0.5, conf 0.95), 0.6 -> bin 8 (acc 1), 0.7 -> bin 10 (acc 1)
    assert m["ece"] == pytest.approx((2 * 0.45 + 0.4 + 0.3) / 4)
    assert m["mce"] == pytest.approx(0.45)
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.95, 0.05, 0.6, 0.7])))
    assert m["brier"] == pytest.approx(np.mean(((probs - np.eye(2)[y]) ** 2).sum(1)))
    assert sum(m["bins"]["count"]) == 4 and len(m["bins"]["count"]) == 15


# ---------------------------------------------------------------- test-time augmentation
def tiny_classifier(k: int = 3, **kw) -> Classifier:
    from bloodcell.data.recipe import Recipe

    torch.manual_seed(0)
    return Classifier(create_model("se-cnn", num_classes=k, input_size=28), class_names=list("abc")[:k],
                      recipe=Recipe(28, 28), device="cpu", **kw)


def test_tta_views_are_the_flips_and_symmetries_in_one_forward_pass():
    x = torch.randint(0, 255, (5, 3, 28, 28), dtype=torch.uint8)
    v = tta_views(x, "flip").view(4, 5, 3, 28, 28)
    assert torch.equal(v[0], x) and torch.equal(v[1], x.flip(3)) and torch.equal(v[3], x.flip(2).flip(3))
    d = tta_views(x, "dihedral").view(8, 5, 3, 28, 28)
    assert len({d[i, 0].numpy().tobytes() for i in range(8)}) == 8  # eight different views
    assert n_views("none") == 1 and torch.equal(tta_views(x, "none"), x)
    with pytest.raises(BloodcellError, match="unknown --tta"):
        n_views("rotate")

    clf = tiny_classifier()
    calls = []
    clf.model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    z, feats = clf.view_logits(x, "dihedral", features=True)
    assert calls == [40] and z.shape == (8, 5, 3) and feats.shape == (5, 256)  # 5 images x 8 views, one pass
    with torch.no_grad():
        by_hand = torch.stack([clf.model.eval()(clf.norm(d[i])) for i in range(8)])
    assert torch.allclose(z, by_hand, atol=1e-4)
    p = clf.probabilities(x, tta="dihedral")
    assert torch.allclose(p, torch.softmax(by_hand, -1).mean(0), atol=1e-5)


# ---------------------------------------------------------------- abstention
def test_risk_coverage_and_the_threshold_for_a_target_accuracy():
    conf = np.array([0.99, 0.95, 0.9, 0.9, 0.8, 0.6])
    right = np.array([1, 1, 1, 0, 1, 0], bool)
    rc = risk_coverage(conf, right)
    # ties (0.9, 0.9) are accepted together: coverage points 1/6, 2/6, 4/6, 5/6, 1
    assert rc["coverage"].tolist() == pytest.approx([1 / 6, 2 / 6, 4 / 6, 5 / 6, 1])
    assert rc["risk"].tolist() == pytest.approx([0, 0, 0.25, 0.2, 2 / 6])
    assert rc["aurc"] == pytest.approx((0 + 0 + 0.25 * 2 + 0.2 + 2 / 6) / 6)
    assert threshold_for_accuracy(conf, right, 1.0) == 0.95
    assert threshold_for_accuracy(conf, right, 0.8) == 0.8
    assert threshold_for_accuracy(conf, right, 0.5) == 0.0  # all accepted already reach it
    assert threshold_for_accuracy(conf, ~right, 0.99) is None  # the most confident is wrong: nothing reaches it
    assert selective_at(conf, right, 0.9) == {"threshold": 0.9, "coverage": 4 / 6, "accepted": 4, "accuracy": 0.75}
    assert selective_at(conf, right, None)["accepted"] == 0


# ---------------------------------------------------------------- conformal prediction
@pytest.mark.parametrize("method", ["lac", "aps"])
def test_conformal_sets_hold_the_true_class_at_the_promised_rate_on_held_out_data(method):
    z, y = calibrated_logits(8000, k=6, seed=1)
    p = softmax(z, 1)
    cal, test = slice(0, 3000), slice(3000, None)
    for alpha in (0.1, 0.05, 0.01):
        q = conformal_quantile(true_class_scores(p[cal], y[cal], method), alpha)
        r = coverage_and_size(prediction_sets(p[test], q, method), y[test])
        assert 1 - alpha - 0.015 <= r["coverage"] <= 1 - alpha + 0.03, (alpha, r)
        assert 1 <= r["mean_set_size"] <= 6
        if alpha == 0.1:
            assert r["mean_set_size"] < 5  # informative: far from every class


def test_conformal_sets_equal_crepes_unsmoothed_sets():
    z, y = calibrated_logits(1500, k=5, seed=2)
    p = softmax(z, 1)
    for method in ("lac", "aps"):
        cal = true_class_scores(p[:500], y[:500], method)
        cc = ConformalClassifier().fit(cal)
        for alpha in (0.1, 0.05):  # 501 * (1 - alpha) is not a whole number: no tie in the rank rule
            ours = prediction_sets(p[500:], conformal_quantile(cal, alpha), method)
            theirs = cc.predict_set(nonconformity(p[500:], method), confidence=1 - alpha, smoothing=False)
            assert np.array_equal(ours, theirs.astype(bool)), (method, alpha)


def test_conformal_quantile_rank_and_bad_alpha():
    scores = np.arange(1, 100) / 100  # n = 99
    assert conformal_quantile(scores, 0.1) == pytest.approx(0.90)  # ceil(100 * 0.9) = 90, not 91 (float error)
    assert conformal_quantile(scores[:5], 0.01) == np.inf  # too few scores for 99%: the set is every class
    with pytest.raises(BloodcellError, match="between 0 and 1"):
        conformal_quantile(scores, 1.5)


# ---------------------------------------------------------------- out of distribution
def test_a_planted_out_of_distribution_batch_gets_higher_scores():
    rng = np.random.default_rng(0)
    k, d = 4, 64
    centres = rng.normal(0, 1, (k, d)) * 3

    def cells(n):
        y = rng.integers(0, k, n)
        return centres[y] + rng.normal(0, 1, (n, d)), y

    train, ytr = cells(2000)
    val, _ = cells(1000)
    planted = rng.normal(0, 1, (300, d)) * 3  # features no class produces
    stats = FeatureStats.fit(train, ytr, dim=32)
    for method in ("mahalanobis", "knn"):
        id_s, ood_s = stats.score(method, val), stats.score(method, planted)
        assert separation(id_s, ood_s)["auroc"] > 0.95, method
        t = threshold_at_rate(id_s[:500], 0.01)
        assert (id_s[500:] > t).mean() < 0.05 and (ood_s > t).mean() > 0.8
    again = FeatureStats.from_arrays(stats.arrays(), k=stats.k)
    assert np.allclose(again.knn(planted), stats.knn(planted), atol=1e-5)
    logits = np.array([[8.0, 0, 0], [0.1, 0, 0]])
    assert msp_score(softmax(logits, 1))[0] < msp_score(softmax(logits, 1))[1]
    assert energy_score(logits)[0] < energy_score(logits)[1]
    with pytest.raises(BloodcellError, match="do not match"):
        stats.knn(np.zeros((2, 10)))


# ---------------------------------------------------------------- corruptions
def test_corruptions_keep_shape_and_grow_with_severity():
    rng = np.random.default_rng(0)
    from conftest import synthetic_cell

    x = torch.from_numpy(np.stack([synthetic_cell(i % 3, rng, 64) for i in range(6)])).permute(0, 3, 1, 2)
    for name in CORRUPTIONS:
        outs = [corrupt(x, name, s) for s in (1, 5)]
        assert all(o.dtype == torch.uint8 and o.shape == x.shape for o in outs), name
        d1, d5 = ((o.float() - x.float()).abs().mean().item() for o in outs)
        assert d5 > d1 > 0, (name, d1, d5)
    assert torch.equal(corrupt(x, "gaussian_noise", 3, seed=1), corrupt(x, "gaussian_noise", 3, seed=1))
    with pytest.raises(BloodcellError, match="unknown corruption"):
        corrupt(x, "fog", 1)
    with pytest.raises(BloodcellError, match="severity"):
        corrupt(x, "jpeg", 6)


# ---------------------------------------------------------------- a trained run, end to end
def test_calibrate_then_evaluate_and_predict_carry_the_trust_signals(run, tmp_path, capsys):
    assert main(["calibrate", str(run), "--tta", "none,flip"]) == 0
    out = capsys.readouterr().out
    assert "calibrated on 32 validation images" in out and "flip" in out
    saved = json.loads((run / "calibration.json").read_text())
    assert set(saved["modes"]) == {"none", "flip"} and saved["features"]["feature_dim"] == 256
    clf = Classifier.from_run(run)
    assert clf.temperature == pytest.approx(saved["modes"]["none"]["temperature"])
    assert clf.temperature_for("flip") == pytest.approx(saved["modes"]["flip"]["temperature"])

    m = evaluate_run(run, "test", tta="flip")
    cal = m["calibration"]
    assert cal["before"]["ece"] >= 0 and cal["after"] is not None and cal["temperature"] == clf.temperature_for("flip")
    assert set(m["abstention"]) == {"0.99", "0.995", "0.999"} and 0 <= m["risk_coverage"]["aurc"] <= 1
    assert m["conformal"]["0.1"]["mean_set_size"] >= 1 or m["conformal"]["0.1"]["empty_share"] > 0
    for name in ("reliability_test_tta_flip.png", "risk_coverage_test_tta_flip.png"):
        assert (run / name).stat().st_size > 1000
    assert "test_tta_flip" in json.loads((run / "metrics.json").read_text())

    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((200, 200, 3), 40, np.uint8)).save(flat)
    (r,) = clf.predict_files([flat], conformal=0.1)
    f = r.flags
    assert f["calibrated"] and f["status"] in ("ok", "review", OOD_STATUS) and f["tta"] == "none"
    assert f["review"] == (f["out_of_distribution"] or f["review_threshold"] is None
                           or f["confidence"] < f["review_threshold"])
    assert set(f["conformal_set"]) <= set(clf.class_names)
    (r,) = clf.predict_files([flat], review_below=1.0)
    assert r.flags["review"] and r.flags["status"] != "ok"
    assert clf.predict_files([flat], review_below=0.0)[0].flags["review"] == r.flags["out_of_distribution"]


def test_evaluate_corruptions_and_uncalibrated_runs(run, capsys):
    assert main(["evaluate", str(run), "--tta", "flip", "--corruptions", "--corruption-images", "8"]) == 0
    out = capsys.readouterr().out
    assert "trust (TTA flip)" in out and "corruptions (8 images" in out and "corruptions_test_tta_flip.png" in out
    m = evaluate_run(run, "test", corruptions=True, corruption_images=16)
    k = m["corruptions"]
    assert k["images"] == 16 and set(k["corruptions"]) == set(CORRUPTIONS)
    assert 0 <= k["mean_corruption_accuracy"] <= 1 and k["mean_ood_flagged_share"] is None  # not calibrated
    assert m["calibration"]["after"] is None and "abstention" not in m
    assert (run / "corruptions_test.png").is_file()
    with pytest.raises(BloodcellError, match="calibrate"):
        Classifier.from_run(run).predict_files([run], conformal=0.1)


def test_a_stale_calibration_is_ignored_with_a_warning(run, capsys):
    from bloodcell.inference import load_model, save_weights

    calibrate_run(run, modes=("none",))
    assert load_calibration(run, run / "best.safetensors") is not None
    (run / "calibration.safetensors").write_bytes(b"damaged")
    assert Classifier.from_run(run).calibration is None
    assert "does not match" in capsys.readouterr().err
    calibrate_run(run, modes=("none",))
    model, meta = load_model(run / "best.safetensors")  # retrained since: other weights, same file name
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_weights(run / "best.safetensors", model, meta)
    clf = Classifier.from_run(run)
    assert clf.calibration is None and clf.temperature == 1.0
    assert "fitted for other weights" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--conformal", "1.5"], "--conformal takes"),
    (["--review-below", "2"], "--review-below is a probability"),
    (["--review-below", "0.5", "--target-accuracy", "0.99"], "not both"),
    (["--target-accuracy", "0.99"], "needs the run's validation calibration"),
])
def test_bad_trust_options_are_one_line_errors(run, args, message):
    kw = {"--conformal": "conformal", "--review-below": "review_below", "--target-accuracy": "target_accuracy"}
    opts = {kw[args[i]]: float(args[i + 1]) for i in range(0, len(args), 2)}
    with pytest.raises(BloodcellError, match=message):
        Classifier.from_run(run).predict_files([run], **opts)


def test_calibrate_cli_errors_are_one_line(run, tmp_path, capsys):
    assert main(["calibrate", str(tmp_path / "nope")]) != 0
    assert capsys.readouterr().err.startswith("bloodcell: error:")
    with pytest.raises(SystemExit):
        main(["calibrate", str(run), "--tta", "none,spin"])
    assert "comma-separated list" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", str(run), "--target-accuracy", "1.2"])
    assert "between 0 and 1" in capsys.readouterr().err


# ---------------------------------------------------------------- the real PBC images
@pytest.mark.slow
def test_trust_on_a_real_subset(pbc, tmp_path):
    from conftest import real_subset_split

    from bloodcell.data.sources import prepare_from_folder
    from bloodcell.training import TrainConfig, train

    split = real_subset_split(pbc, tmp_path / "subset.csv", {"train": 40, "val": 25, "test": 25})
    prepare_from_folder(pbc, size=64, split_file=split, name="pbctrust", progress=False)
    run = tmp_path / "run"
    train(TrainConfig(model="se-cnn", model_args={"bn_momentum": 0.3}, data="pbctrust", size=64, epochs=3,
                      batch_size=32, schedule="cosine", augment="dihedral", seed=0, threads=1), run, log=lambda s: None)
    c = calibrate_run(run, modes=("none",), ood_rate=0.05)
    assert c["validation_images"] == 200 and np.isfinite(c["modes"]["none"]["temperature"])
    m = evaluate_run(run, "test")
    assert m["conformal"]["0.1"]["coverage"] >= 0.75  # 1 - alpha = 0.9, on 200 test images after 200 to calibrate
    fit = c["modes"]["none"]
    assert fit["val_after"]["nll"] <= fit["val_before"]["nll"] + 1e-6  # T minimises the validation NLL
    assert m["calibration"]["after"]["accuracy"] == m["accuracy"]  # and never changes a prediction

    # flat colours and noise at the PBC files' size are scored as less like a cell than the real test cells
    rng = np.random.default_rng(0)
    odd = tmp_path / "odd"
    odd.mkdir()
    for i, colour in enumerate([(255, 255, 255), (0, 0, 0), (128, 128, 128), (230, 200, 210)]):
        Image.fromarray(np.full((219, 216, 3), colour, np.uint8)).save(odd / f"flat{i}.png")
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (219, 216, 3), dtype=np.uint8)).save(odd / f"noise{i}.png")
    clf = Classifier.from_run(run)
    with open(split) as f:
        cells = [pbc / r["path"] for r in csv.DictReader(f) if r["split"] == "test"][:40]
    cell_scores = np.array([p.flags["ood_score"] for p in clf.predict_files(cells)])
    odd_scores = np.array([p.flags["ood_score"] for p in clf.predict_files([odd])])
    assert np.median(odd_scores) > np.quantile(cell_scores, 0.9)
