"""Evaluate a classifier on a split: a pure ``evaluate`` (metrics only) and ``evaluate_run``, which writes
``metrics.json``, the confusion matrix and the training curves into the run folder."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch

from bloodcell.choices import SPLITS
from bloodcell.data.store import load_dataset
from bloodcell.data.tensors import to_uint8_nchw
from bloodcell.errors import BloodcellError
from bloodcell.evaluation.metrics import classification_metrics
from bloodcell.evaluation.plots import confusion_matrix_png, history_png
from bloodcell.inference import Classifier
from bloodcell.io import csv_text, read_json, write_json, write_text
from bloodcell.machine import device_name, set_threads
from bloodcell.models import count_params_keras, count_params_trainable
from bloodcell.training.config import TrainConfig


def evaluate(classifier: Classifier, images: np.ndarray | torch.Tensor, labels: np.ndarray) -> dict:
    """Metrics of one prediction pass over ``images`` (N x H x W x 3 uint8, or a uint8 NCHW tensor); no files."""
    x = to_uint8_nchw(images) if isinstance(images, np.ndarray) else images
    probs = classifier.probabilities(x).cpu().numpy()
    bad = int((~np.isfinite(probs).all(1)).sum())
    if bad:
        raise BloodcellError(f"{classifier.source or 'the model'}: its output is NaN or infinite for {bad} of "
                             f"{len(probs)} images; the weights diverged in training (see history.csv)")
    return classification_metrics(np.asarray(labels), probs, classifier.class_names)


@torch.inference_mode()
def measure_speed(classifier: Classifier, batch: int = 256, repeats: int = 5) -> dict:
    """Inference throughput (images/s at ``batch``) and latency (median ms at batch 1) on the classifier's device."""
    model, device = classifier.model.eval(), classifier.device
    size = classifier.input_size
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def timed(inp: torch.Tensor) -> float:
        t0 = time.perf_counter()
        model(inp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    timed(x)  # warm-up
    t = [timed(x) for _ in range(repeats)]
    one = x[:1]
    for _ in range(5):
        timed(one)
    lat = [timed(one) for _ in range(50)]
    return {"throughput_images_per_s": round(batch / float(np.median(t)), 1), "throughput_batch": batch,
            "latency_ms_batch1": round(1000 * float(np.median(lat)), 3), "threads": torch.get_num_threads(),
            "device": device_name(device), "machine": device_name("cpu")}


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = "best", speed: bool = False,
                 data_override: str | None = None, data_dir: str | None = None, device: str = "auto") -> dict:
    """Evaluate a run folder on ``split``; every metric comes from one pass. Updates metrics.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BloodcellError(f"{run_dir}: run folder not found")
    if split not in SPLITS:
        raise BloodcellError(f"unknown split '{split}' ({', '.join(SPLITS)})")
    cfg = TrainConfig.load(run_dir / "config.json")
    set_threads(cfg.threads)
    clf = Classifier.from_run(run_dir, checkpoint, device=device)
    data = load_dataset(data_override or cfg.data, cfg.size, data_dir or cfg.data_dir)
    if data.class_names != clf.class_names:
        raise BloodcellError(f"{run_dir}: the dataset's classes {data.class_names} differ from the model's")
    m = evaluate(clf, data.images[split], data.labels[split])
    m.update({
        "split": split,
        "checkpoint": checkpoint,
        "checkpoint_epoch": clf.meta.get("epoch"),
        "dataset": data.meta.get("name", cfg.data),
        "class_names": data.class_names,
        "params_keras": count_params_keras(clf.model),
        "params_trainable": count_params_trainable(clf.model),
        "model_size_mb": round(clf.source.stat().st_size / 1e6, 3),
        "device": device_name(clf.device),
    })
    if speed:
        m["speed"] = measure_speed(clf)
    cm = np.asarray(m["confusion_matrix"])
    write_text(run_dir / f"confusion_{split}.csv",
               csv_text(["true\\pred", *data.class_names], ([n, *r.tolist()] for n, r in zip(data.class_names, cm))))
    confusion_matrix_png(cm, data.class_names, run_dir / f"confusion_{split}.png",
                         f"{cfg.model} on {split}: accuracy {m['accuracy']:.4f}")
    rows = read_history(run_dir / "history.csv")
    if rows:
        history_png(rows, run_dir / "history.png", f"{cfg.model} training")
    metrics_path = run_dir / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    metrics[split] = m
    write_json(metrics_path, metrics)
    return m


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
    return "\n".join(lines)
