"""``bloodcell data prepare | list | info | audit``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bloodcell.choices import LAYOUTS, SIZES
from bloodcell.commands.common import (
    DIR_HELP,
    add_data_args,
    add_max_pixels_arg,
    apply_max_pixels,
    positive_int,
    text_table,
)
from bloodcell.errors import BloodcellError


def cmd_data_prepare(a: argparse.Namespace) -> int:
    from bloodcell.data import sources

    apply_max_pixels(a)
    chosen = [x for x in (a.source, a.npz, a.download) if x]
    if len(chosen) != 1:
        raise BloodcellError("give exactly one of --source DIR, --npz FILE or --download")
    if a.chunk_images is not None and not a.source:
        raise BloodcellError("--chunk-images applies to --source (decoding images a chunk at a time)")
    if (a.shard_images is not None or a.chunk_images is not None) and a.layout != "shards":
        raise BloodcellError("--shard-images and --chunk-images apply to --layout shards")
    if a.source:
        info = sources.prepare_from_folder(a.source, size=a.size or 64, crop=a.crop, split_file=a.split_file,
                                           name=a.name, seed=a.seed, root=a.data_dir, force=a.force,
                                           workers=a.workers, progress=sys.stderr.isatty(), corrections=a.corrections,
                                           layout=a.layout, shard_images=a.shard_images,
                                           chunk_images=a.chunk_images)
    elif a.npz:
        info = sources.prepare_from_npz(a.npz, name=a.name, size=a.size, root=a.data_dir, corrections=a.corrections,
                                        layout=a.layout, shard_images=a.shard_images)
    else:
        if a.corrections:
            raise BloodcellError("--corrections applies to --source or --npz; download first, then prepare --npz")
        if a.shard_images is not None:
            raise BloodcellError("--shard-images applies to --source or --npz")
        info = sources.download_bloodmnist(a.size or 64, a.data_dir, layout=a.layout)
    state = "up to date (inputs unchanged), reused" if info.get("reused") else "prepared"
    print(f"dataset '{info['name']}' at {info['size']}px {state}: {info.get('shards_path') or info['npz']}")
    counts = info["counts"]
    print("  " + ", ".join(f"{s} {sum(c)}" for s, c in counts.items()) + f" images, {len(info['class_names'])} classes")
    if info.get("decode_seconds") is not None and not info.get("reused"):
        print(f"  decoded in {info['decode_seconds']:.1f}s")
    if info.get("corrections"):
        c = info["corrections"]
        print(f"  corrections from {c.get('file')}: {c.get('relabelled')} relabelled, {c.get('dropped')} dropped")
    skipped = info.get("skipped", [])
    if skipped:
        print(f"  skipped {len(skipped)} file(s):")
        for s in skipped:
            print(f"    {s['path']}: {s['reason']}")
    return 0


def cmd_data_list(a: argparse.Namespace) -> int:
    from bloodcell.data.store import data_dir, list_datasets

    rows = list_datasets(a.data_dir)
    if not rows:
        print(f"no prepared datasets in {data_dir(a.data_dir)}")
        return 0
    header = ["name", "size", "classes", "train", "val", "test", "source", "path"]
    print(text_table(header, [[r[h] for h in header] for r in rows]))
    return 0


def cmd_data_info(a: argparse.Namespace) -> int:
    from bloodcell.data.store import SPLITS, load_dataset
    from bloodcell.evaluation.plots import class_counts_png, sample_grid_png
    from bloodcell.io import markdown_table, write_text

    d = load_dataset(a.data, a.size, a.data_dir)
    name = d.meta.get("name", a.data)
    out = Path(a.out) if a.out else d.path.parent / f"{Path(d.path).stem}_info"
    counts = d.counts()
    header = ["split", *d.class_names, "total"]
    rows = [[s, *counts[s], sum(counts[s])] for s in SPLITS]
    rows.append(["all", *[sum(counts[s][i] for s in SPLITS) for i in range(d.num_classes)],
                 sum(sum(c) for c in counts.values())])
    print(f"dataset '{name}', {d.size}x{d.size} px, {d.path}")
    print(text_table(header, rows))
    md = f"# {name} ({d.size}x{d.size})\n\n" + markdown_table(header, rows) + "\n"
    write_text(out / "counts.md", md)
    class_counts_png(counts, d.class_names, out / "class_distribution.png", f"{name} {d.size}px: images per class")
    sample_grid_png(d.images["train"], d.labels["train"], d.class_names, out / "samples.png",
                    per_class=a.per_class, title=f"{name} {d.size}px, training images")
    print(f"wrote {out / 'counts.md'}, {out / 'class_distribution.png'}, {out / 'samples.png'}")
    return 0


def cmd_data_audit(a: argparse.Namespace) -> int:
    from bloodcell.data.audit import run_audit, summary_text

    r = run_audit(a.source, data=a.data, size=a.size, split_file=a.split_file, threshold=a.threshold,
                  hash_size=a.hash_size, out=a.out, data_dir=a.data_dir, workers=a.workers)
    print(summary_text(r["summary"]))
    for u in r["unreadable"][:20]:
        print(f"  unreadable: {u['path']}: {u['reason']}")
    for p in [p for p in r["pairs"] if p["conflicting_labels"] or p["across_splits"]][:20]:
        print(f"  {p['kind']} ({p['distance']} bits): {p['path_a']} [{p['class_a']}/{p['split_a']}] ~ "
              f"{p['path_b']} [{p['class_b']}/{p['split_b']}]")
    print(f"wrote {Path(r['out']) / 'audit.md'}, audit.json, audit_pairs.csv, audit_unreadable.csv")
    return 0


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="prepare, list, inspect and audit datasets",
                          description="Datasets are MedMNIST-format npz files (or, for data larger than memory, "
                                      "memory-mapped shards) in a cache folder ($BLOODCELL_DATA_DIR "
                                      "or --data-dir): 'prepare' makes one from image folders, an official npz or a "
                                      "download; 'list' shows them; 'info' counts and draws one; 'audit' looks for "
                                      "unreadable files, duplicates and leakage across splits.")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    pr = dsub.add_parser(
        "prepare", help="import images into a cached MedMNIST-format dataset",
        description="Import a folder-per-class tree (the PBC layout), an official BloodMNIST npz, or download "
        "BloodMNIST, applying the MedMNIST recipe (centred crop, antialiased bicubic resize). The result is "
        "cached; the same inputs reuse the cache, changed inputs or recipe rebuild it. Files that cannot be "
        "imported (unreadable, hidden) are named in the summary and the dataset's metadata.")
    pr.add_argument("--source", help="folder with one sub-folder of images per class")
    pr.add_argument("--npz", help="an official bloodmnist*.npz (or any MedMNIST-format npz)")
    pr.add_argument("--download", action="store_true", help="fetch BloodMNIST at --size via the medmnist package")
    pr.add_argument("--split-file", help="CSV with columns path,label,split (paths relative to --source); "
                    "without it: a seeded stratified 70/10/20 split")
    pr.add_argument("--size", type=int, default=None, choices=SIZES,
                    help="output size in pixels (default: 64; for --npz the file's own size)")
    pr.add_argument("--crop", type=positive_int, default=200,
                    help="centred square crop before resizing; an image smaller than it is cropped to its shorter "
                         "side (default: %(default)s)")
    pr.add_argument("--name", help="dataset name (default: the source folder's name; 'bloodmnist' for --npz)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default: %(default)s)")
    pr.add_argument("--workers", type=positive_int, default=None, help="decoding processes (default: all cores)")
    pr.add_argument("--corrections", help="reviewed CSV from 'bloodcell review' (action keep/relabel/drop, "
                    "new_label), applied and recorded with its hash in the dataset metadata")
    pr.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    pr.add_argument("--layout", choices=LAYOUTS, default="npz",
                    help="how the prepared images are stored: 'npz', one file loaded whole into memory (default), "
                         "or 'shards', memory-mapped .npy shards per split for datasets larger than memory: "
                         "training reads each batch from disk (the results are the same)")
    pr.add_argument("--shard-images", type=positive_int, default=None, metavar="N",
                    help="with --layout shards: images per shard file (default: about 64 MB of pixels)")
    pr.add_argument("--chunk-images", type=positive_int, default=None, metavar="N",
                    help="with --layout shards and --source: images decoded and held in memory at a time "
                         "(default: up to 4096, fewer for large sizes)")
    add_max_pixels_arg(pr)
    pr.add_argument("--data-dir", default=None, help=DIR_HELP)
    pr.set_defaults(func=cmd_data_prepare)

    ls = dsub.add_parser("list", help="show the prepared datasets",
                         description="One line per prepared dataset in the cache folder: name, size, classes, "
                                     "images per split, where it came from and its npz file.")
    ls.add_argument("--data-dir", default=None, help=DIR_HELP)
    ls.set_defaults(func=cmd_data_list)

    inf = dsub.add_parser("info", help="per-split, per-class counts, a class distribution chart and sample grid",
                          description="Print a dataset's images per split and class, and write counts.md, "
                                      "class_distribution.png and samples.png (beside the dataset, or --out).")
    add_data_args(inf)
    inf.add_argument("--out", help="folder for counts.md and the PNGs (default: beside the dataset)")
    inf.add_argument("--per-class", type=positive_int, default=6,
                     help="images per class in the sample grid (default: %(default)s)")
    inf.set_defaults(func=cmd_data_info)

    au = dsub.add_parser("audit", help="unreadable files, exact and near duplicates, label conflicts, leakage",
                         description="Check an image folder (--source, optionally with its --split-file) or a "
                                     "prepared dataset (--data) for unreadable files, exact duplicates (same "
                                     "pixels), near duplicates (dHash), duplicates with different labels, and "
                                     "duplicates across splits (leakage). Writes audit.md and CSVs.")
    au.add_argument("--source", help="folder with one sub-folder of images per class")
    au.add_argument("--split-file", help="with --source: CSV path,label,split to check leakage across splits")
    au.add_argument("--data", help="a prepared dataset's name or npz (audited at --size)")
    au.add_argument("--size", type=int, default=64, choices=SIZES,
                    help="size of the prepared dataset (default: %(default)s)")
    au.add_argument("--data-dir", default=None, help=DIR_HELP)
    au.add_argument("--threshold", type=int, default=10, help="near duplicate: at most N differing hash bits "
                    "(default: %(default)s of 256)")
    au.add_argument("--hash-size", type=positive_int, default=16,
                    help="dHash side, bits = side^2 (default: %(default)s)")
    au.add_argument("--workers", type=positive_int, default=1,
                    help="decoding processes for --source (default: %(default)s)")
    au.add_argument("--out", help="report folder (default: ./audit_SOURCE or beside the dataset)")
    au.set_defaults(func=cmd_data_audit)
