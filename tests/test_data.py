import csv
import json

import numpy as np
import pytest
from conftest import CLASSES
from PIL import Image

from bloodcell.data.images import load_rgb
from bloodcell.data.recipe import Recipe, apply_recipe
from bloodcell.data.sources import download_bloodmnist, prepare_from_folder, prepare_from_npz
from bloodcell.data.store import list_datasets, load_dataset, read_npz
from bloodcell.errors import BloodcellError


def test_prepare_folder_writes_medmnist_npz_and_metadata(image_tree):
    info = prepare_from_folder(image_tree, size=28, crop=80, progress=False)
    assert info["name"] == "cells" and info["class_names"] == CLASSES and not info["reused"]
    with np.load(info["npz"]) as z:
        assert set(z.files) == {f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")}
        assert z["train_images"].dtype == np.uint8 and z["train_images"].shape[1:] == (28, 28, 3)
        assert z["train_labels"].shape[1] == 1
        total = sum(len(z[f"{s}_labels"]) for s in ("train", "val", "test"))
    assert total == 60
    # seeded stratified 70/10/20 split: 14/2/4 of 20 per class
    assert info["counts"] == {"train": [14] * 3, "val": [2] * 3, "test": [4] * 3}
    meta = json.loads(open(info["json"]).read())
    assert meta["recipe"] == {"size": 28, "crop": 80, "interpolation": "bicubic-antialiased (PIL)"}
    assert meta["fingerprint"] and meta["split_source"]["kind"] == "stratified"
    assert [d["name"] for d in list_datasets()] == ["cells"]


def test_prepare_reuses_cache_and_rebuilds_on_change(image_tree):
    first = prepare_from_folder(image_tree, size=28, progress=False)
    again = prepare_from_folder(image_tree, size=28, progress=False)
    assert again["reused"] and again["fingerprint"] == first["fingerprint"]
    other_recipe = prepare_from_folder(image_tree, size=28, crop=60, progress=False)
    assert not other_recipe["reused"] and other_recipe["fingerprint"] != first["fingerprint"]
    img = image_tree / "beta" / "beta_001.jpg"
    Image.fromarray(np.zeros((97, 96, 3), np.uint8)).save(img)
    changed = prepare_from_folder(image_tree, size=28, crop=60, progress=False)
    assert not changed["reused"]


def test_undecodable_files_are_skipped_and_listed(image_tree):
    (image_tree / "alpha" / "notes.txt").write_text("not an image")
    good = (image_tree / "gamma" / "gamma_001.jpg").read_bytes()
    (image_tree / "gamma" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (image_tree / "beta" / "empty.png").write_bytes(b"")
    info = prepare_from_folder(image_tree, size=28, progress=False)
    skipped = {s["path"]: s["reason"] for s in info["skipped"]}
    assert set(skipped) == {"alpha/notes.txt", "gamma/truncated.jpg", "beta/empty.png"}
    assert skipped["alpha/notes.txt"] == skipped["beta/empty.png"] == "not an image file PIL can read"
    assert skipped["gamma/truncated.jpg"].startswith("cannot decode image")
    assert sum(sum(c) for c in info["counts"].values()) == 60
    assert json.loads(open(info["json"]).read())["skipped"] == info["skipped"]


def test_split_file_is_used(image_tree, tmp_path):
    rows = []
    for c, name in enumerate(CLASSES):
        for i in range(20):
            ext = "png" if i % 4 == 0 else "jpg"
            rows.append((f"{name}/{name}_{i:03d}.{ext}", c, ["train", "train", "val", "test"][i % 4]))
    split = tmp_path / "split.csv"
    with open(split, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows[:-1])  # one file left out of the split: it is not imported
    info = prepare_from_folder(image_tree, size=28, split_file=split, name="withsplit", progress=False)
    assert info["split_source"]["kind"] == "file"
    assert info["counts"] == {"train": [10, 10, 10], "val": [5, 5, 5], "test": [5, 5, 4]}
    assert info["paths"]["val"][0] == "alpha/alpha_002.jpg"


def test_bad_sources_are_one_line_errors(image_tree, tmp_path):
    with pytest.raises(BloodcellError, match="source folder not found"):
        prepare_from_folder(tmp_path / "missing", progress=False)
    (image_tree / "delta").mkdir()
    with pytest.raises(BloodcellError, match="class folder 'delta' is empty"):
        prepare_from_folder(image_tree, progress=False)
    (image_tree / "delta").rmdir()
    split = tmp_path / "split.csv"
    split.write_text("path,label,split\nalpha/ghost.jpg,0,train\n")
    with pytest.raises(BloodcellError, match=r"missing.*alpha/ghost.jpg"):
        prepare_from_folder(image_tree, split_file=split, progress=False)


def test_npz_roundtrip_and_validation(tiny_npz, tmp_path):
    info = prepare_from_npz(tiny_npz)
    assert info["name"] == "bloodmnist" and info["size"] == 28
    d = load_dataset("bloodmnist", 28)
    assert d.class_names[0] == "basophil" and d.images["train"].shape == (96, 28, 28, 3)
    assert load_dataset(str(tiny_npz)).num_classes == 8
    with pytest.raises(BloodcellError, match="--size 64"):
        prepare_from_npz(tiny_npz, size=64)

    arrays = dict(np.load(tiny_npz))
    bad_key = tmp_path / "badkey.npz"
    np.savez(bad_key, **{k.replace("val_", "valid_"): v for k, v in arrays.items()})
    with pytest.raises(BloodcellError, match="missing key.*val_images"):
        read_npz(bad_key)
    bad_dtype = tmp_path / "baddtype.npz"
    np.savez(bad_dtype, **{**arrays, "train_images": arrays["train_images"].astype(np.float32)})
    with pytest.raises(BloodcellError, match="dtype float32, expected uint8"):
        read_npz(bad_dtype)
    bad_range = tmp_path / "badrange.npz"
    np.savez(bad_range, **{**arrays, "test_labels": arrays["test_labels"] + 8})
    with pytest.raises(BloodcellError, match="test_labels has label.s. 8, 9, .* that train_labels never has"):
        prepare_from_npz(bad_range)
    shifted = tmp_path / "shifted.npz"
    np.savez(shifted, **{k: v + 8 if k.endswith("_labels") else v for k, v in arrays.items()})
    with pytest.raises(BloodcellError, match="labels go up to 15, but class_names has only 8 names"):
        prepare_from_npz(shifted, class_names=d.class_names)
    not_npz = tmp_path / "junk.npz"
    not_npz.write_bytes(b"junk")
    with pytest.raises(BloodcellError, match="not an npz file") as e:
        read_npz(not_npz)
    assert "allow_pickle" not in str(e.value)


def test_unknown_dataset_name_is_a_clear_error():
    with pytest.raises(BloodcellError, match="dataset 'nothere' at 64px not found.*bloodcell data prepare"):
        load_dataset("nothere", 64)


def test_download_offline_says_how_to_use_a_local_file(monkeypatch):
    import medmnist

    def offline(*args, **kwargs):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(medmnist, "BloodMNIST", offline)
    with pytest.raises(BloodcellError, match=r"could not download BloodMNIST.*--npz bloodmnist_64.npz"):
        download_bloodmnist(64)


def test_default_dataset_is_never_downloaded_by_the_loader(monkeypatch):
    calls = []
    monkeypatch.setattr("bloodcell.data.sources.download_bloodmnist", lambda *a, **k: calls.append(a))
    with pytest.raises(BloodcellError, match=r"'bloodmnist' at 128px is not prepared.*--download --size 128.*"
                                             r"--npz FILE.*--source DIR"):
        load_dataset("bloodmnist", 128)
    assert calls == []


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_any_image_mode_decodes_to_rgb(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        path = tmp_path / "x16.png"
    else:
        img = img.convert(mode)
        path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (50, 40)
    if mode == "I;16":  # full 16-bit range scaled to 8 bits, not clipped
        assert np.array_equal(np.asarray(out)[..., 0], rgb[..., 0])


def test_recipe_crops_centre_then_resizes_antialiased():
    rng = np.random.default_rng(1)
    big = rng.integers(0, 255, (363, 360, 3), dtype=np.uint8)
    out = apply_recipe(Image.fromarray(big), Recipe(64, 200))
    crop = Image.fromarray(big[81:281, 80:280])
    assert np.array_equal(out, np.asarray(crop.resize((64, 64), Image.Resampling.BICUBIC)))
    # antialiased: a fine checkerboard shrinks to flat grey, not to aliasing patterns
    checker = ((np.indices((200, 200)).sum(0) % 2) * 255).astype(np.uint8)
    small = apply_recipe(Image.fromarray(np.stack([checker] * 3, -1)), Recipe(64, 200))
    assert small.std() < 10
    # an image already at the target size passes through untouched
    assert np.array_equal(apply_recipe(Image.fromarray(out), Recipe(64, 200)), out)


def test_prepare_applies_reviewed_corrections(image_tree, tmp_path):
    base = prepare_from_folder(image_tree, size=28, progress=False)
    victim, dropped = base["paths"]["train"][0], base["paths"]["train"][1]
    fix = tmp_path / "review.csv"
    fix.write_text(f"path,given_label,action,new_label\n{victim},alpha,relabel,gamma\n{dropped},alpha,drop,\n")
    info = prepare_from_folder(image_tree, size=28, progress=False, corrections=fix)
    assert not info["reused"]
    assert info["corrections"]["relabelled"] == 1 and info["corrections"]["dropped"] == 1
    assert len(info["corrections"]["sha256"]) == 64
    assert info["counts"]["train"] == [12, 14, 15]
    assert dropped not in info["paths"]["train"]
    meta = json.loads(open(info["json"]).read())
    assert meta["corrections"] == info["corrections"]
    assert prepare_from_folder(image_tree, size=28, progress=False, corrections=fix)["reused"]
    fix.write_text(f"path,given_label,action,new_label\n{victim},alpha,relabel,beta\n")
    again = prepare_from_folder(image_tree, size=28, progress=False, corrections=fix)
    assert not again["reused"] and again["counts"]["train"] == [13, 15, 14]
    fix.write_text(f"path,given_label,action,new_label\n{victim},beta,relabel,gamma\n")
    with pytest.raises(BloodcellError, match="given_label 'beta'"):
        prepare_from_folder(image_tree, size=28, progress=False, corrections=fix)
