"""Evaluate a run folder on a split: metrics, confusion matrix, size and CPU speed, into metrics.json."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch

from bloodcell.data.store import load_dataset
from bloodcell.data.tensors import Normalizer, split_tensors
from bloodcell.errors import BloodcellError
from bloodcell.evaluation.machine import cpu_name
from bloodcell.evaluation.metrics import classification_metrics
from bloodcell.evaluation.plots import confusion_matrix_png, history_png
from bloodcell.io import csv_text, read_json, write_json, write_text
from bloodcell.models import count_params_keras, count_params_trainable
from bloodcell.training.checkpoint import load_model
from bloodcell.training.config import TrainConfig
from bloodcell.training.loop import predict_logits, set_threads


def weights_path(run_dir: Path, checkpoint: str) -> Path:
    if checkpoint not in ("best", "last"):
        raise BloodcellError(f"checkpoint must be 'best' or 'last', not '{checkpoint}'")
    path = run_dir / f"{checkpoint}.safetensors"
    if not path.is_file():
        raise BloodcellError(f"{run_dir}: no {checkpoint}.safetensors (is this a finished bloodcell run folder?)")
    return path


@torch.inference_mode()
def cpu_speed(model: torch.nn.Module, size: int, batch: int = 256, repeats: int = 5) -> dict:
    """Inference throughput (images/s at ``batch``) and latency (median ms at batch 1) on this CPU."""
    model.eval()
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    model(x)  # warm-up
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        t.append(time.perf_counter() - t0)
    one = x[:1]
    for _ in range(5):
        model(one)
    lat = []
    for _ in range(50):
        t0 = time.perf_counter()
        model(one)
        lat.append(time.perf_counter() - t0)
    return {"throughput_images_per_s": round(batch / float(np.median(t)), 1), "throughput_batch": batch,
            "latency_ms_batch1": round(1000 * float(np.median(lat)), 3), "threads": torch.get_num_threads(),
            "machine": cpu_name()}


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = "best", speed: bool = True,
                 data_override: str | None = None, data_dir: str | None = None) -> dict:
    """One prediction pass over ``split``; every metric comes from that pass. Updates metrics.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BloodcellError(f"{run_dir}: run folder not found")
    cfg = TrainConfig.load(run_dir / "config.json")
    set_threads(cfg.threads)
    wpath = weights_path(run_dir, checkpoint)
    model, meta = load_model(wpath)
    model = model.to(memory_format=torch.channels_last)
    data = load_dataset(data_override or cfg.data, cfg.size, data_dir or cfg.data_dir)
    if data.class_names != meta["class_names"]:
        raise BloodcellError(f"{run_dir}: the dataset's classes {data.class_names} differ from the model's")
    if split not in data.images:
        raise BloodcellError(f"unknown split '{split}' (train, val, test)")
    x, y = split_tensors(data, split)
    norm = Normalizer(**(meta.get("normalization") or {}))
    probs = torch.softmax(predict_logits(model, x, norm), 1).numpy()
    m = classification_metrics(y.numpy(), probs, data.class_names)
    m.update({
        "split": split,
        "checkpoint": checkpoint,
        "checkpoint_epoch": meta.get("epoch"),
        "dataset": data.meta.get("name", cfg.data),
        "class_names": data.class_names,
        "params_keras": count_params_keras(model),
        "params_trainable": count_params_trainable(model),
        "model_size_mb": round(wpath.stat().st_size / 1e6, 3),
    })
    if speed:
        m["cpu"] = cpu_speed(model, data.size)
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
        f"ROC AUC (OvR macro) {m['auc_ovr_macro']:.4f}" if m.get("auc_ovr_macro") is not None else "ROC AUC n/a",
        f"parameters          {m['params_keras']:,} (Keras count), {m['params_trainable']:,} trainable",
        f"model size          {m['model_size_mb']:.2f} MB",
    ]
    if "cpu" in m:
        c = m["cpu"]
        lines.append(f"CPU inference       {c['throughput_images_per_s']:.0f} images/s "
                     f"at batch {c['throughput_batch']}, "
                     f"{c['latency_ms_batch1']:.2f} ms at batch 1 ({c['threads']} threads)")
    lines.append("")
    lines.append(f"{'class':<14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for c in class_names:
        r = m["per_class"][c]
        lines.append(f"{c:<14}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1-score']:>10.4f}{int(r['support']):>10}")
    return "\n".join(lines)
