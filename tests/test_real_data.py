"""Smoke tests on the real PBC images (skipped when ../shared/data/pbc is absent)."""


import numpy as np
import pytest
import torch
from conftest import real_subset_split
from PIL import Image
from safetensors.torch import load_file

from bloodcell.data.images import load_rgb
from bloodcell.data.recipe import Recipe, apply_recipe
from bloodcell.data.sources import prepare_from_folder
from bloodcell.evaluation.evaluate import evaluate_run
from bloodcell.inference import Classifier
from bloodcell.models import create_model
from bloodcell.training import TrainConfig, train

PER_SPLIT = {"train": 40, "val": 10, "test": 10}


@pytest.fixture
def real_subset(pbc, tmp_path):
    """A split file naming the first images of each class and split of the real split.csv."""
    split = real_subset_split(pbc, tmp_path / "subset.csv", PER_SPLIT)
    info = prepare_from_folder(pbc, size=64, split_file=split, name="pbcsmall", progress=False)
    return pbc, info


def test_real_subset_prepare_train_evaluate_predict(real_subset, tmp_path):
    pbc, info = real_subset
    assert info["class_names"] == ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte",
                                   "neutrophil", "platelet"]
    assert info["counts"]["train"] == [40] * 8 and info["skipped"] == []
    run = tmp_path / "run"
    # Keras BN momentum (0.01) needs hundreds of steps before eval-mode statistics are right; 30 steps need more.
    cfg = TrainConfig(model="se-cnn", model_args={"bn_momentum": 0.3}, data="pbcsmall", size=64, epochs=3,
                      batch_size=32, schedule="cosine", augment="dihedral", seed=0)
    train(cfg, run, log=lambda s: None)
    m = evaluate_run(run, "test", speed=False)
    assert m["n"] == 80 and m["accuracy"] > 0.3  # chance is 0.125; a real model learns something in 3 epochs

    # prediction on the original JPEG uses the training recipe: the same pixels as the prepared npz
    with np.load(info["npz"]) as z:
        prepared, labels = z["test_images"], z["test_labels"].reshape(-1)
    # the reported accuracy is the best weights' on the prepared test images (pixels / 255), computed here
    model = create_model("se-cnn", input_size=64, bn_momentum=0.3)
    model.load_state_dict(load_file(run / "best.safetensors"))
    with torch.no_grad():
        guess = model.eval()(torch.from_numpy(np.array(prepared)).permute(0, 3, 1, 2).float() / 255).argmax(1)
    assert m["accuracy"] == pytest.approx(float((guess.numpy() == labels).mean()))
    first_test = info["paths"]["test"][0]
    recipe = Recipe(64, 200)
    assert np.array_equal(apply_recipe(load_rgb(pbc / first_test), recipe), prepared[0])

    # a full-size original (360x363) whose centred 200x200 crop is this file's, and the 64x64 version,
    # give the same answer
    small = load_rgb(pbc / first_test)
    canvas = Image.new("RGB", (360, 363), (255, 255, 255))
    canvas.paste(small, ((360 - 200) // 2 - (small.width - 200) // 2, (363 - 200) // 2 - (small.height - 200) // 2))
    canvas.save(tmp_path / "original.png")
    Image.fromarray(prepared[0]).save(tmp_path / "prepared64.png")
    pred = Classifier.from_run(run)
    res = {r.path.split("/")[-1]: r for r in pred.predict_files(
        [tmp_path / "original.png", tmp_path / "prepared64.png", pbc / first_test], top_k=8)}
    assert res["original.png"].top == res["prepared64.png"].top == res[first_test.split("/")[-1]].top
