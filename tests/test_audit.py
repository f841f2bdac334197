import csv

import numpy as np
from PIL import Image

from bloodcell.cli import main
from bloodcell.data.audit import as_words, dhash_bits, hamming_pairs, run_audit


def _texture(rng, size=80):
    """Random smooth textures: unrelated images get unrelated hashes."""
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def _tree(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    rows = []
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(_texture(rng)).save(root / c / f"{c}{i}.png")
            rows.append((f"{c}/{c}{i}.png", "abc".index(c), ("train", "val", "test")[i % 3]))
    base = np.asarray(Image.open(root / "a" / "a0.png"))
    Image.fromarray(base).save(root / "b" / "dup_of_a0.png")  # exact, conflicting label
    rows.append(("b/dup_of_a0.png", 1, "train"))
    Image.fromarray(base).save(root / "a" / "copy_a0.jpg", quality=90)  # near (JPEG), same class, across splits
    rows.append(("a/copy_a0.jpg", 0, "test"))
    (root / "c" / "broken.jpg").write_bytes(b"not an image")
    split = tmp_path / "split.csv"
    with open(split, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return root, split


def test_hamming_pairs_match_brute_force():
    rng = np.random.default_rng(1)
    packed = rng.integers(0, 256, (300, 5), dtype=np.uint8)
    packed[7] = packed[3]
    i, j, d = hamming_pairs(as_words(packed), 14, block=64)
    bits = np.unpackbits(packed, axis=1)
    full = (bits[:, None, :] != bits[None, :, :]).sum(2)
    ii, jj = np.nonzero(np.triu(full <= 14, k=1))
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(ii.tolist(), jj.tolist()))
    assert (d == full[i, j]).all() and (3, 7) in set(zip(i.tolist(), j.tolist()))


def test_dhash_ignores_brightness_not_content():
    rng = np.random.default_rng(2)
    img = _texture(rng)
    brighter = np.clip(img.astype(int) + 20, 0, 255).astype(np.uint8)
    assert (dhash_bits(img) == dhash_bits(brighter)).mean() > 0.95
    assert (np.unpackbits(dhash_bits(img)) != np.unpackbits(dhash_bits(_texture(rng)))).sum() > 60


def test_audit_finds_planted_duplicates_conflicts_and_leakage(tmp_path):
    root, split = _tree(tmp_path)
    r = run_audit(source=root, split_file=split, out=tmp_path / "out")
    s = r["summary"]
    assert s["unreadable"] == 0  # broken.jpg is not in the split file
    exact = [p for p in r["pairs"] if p["kind"] == "exact"]
    assert [(p["path_a"], p["path_b"], p["conflicting_labels"]) for p in exact] == [
        ("a/a0.png", "b/dup_of_a0.png", 1)]
    near = {(p["path_a"], p["path_b"]): p for p in r["pairs"] if p["kind"] == "near"}
    key = ("a/a0.png", "a/copy_a0.jpg") if ("a/a0.png", "a/copy_a0.jpg") in near else ("a/copy_a0.jpg", "a/a0.png")
    assert near[key]["across_splits"] == 1 and near[key]["conflicting_labels"] == 0
    assert s["exact"]["conflicting_labels"] == 1 and s["near"]["across_splits"] == 2
    assert s["near"]["pairs"] == 2  # the JPEG copy against the two identical originals, nothing else
    assert s["near"]["conflicting_labels"] == 1
    assert (tmp_path / "out" / "audit.md").read_text().count("dup_of_a0.png") >= 1


def test_audit_cli_reports_unreadable_and_prepared_data(tmp_path, tiny_npz, capsys):
    root, _ = _tree(tmp_path)
    assert main(["data", "audit", "--source", str(root), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "1 unreadable" in out and "broken.jpg" in out
    arrays = dict(np.load(tiny_npz))
    arrays["test_images"][0] = arrays["train_images"][0]  # leak a training image into test
    np.savez(tmp_path / "leak.npz", **arrays)
    assert main(["data", "audit", "--data", str(tmp_path / "leak.npz"), "--out", str(tmp_path / "o2")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "o2" / "audit_pairs.csv")))
    leaks = [{r["path_a"], r["path_b"]} for r in rows if r["kind"] == "exact" and r["across_splits"] == "1"]
    assert {"train#0", "test#0"} in leaks
