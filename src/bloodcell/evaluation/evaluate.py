"""Evaluate a classifier on a split: a pure ``evaluate`` (metrics only) and ``evaluate_run``, which writes
``metrics.json``, the confusion matrix, the training curves and the trust figures (reliability diagram,
risk-coverage curve, accuracy under corruptions) into the run folder; ``calibrate_run`` fits the run's
``calibration.json`` on its validation split."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch

from bloodcell.choices import CORRUPTIONS, SPLITS, TTA
from bloodcell.data.store import load_dataset
from bloodcell.data.tensors import as_nchw, stratified_subset, to_uint8_nchw
from bloodcell.errors import BloodcellError
from bloodcell.evaluation.metrics import classification_metrics, trust_metrics
from bloodcell.evaluation.plots import confusion_matrix_png, history_png
from bloodcell.inference import Classifier
from bloodcell.inference.ensemble import config_file
from bloodcell.io import csv_text, read_json, write_json, write_text
from bloodcell.machine import device_name, set_threads
from bloodcell.models import count_params_keras, count_params_trainable
from bloodcell.training.config import TrainConfig
from bloodcell.trust.calibration import calibration_metrics
from bloodcell.trust.corruptions import SEVERITIES, corrupt
from bloodcell.trust.plots import corruption_png, reliability_png, risk_coverage_png
from bloodcell.trust.selective import risk_coverage
from bloodcell.trust.store import TARGETS
from bloodcell.trust.tta import n_views, tta_views

CORRUPTION_CHUNK = 1024  # images corrupted and assessed at a time (bounds memory at 224 px)


def evaluate_outputs(classifier: Classifier, images: np.ndarray | torch.Tensor, labels: np.ndarray,
                     tta: str | None = None) -> tuple[dict, dict]:
    """``evaluate``'s metrics and the ``assess`` arrays they came from (for the figures). A split on disk
    (shards) is read a chunk at a time as the model goes through it."""
    x = as_nchw(images)
    a = classifier.assess(x, tta)
    probs = a["probs"]
    bad = int((~np.isfinite(probs).all(1)).sum())
    if bad:
        raise BloodcellError(f"{classifier.source or 'the model'}: its output is NaN or infinite for {bad} of "
                             f"{len(probs)} images; the weights diverged in training (see history.csv)")
    m = classification_metrics(np.asarray(labels), probs, classifier.class_names)
    cal = classifier.calibration
    m.update(trust_metrics(labels, a, classifier.mode(a["tta"]), classifier.temperature_for(a["tta"]),
                           cal.target_accuracy if cal else None))
    return m, a


def evaluate(classifier: Classifier, images: np.ndarray | torch.Tensor, labels: np.ndarray,
             tta: str | None = None) -> dict:
    """Metrics of one prediction pass over ``images`` (N x H x W x 3 uint8, or a uint8 NCHW tensor); no files.

    Besides accuracy and the rest: calibration (ECE, MCE, NLL, Brier) before and after the run's temperature,
    risk-coverage and, when the run is calibrated, abstention, conformal sets and OOD flags (``trust_metrics``)."""
    return evaluate_outputs(classifier, images, labels, tta)[0]


def corruption_report(classifier: Classifier, images: torch.Tensor, labels: np.ndarray, tta: str | None = None,
                      names: tuple[str, ...] = CORRUPTIONS, seed: int = 0) -> dict:
    """Accuracy, ECE, and the shares flagged OOD and sent to review, under each corruption at severities 1-5."""
    labels = np.asarray(labels).reshape(-1)

    def assessed(corruption: str | None, severity: int) -> dict:
        parts = []
        for i in range(0, len(images), CORRUPTION_CHUNK):
            x = images[i : i + CORRUPTION_CHUNK]
            parts.append(classifier.assess(corrupt(x, corruption, severity, seed + i) if corruption else x, tta))
        probs = np.concatenate([p["probs"] for p in parts])
        review = np.concatenate([p["review"] for p in parts])
        ood = None if parts[0]["ood"] is None else np.concatenate([p["ood"] for p in parts])
        correct = probs.argmax(1) == labels
        return {"accuracy": float(correct.mean()), "ece": calibration_metrics(probs, labels)["ece"],
                "mean_confidence": float(probs.max(1).mean()),
                "ood_flagged_share": None if ood is None else float(ood.mean()),
                "review_share": float(review.mean()),
                "accuracy_accepted": float(correct[~review].mean()) if (~review).any() else None,
                "wrong_accepted_share": float((~correct & ~review).mean())}  # the silent failures

    clean = assessed(None, 0)
    out: dict = {}
    for name in names:
        sev = {str(s): assessed(name, s) for s in SEVERITIES}
        out[name] = {"severities": sev, "mean_accuracy": float(np.mean([v["accuracy"] for v in sev.values()]))}
    every = [v for r in out.values() for v in r["severities"].values()]

    def mean_of(key: str) -> float | None:
        vals = [v[key] for v in every if v[key] is not None]
        return float(np.mean(vals)) if vals else None

    def severity_mean(s: int, key: str) -> float | None:
        vals = [out[n]["severities"][str(s)][key] for n in out]
        return None if not vals or None in vals else float(np.mean(vals))

    per_severity = {str(s): {k: severity_mean(s, k) for k in ("accuracy", "review_share", "ood_flagged_share",
                                                              "wrong_accepted_share")} for s in SEVERITIES}
    return {"images": int(len(labels)), "tta": tta or classifier.tta, "clean": clean,
            "mean_corruption_accuracy": mean_of("accuracy"), "mean_review_share": mean_of("review_share"),
            "mean_ood_flagged_share": mean_of("ood_flagged_share"),
            "mean_wrong_accepted_share": mean_of("wrong_accepted_share"), "per_severity": per_severity,
            "corruptions": out}


@torch.inference_mode()
def measure_speed(classifier: Classifier, batch: int = 256, repeats: int = 5, tta: str | None = None) -> dict:
    """Inference throughput (images/s at ``batch``) and latency (median ms at batch 1) on the classifier's device;
    with ``tta``, every image's views go through the model in the same forward pass (images/s counts images)."""
    model, device = classifier.model.eval(), classifier.device
    size = classifier.input_size
    tta = tta or classifier.tta
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def timed(inp: torch.Tensor) -> float:
        t0 = time.perf_counter()
        model(inp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    one = tta_views(x[:1], tta).contiguous(memory_format=torch.channels_last)
    x = tta_views(x, tta).contiguous(memory_format=torch.channels_last)
    timed(x)  # warm-up
    t = [timed(x) for _ in range(repeats)]
    for _ in range(5):
        timed(one)
    lat = [timed(one) for _ in range(50)]
    return {"throughput_images_per_s": round(batch / float(np.median(t)), 1), "throughput_batch": batch,
            "latency_ms_batch1": round(1000 * float(np.median(lat)), 3), "threads": torch.get_num_threads(),
            "device": device_name(device), "machine": device_name("cpu"), "tta": tta, "views": n_views(tta)}


def metrics_key(split: str, tta: str = "none") -> str:
    """Where an evaluation goes in metrics.json: the split's name, with the TTA setting unless it is none."""
    return split if tta == "none" else f"{split}_tta_{tta}"


def open_run(run_dir: str | Path, checkpoint: str, device: str, data_override: str | None, data_dir: str | None,
             tta: str = "none", calibrated: bool = True):
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BloodcellError(f"{run_dir}: run folder not found")
    if tta not in TTA:
        raise BloodcellError(f"unknown --tta '{tta}' ({', '.join(TTA)})")
    cfg = TrainConfig.load(config_file(run_dir))  # an ensemble's: its first member's (the data they share)
    set_threads(cfg.threads)
    clf = Classifier.from_run(run_dir, checkpoint, device=device, tta=tta, calibrated=calibrated)
    data = load_dataset(data_override or cfg.data, cfg.size, data_dir or cfg.data_dir)
    if data.class_names != clf.class_names:
        raise BloodcellError(f"{run_dir}: the dataset's classes {data.class_names} differ from the model's")
    return run_dir, cfg, clf, data


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = "best", speed: bool = False,
                 data_override: str | None = None, data_dir: str | None = None, device: str = "auto",
                 tta: str = "none", corruptions: bool = False, corruption_images: int | None = None) -> dict:
    """Evaluate a run folder on ``split``; every metric comes from one pass. Updates metrics.json (under the
    split's name, or ``SPLIT_tta_MODE`` with test-time augmentation) and writes the figures.

    ``corruptions`` also measures accuracy, OOD flags and review under every corruption at 5 severities, on
    ``corruption_images`` images of the split (stratified; default all)."""
    if split not in SPLITS:
        raise BloodcellError(f"unknown split '{split}' ({', '.join(SPLITS)})")
    if corruption_images is not None and corruption_images < 1:
        raise BloodcellError(f"--corruption-images must be at least 1, got {corruption_images}")
    run_dir, cfg, clf, data = open_run(run_dir, checkpoint, device, data_override, data_dir, tta)
    key = metrics_key(split, tta)
    name = clf.meta.get("model", cfg.model)  # an ensemble's names its vote and members
    m, assessed = evaluate_outputs(clf, data.images[split], data.labels[split], tta)
    m.update({
        "split": split,
        "checkpoint": getattr(clf, "checkpoint", checkpoint),  # an ensemble's was fixed when it was made
        "checkpoint_epoch": clf.meta.get("epoch"),
        "dataset": data.meta.get("name", cfg.data),
        "class_names": data.class_names,
        "params_keras": count_params_keras(clf.model),
        "params_trainable": count_params_trainable(clf.model),
        "model_size_mb": round(sum(f.stat().st_size for f in clf.weight_files) / 1e6, 3),
        "device": device_name(clf.device),
    })
    if speed:
        m["speed"] = measure_speed(clf, tta=tta)
    if corruptions:
        labels = data.labels[split]
        keep = stratified_subset(labels, corruption_images, 0) if corruption_images else np.arange(len(labels))
        m["corruptions"] = corruption_report(clf, to_uint8_nchw(data.images[split][keep]), labels[keep], tta)
        corruption_png(m["corruptions"]["corruptions"], m["corruptions"]["clean"]["accuracy"],
                       run_dir / f"corruptions_{key}.png", f"{name} on {split} under corruptions")
    cm = np.asarray(m["confusion_matrix"])
    write_text(run_dir / f"confusion_{key}.csv",
               csv_text(["true\\pred", *data.class_names], ([n, *r.tolist()] for n, r in zip(data.class_names, cm))))
    confusion_matrix_png(cm, data.class_names, run_dir / f"confusion_{key}.png",
                         f"{name} on {split}: accuracy {m['accuracy']:.4f}")
    cal = m["calibration"]
    reliability_png(cal["before"], cal["after"], run_dir / f"reliability_{key}.png",
                    f"{name} on {split} (TTA {tta}), temperature {cal['temperature']:.3f}")
    probs = assessed["probs"]
    curve = risk_coverage(probs.max(1), probs.argmax(1) == data.labels[split])
    points = {f"target {t}": (v["coverage"], None if v["accuracy"] is None else 1 - v["accuracy"])
              for t, v in m.get("abstention", {}).items()}
    risk_coverage_png(curve, run_dir / f"risk_coverage_{key}.png", f"{name} on {split} (TTA {tta})", points)
    rows = read_history(run_dir / "history.csv")
    if rows:
        history_png(rows, run_dir / "history.png", f"{name} training")
    metrics_path = run_dir / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    metrics[key] = m
    write_json(metrics_path, metrics)
    return m


def calibrate_run(run_dir: str | Path, checkpoint: str = "best", device: str = "auto", modes: tuple[str, ...] = TTA,
                  target_accuracy: float = 0.995, ood_rate: float = 0.01, ood_method: str | None = None,
                  conformal_method: str | None = None, data_override: str | None = None,
                  data_dir: str | None = None) -> dict:
    """Fit the run's trust settings on its validation split (feature statistics on its training split) and write
    ``calibration.json`` + ``calibration.safetensors`` beside the weights; returns the JSON written."""
    from bloodcell.inference.classifier import DEFAULT_CONFORMAL_METHOD

    if not 0 < target_accuracy < 1:
        raise BloodcellError(f"--target-accuracy must be between 0 and 1 (e.g. 0.995), got {target_accuracy}")
    run_dir, cfg, clf, data = open_run(run_dir, checkpoint, device, data_override, data_dir, calibrated=False)
    if len(data.labels["val"]) < 2 * len(data.class_names):
        raise BloodcellError(f"{run_dir}: the validation split has {len(data.labels['val'])} images, too few to "
                             "calibrate on")
    # as_nchw: a split on disk is read in chunks (val) or only the rows used (train's feature subset)
    cal = clf.fit_calibration(as_nchw(data.images["val"]), data.labels["val"],
                              as_nchw(data.images["train"]), data.labels["train"], checkpoint=checkpoint,
                              modes=tuple(modes), target_accuracy=target_accuracy, ood_rate=ood_rate,
                              ood_method=ood_method, conformal_method=conformal_method or DEFAULT_CONFORMAL_METHOD)
    cal.info.update({"dataset": data.meta.get("name", cfg.data), "size": cfg.size, "model": cfg.model})
    path = cal.save(clf.source.parent)
    return read_json(path)


def format_calibration(c: dict) -> str:
    """Plain-text summary of ``calibrate_run``'s result."""
    lines = [f"calibrated on {c['validation_images']} validation images ({c['checkpoint']} checkpoint); "
             f"target accuracy {c['target_accuracy']}, OOD flag rate {c['ood_rate']}",
             f"{'tta':<9}{'T':>7}{'ECE before':>12}{'ECE after':>11}{'NLL before':>12}{'NLL after':>11}"
             f"{'review below':>14}{'OOD':>13}"]
    for t, m in c["modes"].items():
        b, a = m["val_before"], m["val_after"]
        rt = "all" if m["review_threshold"] is None else f"{m['review_threshold']:.4f}"
        lines.append(f"{t:<9}{m['temperature']:>7.3f}{b['ece']:>12.4f}{a['ece']:>11.4f}{b['nll']:>12.4f}"
                     f"{a['nll']:>11.4f}{rt:>14}{m['ood_method']:>13}")
    lines += [f"note: {n}" for n in c.get("notes", [])]
    return "\n".join(lines)


def read_history(path: Path) -> list[dict]:
    """A run's history.csv as rows of floats (empty when the run has none yet; blank cells, such as the load of
    epochs logged before that column existed, read as nan)."""
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: float(v) if v else float("nan") for k, v in r.items()} for r in csv.DictReader(f)]


def format_report(m: dict, class_names: list[str]) -> str:
    """Plain-text summary of an evaluation for the terminal."""
    lines = [
        f"{m['split']} split, {m['n']} images, {m['checkpoint']} checkpoint (epoch {m['checkpoint_epoch']})",
        f"accuracy            {m['accuracy']:.4f}",
        f"weighted P / R / F1 {m['precision_weighted']:.4f} / {m['recall_weighted']:.4f} / {m['f1_weighted']:.4f}",
        f"macro    P / R / F1 {m['precision_macro']:.4f} / {m['recall_macro']:.4f} / {m['f1_macro']:.4f}",
        f"ROC AUC (OvR macro) {m['auc_ovr_macro']:.4f}" if m.get("auc_ovr_macro") is not None
        else f"ROC AUC n/a ({m.get('auc_note', 'undefined')})",
        f"parameters          {m['params_keras']:,} (Keras count), {m['params_trainable']:,} trainable",
        f"model size          {m['model_size_mb']:.2f} MB",
    ]
    speed = m.get("speed") or m.get("cpu")  # "cpu": runs evaluated before other devices existed
    if speed:
        lines.append(f"inference speed     {speed['throughput_images_per_s']:.0f} images/s "
                     f"at batch {speed['throughput_batch']}, {speed['latency_ms_batch1']:.2f} ms at batch 1 "
                     f"({speed.get('device', 'cpu')}, {speed['threads']} threads)")
    lines.append("")
    lines.append(f"{'class':<14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for c in class_names:
        r = m["per_class"][c]
        lines.append(f"{c:<14}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1-score']:>10.4f}{int(r['support']):>10}")
    if "calibration" in m:
        lines += ["", *format_trust(m)]
    return "\n".join(lines)


def format_trust(m: dict) -> list[str]:
    """The trust part of the evaluation report."""
    cal = m["calibration"]
    rows = [("uncalibrated", cal["before"])] + ([(f"T = {cal['temperature']:.3f}", cal["after"])] if cal["after"]
                                                 else [])
    lines = [f"trust (TTA {m.get('tta', 'none')}): calibration with {cal['bins']} equal-width bins",
             f"{'':<14}{'ECE':>9}{'MCE':>9}{'NLL':>9}{'Brier':>9}"]
    lines += [f"{n:<14}{r['ece']:>9.4f}{r['mce']:>9.4f}{r['nll']:>9.4f}{r['brier']:>9.4f}" for n, r in rows]
    lines.append(f"risk-coverage area (AURC) {m['risk_coverage']['aurc']:.5f}")
    if cal.get("note"):
        return [*lines, cal["note"], *format_corruptions(m)]
    lines.append(f"{'target accuracy':<17}{'val threshold':>14}{'coverage':>10}{'accuracy':>10}")
    for t in map(str, TARGETS):
        a = m["abstention"][t]
        th = "none" if a["val_threshold"] is None else f"{a['val_threshold']:.4f}"
        acc = "-" if a["accuracy"] is None else f"{a['accuracy']:.4f}"
        lines.append(f"{t:<17}{th:>14}{a['coverage']:>10.4f}{acc:>10}")
    r = m["review"]
    acc = "-" if r["accuracy_accepted"] is None else f"{r['accuracy_accepted']:.4f}"
    th = "none reaches it: review all" if r["threshold"] is None else f"{r['threshold']:.4f}"
    lines.append(f"review (threshold {th}, for {r['target_accuracy_on_val']} accuracy on validation): "
                 f"{r['review_share']:.2%} sent to review, accuracy of the rest {acc}; "
                 f"{r['ood_flagged_share']:.2%} flagged OOD ({r['ood_method']})")
    c = m["conformal"]
    lines.append(f"conformal sets ({c['method']}): " + "; ".join(
        f"alpha {a}: coverage {c[a]['coverage']:.4f}, mean size {c[a]['mean_set_size']:.3f}"
        for a in c if a != "method"))
    return [*lines, *format_corruptions(m)]


def format_corruptions(m: dict) -> list[str]:
    if "corruptions" not in m:
        return []
    k = m["corruptions"]
    ood = k["mean_ood_flagged_share"]
    return [f"corruptions ({k['images']} images, {len(k['corruptions'])} kinds x 5 severities): mean accuracy "
            f"{k['mean_corruption_accuracy']:.4f} (clean {k['clean']['accuracy']:.4f}); review "
            f"{k['mean_review_share']:.2%}, OOD {'-' if ood is None else f'{ood:.2%}'}, wrong and accepted "
            f"{k['mean_wrong_accepted_share']:.2%}"]
