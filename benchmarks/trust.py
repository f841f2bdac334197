"""How far SE-CNN's predictions can be trusted, measured on the real PBC data: calibration, TTA, abstention,
conformal sets, out-of-distribution detection (four scores compared, per kind of image) and corruptions.

What it does, on a trained run (a copy of it: calibrate and evaluate write into the run folder):
1. ``bloodcell calibrate RUN`` (every TTA setting) on the validation split.
2. ``bloodcell evaluate RUN --split test --speed --tta none|flip|dihedral``: accuracy, ECE/MCE/NLL/Brier before
   and after temperature scaling, images/s of each setting, risk-coverage area, abstention at target accuracies,
   conformal coverage and set size; LAC and APS sets compared on the same probabilities.
3. An out-of-distribution set built from images that ship with installed packages (scikit-image's
   ``skimage.data``, matplotlib's sample data) and generated ones (flat colours, noise, text rendered with PIL,
   patterns), saved as 216x219 PNG files like the PBC files here and classified through
   ``Classifier.predict_files`` (the path ``bloodcell predict`` takes). MSP, energy, Mahalanobis and kNN scores
   are compared by AUROC and FPR at 95% TPR per kind of image, against the PBC test cells; thresholds come from
   the validation cells only (1% flagged).
4. ``bloodcell evaluate RUN --corruptions`` on a stratified subset of the test split.
Writes benchmarks/results/trust/trust.md + trust.json (with the machine) and copies the figures there.

Usage (from the project root, after ``bloodcell data prepare --source ../shared/data/pbc --split-file
../shared/data/pbc/split.csv --name pbc`` and ``bloodcell train --model se-cnn --data pbc --out runs/se-cnn-pbc``):
    cp -r runs/se-cnn-pbc runs/se-cnn-pbc-trust
    BLOODCELL_DATA_DIR=/tmp/bcdata python benchmarks/trust.py --run runs/se-cnn-pbc-trust
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

W, H = 216, 219  # the PBC files here (the 360x363 originals, resized)
KINDS = ("photo", "other microscopy", "medical (not microscopy)", "document", "synthetic pattern", "flat colour",
         "noise")
OBVIOUS = ("flat colour", "noise", "document")  # kinds that are obviously not a cell


# ---------------------------------------------------------------- the out-of-distribution set
def _rgb(a: np.ndarray) -> Image.Image:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = (255 * (a - a.min()) / max(1e-12, a.max() - a.min())).astype(np.uint8)
    img = Image.fromarray(a)
    return img.convert("RGB")


def _crops(img: Image.Image, n: int) -> list[Image.Image]:
    """The whole image fitted to W x H, then ``n - 1`` quarter-size crops (corners), each fitted."""
    out = [ImageOps.fit(img, (W, H), Image.Resampling.BICUBIC)]
    w, h = img.size
    boxes = [(0, 0, w // 2, h // 2), (w // 2, h // 2, w, h), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h)]
    out += [ImageOps.fit(img.crop(b), (W, H), Image.Resampling.BICUBIC) for b in boxes[: n - 1]]
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def build_ood_set(folder: Path) -> dict[str, list[Path]]:
    """Write the OOD images as PNG files, by kind; returns the files of each kind."""
    import matplotlib.cbook as cbook
    import skimage.data as sk

    rng = np.random.default_rng(0)
    images: dict[str, list[Image.Image]] = {k: [] for k in KINDS}
    names: dict[str, list[str]] = {k: [] for k in KINDS}

    def add(kind: str, name: str, imgs: list[Image.Image]) -> None:
        for i, im in enumerate(imgs):
            images[kind].append(im.convert("RGB").resize((W, H)) if im.size != (W, H) else im.convert("RGB"))
            names[kind].append(f"{name}_{i}")

    left, right, _ = sk.stereo_motorcycle()
    photos = {"astronaut": sk.astronaut(), "chelsea": sk.chelsea(), "coffee": sk.coffee(), "rocket": sk.rocket(),
              "camera": sk.camera(), "moon": sk.moon(), "hubble": sk.hubble_deep_field(), "coins": sk.coins(),
              "grass": sk.grass(), "gravel": sk.gravel(), "brick": sk.brick(), "motorcycle_left": left,
              "motorcycle_right": right}
    for name, a in photos.items():
        add("photo", name, _crops(_rgb(a), 3))
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        add("photo", "grace_hopper", _crops(Image.open(f).convert("RGB"), 3))
    with cbook.get_sample_data("Minduka_Present_Blue_Pack.png") as f:
        add("photo", "present", _crops(Image.open(f).convert("RGB"), 2))
    faces = sk.lfw_subset()
    add("photo", "lfw_face", [_rgb(faces[i]) for i in range(0, 40, 5)])

    add("other microscopy", "cell_phase_contrast", _crops(_rgb(sk.cell()), 5))
    add("other microscopy", "immunohistochemistry", _crops(_rgb(sk.immunohistochemistry()), 5))
    add("medical (not microscopy)", "retina", _crops(_rgb(sk.retina()), 3))
    add("medical (not microscopy)", "microaneurysms", [_rgb(sk.microaneurysms())])
    add("medical (not microscopy)", "shepp_logan", [_rgb(sk.shepp_logan_phantom())])
    with cbook.get_sample_data("s1045.ima.gz") as f:  # an MRI slice, 256 x 256 16-bit
        mri = np.frombuffer(f.read(), np.uint16).reshape(256, 256)  # opened decompressed
    add("medical (not microscopy)", "mri", [_rgb(mri)])

    add("document", "page", _crops(_rgb(sk.page()), 3))
    add("document", "text", [_rgb(sk.text())])
    words = ("Peripheral blood smear report. Patient ID 0042. Sample received 09:14, stained May-Grunwald Giemsa. "
             "Differential count: neutrophils 62%, lymphocytes 28%, monocytes 6%, eosinophils 3%, basophils 1%. "
             "Comment: no blasts seen. Signed, laboratory.").split()
    for i, size in enumerate((10, 12, 14, 18, 24, 32)):
        page = Image.new("RGB", (W, H), "white")
        d = ImageDraw.Draw(page)
        y, line = 4, ""
        for w in words[i:] + words[:i]:
            if d.textlength(line + " " + w, font=_font(size)) > W - 8:
                d.text((4, y), line, fill="black", font=_font(size))
                y, line = y + size + 3, w
            else:
                line = (line + " " + w).strip()
        d.text((4, y), line, fill="black", font=_font(size))
        add("document", f"rendered_text_{size}px", [page])
    table = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(table)
    for r in range(0, H, 18):
        d.line([(0, r), (W, r)], fill="black")
        d.text((4, r + 3), f"row {r // 18}  {rng.integers(0, 999)}  {rng.integers(0, 99)}%", fill="black",
               font=_font(11))
    add("document", "table", [table])

    add("synthetic pattern", "checkerboard", [_rgb(sk.checkerboard())])
    add("synthetic pattern", "binary_blobs", [_rgb(sk.binary_blobs(rng=0))])
    add("synthetic pattern", "colorwheel", [_rgb(sk.colorwheel())])
    logo = Image.fromarray(sk.logo())
    bg = Image.new("RGBA", logo.size, "white")
    add("synthetic pattern", "logo", [Image.alpha_composite(bg, logo).convert("RGB")])
    add("synthetic pattern", "horse", [_rgb(sk.horse())])
    add("synthetic pattern", "clock", [_rgb(sk.clock())])
    yy, xx = np.mgrid[:H, :W] / max(H, W)
    add("synthetic pattern", "gradient", [_rgb(np.dstack([xx, yy, 1 - xx]))])
    add("synthetic pattern", "stripes", [_rgb(np.dstack([np.sin(40 * xx)] * 3))])
    add("synthetic pattern", "rings", [_rgb(np.dstack([np.sin(60 * np.hypot(xx - 0.5, yy - 0.5))] * 3))])
    for i in range(3):
        im = Image.new("RGB", (W, H), tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(12):
            x0, y0 = rng.integers(0, W - 20), rng.integers(0, H - 20)
            box = [int(x0), int(y0), int(x0 + rng.integers(10, 80)), int(y0 + rng.integers(10, 80))]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour)
        add("synthetic pattern", f"shapes{i}", [im])

    colours = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128), "light_grey": (200, 200, 200),
               "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
               "purple": (120, 40, 150), "smear_pink": (230, 200, 210), "smear_lilac": (200, 180, 220),
               "brown": (120, 80, 40)}
    for name, c in colours.items():
        add("flat colour", name, [Image.new("RGB", (W, H), c)])

    add("noise", "uniform_rgb", [_rgb(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(3)])
    add("noise", "gaussian_grey", [_rgb(np.clip(rng.normal(128, 40, (H, W, 3)), 0, 255).astype(np.uint8))
                                   for _ in range(2)])
    sp = np.full((H, W, 3), 255, np.uint8)
    sp[rng.random((H, W)) < 0.1] = 0
    add("noise", "salt_and_pepper", [_rgb(sp)])
    from scipy.ndimage import gaussian_filter

    for i in range(2):
        blobs = gaussian_filter(rng.normal(0, 1, (H, W, 3)), (6, 6, 0))
        add("noise", f"smooth_colour_noise{i}", [_rgb(blobs)])
    pink = np.clip(np.array([230, 200, 210]) + rng.normal(0, 12, (H, W, 3)), 0, 255).astype(np.uint8)
    add("noise", "noise_on_smear_pink", [_rgb(pink)])

    files: dict[str, list[Path]] = {}
    for kind in KINDS:
        sub = folder / kind.replace(" ", "_").replace("(", "").replace(")", "")
        sub.mkdir(parents=True, exist_ok=True)
        files[kind] = []
        for im, name in zip(images[kind], names[kind]):
            p = sub / f"{name}.png"
            im.save(p)
            files[kind].append(p)
    return files


# ---------------------------------------------------------------- measurements
def ood_comparison(clf, data, files: dict[str, list[Path]]) -> tuple[dict, dict]:
    """The four OOD scores per kind (AUROC, FPR95 vs the test cells; share flagged at the 1%-of-validation
    threshold), and the status ``predict_files`` gives each OOD image."""
    from bloodcell.data.tensors import to_uint8_nchw
    from bloodcell.trust.calibration import mean_probabilities
    from bloodcell.trust.ood import energy_score, msp_score, separation, threshold_at_rate

    stats = clf.calibration.features
    t = clf.temperature_for("none")

    def scores(x) -> dict[str, np.ndarray]:
        z, f = clf.view_logits(x, "none", features=True)
        z, f = z.cpu().numpy(), f.cpu().numpy()
        p = mean_probabilities(z, t)
        return {"msp": msp_score(p), "energy": energy_score(z[0]), "mahalanobis": stats.mahalanobis(f),
                "knn": stats.knn(f), "confidence_uncalibrated": mean_probabilities(z, 1.0).max(1),
                "confidence": p.max(1)}

    val = scores(to_uint8_nchw(data.images["val"]))
    test = scores(to_uint8_nchw(data.images["test"]))
    all_files = [p for kind in KINDS for p in files[kind]]
    arrays = np.stack([clf.preprocess(p)[0] for p in all_files])
    ood = scores(to_uint8_nchw(arrays))
    kind_of = np.array([kind for kind in KINDS for _ in files[kind]])
    methods = ("msp", "energy", "mahalanobis", "knn")
    out: dict = {"methods": {}, "test_cells": int(len(test["msp"])), "ood_images": int(len(all_files)),
                 "per_kind_counts": {k: len(files[k]) for k in KINDS}}
    for m in methods:
        thr = threshold_at_rate(val[m], clf.calibration.ood_rate)
        row = {"val_threshold": thr, "test_cells_flagged": float((test[m] > thr).mean()),
               "all": {**separation(test[m], ood[m]), "flagged": float((ood[m] > thr).mean())}}
        clear = np.isin(kind_of, [k for k in KINDS if k != "other microscopy"])
        row["clear"] = {**separation(test[m], ood[m][clear]), "flagged": float((ood[m][clear] > thr).mean())}
        for k in KINDS:
            sel = kind_of == k
            row[k] = {**separation(test[m], ood[m][sel]), "flagged": float((ood[m][sel] > thr).mean())}
        out["methods"][m] = row
    out["confidence_of_ood"] = {
        "uncalibrated_at_least_0.9": int((ood["confidence_uncalibrated"] >= 0.9).sum()),
        "uncalibrated_at_least_0.99": int((ood["confidence_uncalibrated"] >= 0.99).sum()),
        "calibrated_at_least_0.9": int((ood["confidence"] >= 0.9).sum()),
        "calibrated_at_least_0.99": int((ood["confidence"] >= 0.99).sum())}

    # the predict path: statuses of the files
    preds = clf.predict_files(all_files, top_k=1)
    review_t = clf.mode("none").review_threshold
    status: dict = {}
    for k in KINDS:
        ps = [p for p, kk in zip(preds, kind_of) if kk == k]
        status[k] = {"images": len(ps),
                     "not_a_cell": sum(p.flags["status"] == "not a blood-cell image?" for p in ps),
                     "review": sum(p.flags["status"] == "review" for p in ps),
                     "ok_confident_class": sum(p.flags["status"] == "ok" for p in ps),
                     "confidence_above_review_threshold": sum(review_t is not None and p.flags["confidence"]
                                                              >= review_t for p in ps),
                     "ok_files": [Path(p.path).name for p in ps if p.flags["status"] == "ok"]}
    return out, status


def conformal_comparison(clf, data) -> dict:
    """LAC and APS sets from the same calibrated probabilities (validation to calibrate, test to measure)."""
    from bloodcell.data.tensors import to_uint8_nchw
    from bloodcell.trust.conformal import conformal_quantile, coverage_and_size, prediction_sets, true_class_scores

    pv = clf.assess(to_uint8_nchw(data.images["val"]))["probs"]
    pt = clf.assess(to_uint8_nchw(data.images["test"]))["probs"]
    out = {}
    for method in ("lac", "aps"):
        cal = true_class_scores(pv, data.labels["val"], method)
        out[method] = {str(a): coverage_and_size(prediction_sets(pt, conformal_quantile(cal, a), method),
                                                 data.labels["test"]) for a in (0.1, 0.05, 0.01)}
    return out


SPEED_SNIPPET = """
import json, sys
from bloodcell.evaluation.evaluate import measure_speed
from bloodcell.inference import Classifier
from bloodcell.machine import set_threads
set_threads(int(sys.argv[3]))
print(json.dumps(measure_speed(Classifier.from_run(sys.argv[1], calibrated=False), tta=sys.argv[2])))
"""


def speed_rounds(run: Path, rounds: int, threads: int) -> dict:
    """images/s (batch 256) and ms (batch 1) of each TTA setting, each in a fresh process on ``threads`` threads
    (one thread is the least disturbed by other work on a shared 2-core machine), alternating settings over
    ``rounds`` rounds and keeping each one's best."""
    import subprocess

    runs: dict = {t: [] for t in ("none", "flip", "dihedral")}
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")}
    for _ in range(rounds):
        for tta in runs:
            cmd = [sys.executable, "-c", SPEED_SNIPPET, str(run), tta, str(threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            runs[tta].append(json.loads(out.strip().splitlines()[-1]))
    base = [r["throughput_images_per_s"] for r in runs["none"]]
    return {t: {"throughput_images_per_s": max(r["throughput_images_per_s"] for r in v),
                "latency_ms_batch1": min(r["latency_ms_batch1"] for r in v),
                "rounds_images_per_s": [r["throughput_images_per_s"] for r in v],
                # cost relative to no TTA within each round (the load drifts less within a round than across)
                "cost_vs_none": float(np.median([b / r["throughput_images_per_s"] for b, r in zip(base, v)])),
                "threads": v[0]["threads"], "views": v[0]["views"]} for t, v in runs.items()}


# ---------------------------------------------------------------- report
def f4(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def accepted_accuracy(k: dict, severity: str) -> float | None:
    vals = [r["severities"][severity]["accuracy_accepted"] for r in k["corruptions"].values()]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def report(res: dict) -> str:
    from bloodcell.io import markdown_table

    mi, cmd = res["machine"], res["command"]
    lines = [f"# Trust: {res['model']} on {res['dataset']} ({res['size']} px)", "",
             f"Measured by `{cmd}` on {mi['cpu']} ({mi['cores']} cores, {mi['threads']} threads, torch "
             f"{mi['torch']}), {res['date']}, load average {res['load_before']} before the run and "
             f"{res['load_after']} after it (other work shared the CPU: the images/s are lower bounds and vary). "
             "Run: `" + res["run"] + f"` ({res['recipe_note']}). "
             "Every number below is in trust.json beside this file.", ""]
    lines += ["## Calibration and test-time augmentation (test split)", ""]
    rows = []
    for tta, m in res["tta"].items():
        c = m["calibration"]
        rows.append([tta, f4(m["accuracy"]), f"{c['temperature']:.3f}", f4(c["before"]["ece"]), f4(c["after"]["ece"]),
                     f4(c["before"]["mce"]), f4(c["after"]["mce"]), f4(c["before"]["nll"]), f4(c["after"]["nll"]),
                     f4(c["before"]["brier"]), f4(c["after"]["brier"]),
                     f"{res['speed'][tta]['throughput_images_per_s']:.0f}",
                     f"{res['speed'][tta]['cost_vs_none']:.1f}x", f"{res['speed'][tta]['latency_ms_batch1']:.2f}"])
    lines += [markdown_table(["TTA", "accuracy", "T", "ECE before", "ECE after", "MCE before", "MCE after",
                              "NLL before", "NLL after", "Brier before", "Brier after",
                              f"images/s (batch 256, {res['speed']['none']['threads']} thread(s))",
                              "cost vs none", "ms (batch 1)"], rows), "",
              "ECE: 15 equal-width bins of top-1 confidence. T is fitted by NLL on the validation split, per TTA "
              "setting. images/s counts images (each is all its views, in one forward pass); the best of "
              f"{len(res['speed']['none']['rounds_images_per_s'])} alternating rounds (all rounds in trust.json); "
              "cost vs none: the median over rounds of the ratio of images/s within a round.",
              "![reliability](reliability_test.png)", ""]
    m = res["tta"]["none"]
    lines += ["## Abstention (TTA none)", "",
              f"Risk-coverage area (AURC) on test: {m['risk_coverage']['aurc']:.5f}. Thresholds are chosen on "
              "validation (the lowest confidence whose accepted validation images reach the target), then applied "
              "to test:", ""]
    lines += [markdown_table(["target accuracy", "threshold (val)", "test coverage", "test accuracy"],
                             [[t, f4(a["val_threshold"]), pct(a["coverage"]), f4(a["accuracy"])]
                              for t, a in m["abstention"].items()]), "",
              "![risk-coverage](risk_coverage_test.png)", ""]
    for tta in ("flip", "dihedral"):
        a = res["tta"][tta]["abstention"]
        lines.append(f"With TTA {tta}: " + "; ".join(f"target {t}: coverage {pct(v['coverage'])}, accuracy "
                                                     f"{f4(v['accuracy'])}" for t, v in a.items()) +
                     f" (AURC {res['tta'][tta]['risk_coverage']['aurc']:.5f}).")
    lines += ["", "## Conformal prediction sets (test split, calibrated on validation)", ""]
    rows = [[meth, a, pct(v["coverage"]), f"{v['mean_set_size']:.3f}", pct(v["singleton_share"]), pct(v["empty_share"])]
            for meth, d in res["conformal"].items() for a, v in d.items()]
    lines += [markdown_table(["score", "alpha", "coverage", "mean set size", "single class", "empty"], rows), ""]
    o = res["ood"]
    lines += ["## Out of distribution", "",
              f"{o['ood_images']} images that are not PBC single-cell images ("
              + ", ".join(f"{k}: {n}" for k, n in o["per_kind_counts"].items())
              + f") against the {o['test_cells']} test cells. Thresholds flag 1% of the validation cells. "
              "'clear' = every kind but other microscopy.", ""]
    methods = list(o["methods"])
    header = ["kind", *[f"{mm} AUROC / FPR95 / flagged" for mm in methods]]
    rows = []
    for k in ["clear", "all", *KINDS]:
        rows.append([k, *[f"{o['methods'][mm][k]['auroc']:.4f} / {pct(o['methods'][mm][k]['fpr_at_95_tpr'])} / "
                          f"{pct(o['methods'][mm][k]['flagged'])}" for mm in methods]])
    rows.append(["test cells flagged", *[pct(o["methods"][mm]["test_cells_flagged"]) for mm in methods]])
    lines += [markdown_table(header, rows), ""]
    c = o["confidence_of_ood"]
    lines += [f"Confidence the model gives these {o['ood_images']} images: uncalibrated, "
              f"{c['uncalibrated_at_least_0.9']} at 0.9 or more and {c['uncalibrated_at_least_0.99']} at 0.99 or "
              "more; temperature-scaled, "
              f"{c['calibrated_at_least_0.9']} and {c['calibrated_at_least_0.99']}.", "",
              f"What `predict` says about them (default method {res['ood_method']}, review threshold "
              f"{f4(res['review_threshold'])} for {res['target_accuracy']} accuracy on validation):", ""]
    rows = [[k, s["images"], s["not_a_cell"], s["review"], s["ok_confident_class"],
             s["confidence_above_review_threshold"], ", ".join(s["ok_files"]) or "-"] for k, s in res["status"].items()]
    lines += [markdown_table(["kind", "images", "not a blood-cell image?", "review", "ok (a confident class)",
                              "confidence above the review threshold (before the OOD flag)", "files shown as ok"],
                             rows), ""]
    k = res["corruptions"]
    lines += ["## Corruptions (TTA none)", "",
              f"{k['images']} test images (stratified), 13 corruptions x 5 severities. Mean corruption accuracy "
              f"{f4(k['mean_corruption_accuracy'])} (clean {f4(k['clean']['accuracy'])}); on average "
              f"{pct(k['mean_review_share'])} sent to review and {pct(k['mean_ood_flagged_share'])} flagged OOD "
              f"(clean: {pct(k['clean']['review_share'])} and {pct(k['clean']['ood_flagged_share'])}). Wrong and "
              f"accepted anyway (neither reviewed nor flagged): {pct(k['mean_wrong_accepted_share'])} of the "
              f"corrupted images (clean: {pct(k['clean']['wrong_accepted_share'])}).", ""]
    rows = [[name, f4(r["mean_accuracy"]), *[f"{f4(r['severities'][s]['accuracy'])} / "
                                             f"{pct(r['severities'][s]['review_share'])} / "
                                             f"{pct(r['severities'][s]['ood_flagged_share'])}" for s in "12345"]]
            for name, r in k["corruptions"].items()]
    lines += [markdown_table(["corruption", "mean accuracy", *[f"severity {s}: accuracy / review / OOD"
                                                               for s in "12345"]], rows), "",
              "Per severity, over the 13 corruptions: accuracy of all images / of the accepted ones (neither "
              "reviewed nor flagged) / share wrong and accepted: " + "; ".join(
                  f"{s}: {f4(k['per_severity'][s]['accuracy'])} / {f4(accepted_accuracy(k, s))} / "
                  f"{pct(k['per_severity'][s]['wrong_accepted_share'])}" for s in "12345") + ".", "",
              "![corruptions](corruptions_test.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=str(ROOT / "runs" / "se-cnn-pbc-trust"))
    p.add_argument("--corruption-images", type=int, default=1000)
    p.add_argument("--speed-rounds", type=int, default=5)
    p.add_argument("--speed-threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trust"))
    p.add_argument("--skip-calibrate", action="store_true", help="use the run's calibration.json as it is")
    args = p.parse_args(argv)

    import os

    from bloodcell.data.store import load_dataset
    from bloodcell.evaluation.evaluate import calibrate_run, evaluate_run
    from bloodcell.inference import Classifier
    from bloodcell.io import atomic_write, read_json, write_json, write_text
    from bloodcell.machine import machine_info, machine_load
    from bloodcell.training.config import TrainConfig

    run, out = Path(args.run), Path(args.out)
    load = machine_load()
    t0 = time.time()
    if not args.skip_calibrate:
        calibrate_run(run)
        print(f"calibrated ({time.time() - t0:.0f}s)", flush=True)
    res: dict = {"run": str(run.relative_to(ROOT) if run.is_absolute() and ROOT in run.parents else run),
                 "load_before": load, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "command": "python benchmarks/trust.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "tta": {}}
    cfg = TrainConfig.load(run / "config.json")
    res.update({"model": cfg.model, "dataset": cfg.data, "size": cfg.size})
    from bloodcell.choices import RECIPE_SETTINGS

    recommended = all(getattr(cfg, k) == v for k, v in RECIPE_SETTINGS["recommended"].items())
    res["recipe_note"] = (f"{cfg.model}, {cfg.epochs} epochs, seed {cfg.seed}, "
                          + ("the recommended recipe; SE-CNN with it is today's recommended model, so the rows the "
                             "issue asks for, SE-CNN and the recommended model, are one" if recommended and
                             cfg.model == "se-cnn" else "not the recommended model and recipe"))
    for tta in ("none", "flip", "dihedral"):
        m = evaluate_run(run, "test", speed=True, tta=tta)
        res["tta"][tta] = {k: m[k] for k in ("accuracy", "f1_weighted", "calibration", "risk_coverage", "abstention",
                                             "review", "conformal", "speed")}
        print(f"evaluated TTA {tta} ({time.time() - t0:.0f}s)", flush=True)
    cal = read_json(run / "calibration.json")
    res["calibration"] = {k: cal.get(k) for k in ("validation_images", "feature_train_images", "features",
                                                  "target_accuracy", "ood_rate", "notes")}
    clf = Classifier.from_run(run)
    res["speed"] = speed_rounds(run, args.speed_rounds, args.speed_threads)
    print(f"speed measured ({time.time() - t0:.0f}s)", flush=True)
    data = load_dataset(cfg.data, cfg.size, cfg.data_dir)
    res["conformal"] = conformal_comparison(clf, data)
    res["ood_method"], res["review_threshold"] = clf.mode("none").ood_method, clf.mode("none").review_threshold
    res["target_accuracy"] = clf.calibration.target_accuracy
    with tempfile.TemporaryDirectory() as tmp:
        files = build_ood_set(Path(tmp))
        res["ood"], res["status"] = ood_comparison(clf, data, files)
    print(f"OOD measured ({time.time() - t0:.0f}s)", flush=True)
    m = evaluate_run(run, "test", corruptions=True, corruption_images=args.corruption_images)
    res["corruptions"] = m["corruptions"]
    print(f"corruptions measured ({time.time() - t0:.0f}s)", flush=True)
    res["machine"] = machine_info()
    res["load_after"] = machine_load()
    res["seconds"] = round(time.time() - t0, 1)
    res["env"] = {"BLOODCELL_DATA_DIR": os.environ.get("BLOODCELL_DATA_DIR")}
    out.mkdir(parents=True, exist_ok=True)
    for name in ("reliability_test.png", "risk_coverage_test.png", "corruptions_test.png",
                 "reliability_test_tta_dihedral.png"):
        atomic_write(out / name, lambda tmp, src=run / name: shutil.copyfile(src, tmp))
    write_json(out / "trust.json", res)
    write_text(out / "trust.md", report(res))
    print(f"wrote {out / 'trust.md'}, {out / 'trust.json'} ({res['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
