import json
from pathlib import Path

import numpy as np
import pytest

from bloodcell.cli import main
from bloodcell.errors import BloodcellError
from bloodcell.explain.errors import confused_pairs, error_analysis
from bloodcell.explain.gradcam import (
    MIN_MAP_SIDE,
    GradCam,
    _without_inplace,
    centre_energy_share,
    default_layer,
    find_layer,
    heatmaps,
    randomisation_check,
    rank_correlations,
    spatial_layers,
)
from bloodcell.explain.runs import report
from bloodcell.inference import Classifier
from bloodcell.models import create_model, list_models


@pytest.mark.parametrize("name", [s.name for s in list_models()])
def test_every_registered_model_has_a_default_layer_that_localises(name):
    """The default is the model's own ``gradcam_layer``, else the last layer to finish with a map of at least
    MIN_MAP_SIDE cells a side; Grad-CAM there gives maps that vary over the image."""
    from captum.attr import LayerGradCam

    from bloodcell.data.tensors import Normalizer

    model = _without_inplace(create_model(name, input_size=64))
    layers = spatial_layers(model, 64)
    chosen, module = find_layer(model, 64)
    assert chosen == default_layer(model, layers) and module is model.get_submodule(chosen)
    info = next(x for x in layers if x.name == chosen)
    assert min(info.shape[1:]) >= MIN_MAP_SIDE  # every registered model has such a layer at 64 px
    if getattr(model, "gradcam_layer", None):
        assert chosen == model.gradcam_layer
    else:
        assert all(min(x.shape[1:]) < MIN_MAP_SIDE for x in layers[layers.index(info) + 1:])
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    maps = heatmaps(LayerGradCam(model, module), Normalizer(), images, np.array([0, 3]))
    assert maps.shape == (2, 64, 64) and all(np.ptp(m) > 0 for m in maps)


def test_default_layer_skips_maps_too_small_to_localise():
    # se-vgg15 ends at 2x2 on 64 px; a 2x2 map upsampled gives the uniform centre share whatever it holds
    model = create_model("se-vgg15", input_size=64)
    layers = spatial_layers(model, 64)
    name, _ = find_layer(model, 64)
    chosen = next(x for x in layers if x.name == name)
    assert min(layers[-1].shape[1:]) == 2 and min(chosen.shape[1:]) == 4
    assert chosen is [x for x in layers if min(x.shape[1:]) >= 4][-1]
    uniform = centre_energy_share(np.ones((1, 64, 64)))
    quadrants = np.kron(np.array([[[1.0, 5.0], [2.0, 9.0]]]), np.ones((32, 32)))
    assert centre_energy_share(quadrants) == pytest.approx(uniform, abs=0.02)


def test_autoclassifier_maps_come_from_its_encoder_and_are_not_uniform():
    # its head sees a 2x2 reshape of a dense code: maps there would be flat, so it names an encoder layer
    from captum.attr import LayerGradCam

    from bloodcell.data.tensors import Normalizer

    model = _without_inplace(create_model("autoclassifier", input_size=32))
    name, layer = find_layer(model, 32)
    assert name.startswith("encoder.") and name == model.gradcam_layer
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    maps = heatmaps(LayerGradCam(model, layer), Normalizer(), images, np.array([0, 1, 2]))
    assert maps.shape == (3, 32, 32) and all(np.ptp(m) > 0 for m in maps)


def test_maps_have_input_size_and_depend_on_target(run):
    from bloodcell.data.store import load_dataset

    gc = GradCam(Classifier.from_run(run))
    images = load_dataset("bloodmnist", 28).images["test"][:6]
    m0, probs = gc.maps(images, 0)
    m5, _ = gc.maps(images, 5)
    assert m0.shape == (6, 28, 28) and probs.shape == (6, 8)
    assert not np.allclose(m0, m5)
    with pytest.raises(BloodcellError, match="not a spatial layer"):
        GradCam(Classifier.from_run(run), layer="head")


def test_centre_share_and_rank_correlation_are_measured():
    centre = np.zeros((1, 20, 20))
    centre[0, 8:12, 8:12] = 1
    border = np.zeros((1, 20, 20))
    border[0, :2, :] = 1
    assert centre_energy_share(centre)[0] == 1.0 and centre_energy_share(border)[0] == 0.0
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 8, 8))
    rho = rank_correlations(a, np.stack([a[0], -a[1], rng.normal(size=(8, 8))]))
    assert rho[0] == pytest.approx(1) and rho[1] == pytest.approx(-1) and abs(rho[2]) < 0.5


def test_report_measures_the_maps_and_cli(run, tmp_path, capsys):
    from PIL import Image

    from bloodcell.data.store import load_dataset

    r = report(run, randomisation_images=4)
    d = load_dataset("bloodmnist", 28)
    images, labels = d.images["test"], d.labels["test"]
    gc = GradCam(Classifier.from_run(run))
    maps, probs = gc.maps(images)
    share = centre_energy_share(maps)
    assert r["images"] == 32 and r["layer"] == gc.layer_name == find_layer(gc.model, 28)[0]
    assert r["centre_energy_share_mean"] == pytest.approx(np.nanmean(share), abs=1e-4)
    assert list(r["centre_energy_share_per_class"]) == d.class_names
    for i, c in enumerate(d.class_names):
        values = share[labels == i]
        want = np.nanmean(values) if np.isfinite(values).any() else None
        assert r["centre_energy_share_per_class"][c] == (None if want is None else pytest.approx(want, abs=1e-4))
    rho = randomisation_check(gc, images[:4], probs[:4].argmax(1), seed=0)
    assert r["randomisation_images"] == 4
    assert r["randomisation_spearman_mean"] == pytest.approx(np.nanmean(rho), abs=1e-4)
    assert r["accuracy_on_these_images"] == pytest.approx((probs.argmax(1) == labels).mean(), abs=1e-4)
    assert json.loads((run / "explain" / "gradcam_report.json").read_text()) == r

    Image.fromarray(np.full((50, 60, 3), 180, np.uint8)).save(tmp_path / "x.png")
    out = str(tmp_path / "o")
    assert main(["explain", str(run), str(tmp_path / "x.png"), "--class", "platelet", "--out", out]) == 0
    _, cls, prob, png = capsys.readouterr().out.strip().split("\t")[:4]  # then any warnings
    x = np.array(gc.classifier.preprocess(tmp_path / "x.png")[0])[None]
    p_platelet = gc.classifier.predict_arrays(x)[0, gc.class_index("platelet")]
    assert cls == "platelet" and prob == f"{p_platelet:.4f}"  # the asked class, not the predicted one
    assert png == str(tmp_path / "o" / "x_gradcam_platelet.png") and Path(png).is_file()
    assert main(["explain", str(run), "--grid", "--per-class", "1", "--compare", str(run)]) == 0
    assert (run / "explain" / "gradcam_grid_test.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["explain", "--list-layers", str(run)]) == 0
    marked = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.endswith("(default)")]
    assert marked == [gc.layer_name]


def test_error_galleries_and_confused_pairs(run, capsys):
    pairs = confused_pairs(np.array([0, 0, 0, 1, 1]), np.array([1, 1, 0, 0, 1]), ["a", "b"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("a", "b", 2), ("b", "a", 1)]
    assert [p["indices"] for p in pairs] == [[0, 1], [3]] and pairs[0]["share_of_true"] == pytest.approx(2 / 3, 1e-3)
    pairs = confused_pairs(np.array([0, 1, 1, 1, 2]), np.array([1, 0, 0, 2, 2]), ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("b", "a", 2), ("a", "b", 1), ("b", "c", 1)]
    r = error_analysis(run, "test", per_class=3)
    for key in ("correct", "incorrect", "confused_pairs_csv", "confused_pairs_md"):
        assert (run / "errors_test" / r["files"][key].split("/")[-1]).is_file()
    assert main(["errors", str(run), "--per-class", "2"]) == 0
    capsys.readouterr()
    # the same pass as evaluate: its confusion matrix off the diagonal, most frequent first
    assert main(["evaluate", str(run), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    cm, names = np.array(m["confusion_matrix"]), m["class_names"]
    off = sorted(((names[t], names[p], int(cm[t, p])) for t, p in zip(*np.nonzero(cm)) if t != p),
                 key=lambda x: (-x[2], x[0], x[1]))
    assert [(p["true"], p["predicted"], p["count"]) for p in r["pairs"]] == off
    assert r["n"] == 32 and r["errors"] == cm.sum() - np.trace(cm) and r["accuracy"] == pytest.approx(m["accuracy"])


def test_grid_takes_a_checkpoint_and_a_name_per_run(run, tmp_path, monkeypatch):
    from bloodcell.explain import runs

    seen = {}

    def capture(images, labels, class_names, maps_by_run, captions_by_run, path, title=""):
        seen.update(maps_by_run)
        return path

    monkeypatch.setattr(runs, "heatmap_grid_png", capture)
    runs.grid([run, run], per_class=1, out=tmp_path, checkpoint=["best", "last"], names=["attention", "plain"])
    assert list(seen) == ["attention", "plain"] and seen["attention"].shape[1:] == (28, 28)
    with pytest.raises(BloodcellError, match="one checkpoint, or one per run"):
        runs.grid([run, run], checkpoint=["best"])
