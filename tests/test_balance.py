import numpy as np
import pytest
import torch
from conftest import synthetic_arrays

from bloodcell.data.balance import balance_training_set, class_weights, oversample_augment, oversample_smote
from bloodcell.data.sources import prepare_from_npz
from bloodcell.data.store import load_dataset
from bloodcell.errors import BloodcellError
from bloodcell.training import TrainConfig, train


def imbalanced(seed=0):
    arrays = synthetic_arrays({"train": 6}, size=16, k=3, seed=seed)
    x, y = arrays["train_images"], arrays["train_labels"].reshape(-1)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:3], np.flatnonzero(y == 2)[:2]])
    return x[keep], y[keep].astype(np.int64)


@pytest.mark.parametrize("method", ["augment", "smote"])
def test_oversampling_reaches_the_majority_count(method):
    x, y = imbalanced()
    bx, by = balance_training_set(x, y, 3, method, seed=0)
    assert np.bincount(by).tolist() == [6, 6, 6]
    assert bx.dtype == np.uint8 and bx.shape == (18, 16, 16, 3)
    assert np.array_equal(bx[: len(x)], x) and np.array_equal(by[: len(y)], y)  # originals kept, in order
    bx2, by2 = balance_training_set(x, y, 3, method, seed=0)
    assert np.array_equal(bx, bx2) and np.array_equal(by, by2)  # seeded


def test_augmentation_draws_from_all_images_of_a_class():
    x, y = imbalanced()
    _, by, sources = oversample_augment(x, y, 3, target=60, seed=1)
    for c in (0, 1, 2):
        from_c = sources[by[len(y):] == c]
        assert set(y[from_c]) == {c}
        assert set(from_c) == set(np.flatnonzero(y == c))  # every image of the class is used, not just the first


def test_augmented_copies_differ_from_their_sources():
    x, y = imbalanced()
    bx, _, sources = oversample_augment(x, y, 3, seed=0)
    added = bx[len(x):]
    assert not all(np.array_equal(a, x[s]) for a, s in zip(added, sources))


def test_smote_images_lie_between_two_images_of_their_class_and_need_two_images():
    """Each synthetic image is a + lam * (b - a) for two images a, b of its own class and one lam in [0, 1]."""
    x, y = imbalanced()
    bx, by = oversample_smote(x, y, 3)
    assert np.bincount(by).tolist() == [6, 6, 6] and np.array_equal(bx[: len(x)], x)
    images = x.astype(np.float64)
    for s, c in zip(bx[len(x):].astype(np.float64), by[len(y):]):
        residuals = []
        for i in np.flatnonzero(y == c):
            for j in np.flatnonzero(y == c):
                d = images[j] - images[i]
                if i == j or not d.any():
                    continue
                lam = ((s - images[i]) * d).sum() / (d * d).sum()
                if -1e-3 <= lam <= 1 + 1e-3:
                    residuals.append(np.abs(s - images[i] - lam * d).max())
        assert residuals and min(residuals) <= 1.0, c  # rounding back to uint8 moves a pixel by at most 0.5
    with pytest.raises(BloodcellError, match="at least 2"):
        oversample_smote(x[:7], y[:7], 3)  # class 1 has one image there


def test_class_weights_are_balanced():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2, 0.0]))


@pytest.mark.parametrize("method", ["augment", "smote", "class-weight"])
def test_training_balances_only_the_training_split(tiny_npz, tmp_path, method):
    arrays = dict(np.load(tiny_npz))
    y = arrays["train_labels"].reshape(-1)
    keep = np.flatnonzero((y != 3) | (np.arange(len(y)) % 3 == 0))  # class 3 is now a minority
    arrays["train_images"], arrays["train_labels"] = arrays["train_images"][keep], arrays["train_labels"][keep]
    path = tmp_path / "imb.npz"
    np.savez(path, **arrays)
    prepare_from_npz(path)
    before = load_dataset("bloodmnist", 28)
    cfg = TrainConfig(model="se-cnn", data="bloodmnist", size=28, epochs=1, batch_size=32, threads=1, balance=method)
    s = train(cfg, tmp_path / "run", log=lambda m: None)
    counts = s["train_class_counts"]
    if method == "class-weight":
        assert counts[3] == 4 and s["train_images"] == len(keep)
    else:
        assert counts == [12] * 8 and s["train_images"] == 96
    after = load_dataset("bloodmnist", 28)
    for split in ("val", "test"):
        assert np.array_equal(before.images[split], after.images[split])
        assert np.array_equal(before.labels[split], after.labels[split])


def test_unknown_balance_is_a_clear_error():
    with pytest.raises(BloodcellError, match=r"balanc\w* 'undersample'.*smote"):
        TrainConfig(balance="undersample").validate()
