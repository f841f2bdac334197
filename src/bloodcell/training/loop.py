"""One training run: config in, run folder out (config, history, weights, metrics). Resumable."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bloodcell import __version__
from bloodcell.data.balance import balance_training_set, class_weights
from bloodcell.data.recipe import Recipe
from bloodcell.data.store import PreparedData, load_dataset
from bloodcell.data.tensors import (
    Normalizer,
    augment_batch,
    channel_stats,
    split_tensors,
    stratified_subset,
    to_uint8_nchw,
)
from bloodcell.errors import BloodcellError
from bloodcell.evaluation.machine import cpu_name
from bloodcell.io import csv_text, read_json, write_json, write_text
from bloodcell.models import count_params_keras, count_params_trainable, create_model, get_spec
from bloodcell.training.checkpoint import load_state_file, restore_training_state, save_state, save_weights
from bloodcell.training.config import TrainConfig
from bloodcell.training.schedules import lr_factor

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "load"]
STATE_KEYS = ("model", "optimizer", "generator", "torch_rng", "history", "best", "epoch")
PARTIAL_KEYS = ("next", "perm", "loss_sum", "correct", "seconds")


def machine_load() -> float:
    """The 1-minute load average: above the thread count, other work competed for the CPU (nan if unknown)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Windows
        return float("nan")


def set_threads(threads: int | None) -> int:
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    name = cfg.optimizer or get_spec(cfg.model).optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, norm: Normalizer, batch_size: int = 512) -> torch.Tensor:
    """Logits for a whole uint8 NCHW tensor, in batches, in eval mode."""
    model.eval()
    return torch.cat([model(norm(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])


def weights_meta(cfg: TrainConfig, data: PreparedData, norm_stats: dict | None, epoch: int) -> dict:
    """What a weights file carries so it can be used without the run folder: model, classes, recipe."""
    recipe = data.meta.get("recipe") or Recipe(size=data.size).to_dict()
    return {
        "model": cfg.model,
        "model_args": cfg.model_args,
        "class_names": data.class_names,
        "input_size": data.size,
        "recipe": recipe,
        "scaling": "divide by 255",
        "normalization": norm_stats,
        "epoch": epoch,
        "dataset": data.meta.get("name"),
        "bloodcell_version": __version__,
    }


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool | None = None,
          data: PreparedData | None = None, log=print, extend_to: int | None = None,
          save_every: float = 300.0) -> dict:
    """Train ``cfg`` into run folder ``out``; with ``resume`` continue from where it was stopped.

    On resume the saved config is used; ``extend_to`` may raise its epoch count. Besides the state at the end of
    each epoch, the state inside an epoch is saved every ``save_every`` seconds (an epoch of a large model takes
    over half an hour on a 2-core CPU), so a killed run loses at most that much; the resumed run ends exactly
    as an uninterrupted one.
    Returns the training summary (also written to ``metrics.json`` under "training").
    """
    out = Path(out)
    cfg.validate()
    state_path, config_path = out / "state.pt", out / "config.json"
    if resume:
        if not config_path.is_file():
            raise BloodcellError(f"{out}: no run to resume (config.json missing)")
        saved = TrainConfig.load(config_path)
        if extend_to and extend_to > saved.epochs:  # a resume may extend a run on request, never shorten it
            saved.epochs = extend_to
        cfg = saved
    elif config_path.exists():
        raise BloodcellError(f"{out}: already holds a run; use --resume to continue it or choose another --out")

    threads = set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if data is None:
        data = load_dataset(cfg.data, cfg.size, cfg.data_dir)
    if data.size != cfg.size:
        raise BloodcellError(f"dataset '{cfg.data}' has {data.size}px images, but --size is {cfg.size}")
    x_train, y_train = split_tensors(data, "train")
    x_val, y_val = split_tensors(data, "val")
    if cfg.train_limit:
        keep = torch.from_numpy(stratified_subset(data.labels["train"], cfg.train_limit, cfg.seed))
        x_train, y_train = x_train[keep], y_train[keep]
    loss_weight = None
    if cfg.balance in ("augment", "smote"):
        imgs, labels = balance_training_set(x_train.permute(0, 2, 3, 1).numpy(), y_train.numpy(),
                                            data.num_classes, cfg.balance, cfg.seed)
        x_train, y_train = to_uint8_nchw(imgs), torch.from_numpy(labels)
    elif cfg.balance == "class-weight":
        loss_weight = class_weights(y_train.numpy(), data.num_classes)
    norm_stats = None
    if cfg.normalize:
        mean, std = channel_stats(x_train)
        norm_stats = {"mean": mean, "std": std}
    norm = Normalizer(**(norm_stats or {}))

    model = create_model(cfg.model, num_classes=data.num_classes, input_size=data.size, **cfg.model_args)
    model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    best = {"val_acc": -1.0, "epoch": -1}
    start, partial = 0, None
    if resume and state_path.is_file():
        st = load_state_file(state_path, STATE_KEYS)
        partial = st.get("partial")  # set when the run was stopped inside epoch ``start + 1``
        if partial is not None and (not isinstance(partial, dict) or set(PARTIAL_KEYS) - set(partial)):
            raise BloodcellError(f"{state_path}: corrupt training state (the part-epoch record lacks "
                                 f"{sorted(set(PARTIAL_KEYS) - set(partial or {}))}); delete it to start afresh")
        restore_training_state(st, state_path, model, optimizer, gen)
        history, best, start = [dict(h) for h in st["history"]], st["best"], st["epoch"] + 1
        if partial:
            log(f"resuming {out} in epoch {start + 1} of {cfg.epochs}, after {partial['next']} images")
        else:
            log(f"resuming {out} after epoch {start} of {cfg.epochs}")
    elif not resume:
        out.mkdir(parents=True, exist_ok=True)
    cfg.save(config_path)
    # e.g. the AutoClassifier's autoencoder stage, done once before the first classifier epoch
    if getattr(model, "needs_pretraining", False) and start == 0 and not partial:
        from bloodcell.training.autoencoder import pretrain

        pretrain(model, x_train, x_val, norm, cfg, out, gen, log)

    params = {"keras": count_params_keras(model), "trainable": count_params_trainable(model)}
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm import tqdm

    n, bs = len(x_train), cfg.batch_size

    def save_checkpoint(finished_epoch: int, inside: dict | None = None) -> None:
        """Everything the loop needs to go on: after epoch ``finished_epoch`` (0-based), or ``inside`` the next."""
        save_state(state_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "history": history, "best": best, "epoch": finished_epoch,
            **({"partial": inside} if inside else {}),
        })

    for epoch in range(start, cfg.epochs):
        lr = cfg.lr * lr_factor(cfg.schedule, epoch, cfg.epochs)
        for g in optimizer.param_groups:
            g["lr"] = lr
        model.train()
        t0 = last_save = time.perf_counter()
        if partial:  # the generators were restored with the state, so the rest of the epoch replays exactly
            perm, first, loss_sum, correct = partial["perm"], partial["next"], partial["loss_sum"], partial["correct"]
            loads = list(partial.get("loads", []))
            t0 -= partial["seconds"]
            partial = None
        else:
            perm, first, loss_sum, correct = torch.randperm(n, generator=gen), 0, 0.0, 0
            loads = []
        bar = tqdm(range(first, n, bs), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not progress, leave=False, initial=first // bs, total=-(-n // bs))
        for i in bar:
            idx = perm[i : i + bs]
            xb = augment_batch(x_train[idx], cfg.augment, gen)
            yb = y_train[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                logits = model(norm(xb))
                loss = F.cross_entropy(logits, yb, weight=loss_weight, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            loads.append(machine_load())
            if time.perf_counter() - last_save >= save_every and i + bs < n:
                save_checkpoint(epoch - 1, {"next": i + bs, "perm": perm, "loss_sum": loss_sum, "correct": correct,
                                            "seconds": time.perf_counter() - t0, "loads": loads})
                last_save = time.perf_counter()
        train_s = time.perf_counter() - t0
        val_logits = predict_logits(model, x_val, norm)
        val_loss = F.cross_entropy(val_logits, y_val).item()
        val_acc = (val_logits.argmax(1) == y_val).float().mean().item()
        row = {"epoch": epoch + 1, "train_loss": round(loss_sum / n, 6), "train_acc": round(correct / n, 6),
               "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6), "lr": lr,
               "seconds": round(time.perf_counter() - t0, 3), "load": round(float(np.mean(loads)), 2)}
        history.append(row)
        meta = weights_meta(cfg, data, norm_stats, epoch + 1)
        if val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "epoch": epoch + 1}
            save_weights(out / "best.safetensors", model, meta)
        save_weights(out / "last.safetensors", model, meta)
        write_text(out / "history.csv", csv_text(HISTORY_FIELDS, history))
        save_checkpoint(epoch)
        log(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  acc {row['train_acc']:.4f}  "
            f"val_loss {val_loss:.4f}  val_acc {val_acc:.4f}  lr {lr:.2e}  {row['seconds']:.1f}s "
            f"(train {train_s:.1f}s, load {row['load']:.2f})")

    secs = [h["seconds"] for h in history]
    summary = {
        "model": cfg.model,
        "params_keras": params["keras"],
        "params_trainable": params["trainable"],
        "epochs": len(history),
        "first_epoch_seconds": secs[0] if secs else None,
        "mean_epoch_seconds": round(float(np.mean(secs)), 3) if secs else None,
        "total_seconds": round(float(np.sum(secs)), 3),
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "final_val_acc": history[-1]["val_acc"] if history else None,
        "threads": threads,
        "machine": cpu_name(),  # epoch seconds mean little without it; reports name each run's machine
        "train_images": n,
        "train_class_counts": np.bincount(y_train.numpy(), minlength=data.num_classes).tolist(),
    }
    metrics_path = out / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    metrics["training"] = summary
    write_json(metrics_path, metrics)
    return summary
