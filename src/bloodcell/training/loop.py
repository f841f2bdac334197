"""One training run: config in, run folder out (config, history, weights, metrics). Resumable, on any device.

``train`` is a sequence of named steps, each testable alone: ``prepare_training_data`` (the splits as uint8
tensors on the device, or, for a dataset stored as shards, lazy ``ShardedImages`` read batch by batch),
``build_model_and_optimizer``, ``run_epoch`` (no host synchronisation per batch: loss and correct counts
accumulate as tensors; batches on disk are read one ahead in a background thread; augmentation, jitter and mixes
act on whole batches with draws from the run's generator), ``validate`` (through the inference ``Classifier``; with
``--ema`` on the moving average of the weights, which is also what the weights files hold) and
``save_checkpoint`` / ``load_checkpoint`` (everything needed to resume exactly, the CUDA RNG and the EMA included).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import bloodcell.training.distributed as distributed
from bloodcell import __version__
from bloodcell.choices import MIX_ALPHA
from bloodcell.data.balance import balance_training_set, class_weights
from bloodcell.data.jitter import (
    apply_colour_jitter,
    apply_mix,
    apply_scale_jitter,
    colour_draws,
    mix_draws,
    zoom_draws,
)
from bloodcell.data.recipe import Recipe
from bloodcell.data.store import PreparedData, load_dataset
from bloodcell.data.tensors import (
    Normalizer,
    ShardedImages,
    apply_augment,
    augment_codes,
    channel_stats,
    split_tensors,
    stratified_subset,
    to_uint8_nchw,
)
from bloodcell.errors import BloodcellError
from bloodcell.inference import Classifier, save_weights
from bloodcell.inference.weights import load_state
from bloodcell.io import csv_text, read_json, write_json, write_text
from bloodcell.machine import (
    configure_determinism,
    cpu_name,
    device_name,
    machine_load,
    resolve_device,
    set_threads,
)
from bloodcell.models import count_params_keras, count_params_trainable, create_model, get_spec
from bloodcell.training.bn_recalibrate import recalibrate_bn, recalibration_sample
from bloodcell.training.checkpoint import load_state_file, restore_training_state, rng_state, save_state
from bloodcell.training.config import TrainConfig
from bloodcell.training.distill import distillation_loss, load_teacher, teacher_logits
from bloodcell.training.distill import summary as distill_summary
from bloodcell.training.distributed import Dist
from bloodcell.training.init_from import describe, init_from
from bloodcell.training.lock import run_lock
from bloodcell.training.prefetch import batch_reader
from bloodcell.training.schedules import step_lr

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "load"]
STATE_KEYS = ("model", "optimizer", "generator", "torch_rng", "history", "best", "epoch")
PARTIAL_KEYS = ("next", "perm", "loss_sum", "correct", "seconds")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainingData:
    """The training and validation splits as uint8 NCHW tensors on the training device (or ``ShardedImages``
    delivering batches there, for a dataset on disk), and what the loss and the saved weights need to know."""

    x_train: torch.Tensor | ShardedImages
    y_train: torch.Tensor
    x_val: torch.Tensor | ShardedImages
    y_val: torch.Tensor
    class_names: list[str]
    size: int
    recipe: dict
    dataset: str | None
    loss_weight: torch.Tensor | None = None
    normalization: dict | None = None


@dataclass
class TrainState:
    """What changes as training goes on; ``save_checkpoint`` writes all of it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "epoch": -1})
    next_epoch: int = 0  # 0-based index of the next epoch to run
    partial: dict | None = None  # where a stopped epoch ``next_epoch`` left off
    net: nn.Module | None = None  # what the batches go through: the model, or its DistributedDataParallel wrapper
    dist: Dist = field(default_factory=Dist)
    init_from: dict | None = None  # what --init-from loaded; kept in state.pt so a resumed run still reports it
    teacher: Classifier | None = None  # --teacher: fixed, so a resumed run distils exactly as before
    ema: AveragedModel | None = None  # --ema: the moving average of the weights, updated after every step


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s parameters and buffers (so BatchNorm statistics follow), or
    None when ``decay`` is 0. Its step counter stays on the CPU, so its first-step check reads no device."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def weights_model(state: TrainState) -> nn.Module:
    """The weights that are validated and saved: the EMA's when on, else the trained model's."""
    return state.ema.module if state.ema is not None else state.model


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``cfg.optimizer``, or the paper's choice for the model when it is None."""
    name = cfg.optimizer or get_spec(cfg.model).optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def prepare_training_data(cfg: TrainConfig, data: PreparedData, device: torch.device) -> TrainingData:
    """Subset, balance and (optionally) measure normalisation statistics on the host, then move to ``device``.

    A split on disk stays there (subset lazily, statistics summed in chunks); oversampling (``--balance augment``
    or ``smote``) needs every training image at once, so it reads the training split into memory."""
    if data.size != cfg.size:
        raise BloodcellError(f"dataset '{cfg.data}' has {data.size}px images, but --size is {cfg.size}")
    x_train, y_train = split_tensors(data, "train")
    x_val, y_val = split_tensors(data, "val")
    if cfg.train_limit:
        if cfg.train_limit < data.num_classes:
            raise BloodcellError(f"--train-limit {cfg.train_limit} is below the {data.num_classes} classes; one "
                                 f"image of each is always kept, so give at least {data.num_classes}")
        keep = torch.from_numpy(stratified_subset(data.labels["train"], cfg.train_limit, cfg.seed))
        x_train = x_train.select(keep) if isinstance(x_train, ShardedImages) else x_train[keep]
        y_train = y_train[keep]
    loss_weight = None
    if cfg.balance in ("augment", "smote"):
        host = x_train.nhwc() if isinstance(x_train, ShardedImages) else x_train.permute(0, 2, 3, 1).numpy()
        imgs, labels = balance_training_set(host, y_train.numpy(), data.num_classes, cfg.balance, cfg.seed)
        x_train, y_train = to_uint8_nchw(imgs), torch.from_numpy(labels)
    elif cfg.balance == "class-weight":
        loss_weight = class_weights(y_train.numpy(), data.num_classes).to(device)
    normalization = None
    if cfg.normalize:
        mean, std = channel_stats(x_train)
        normalization = {"mean": mean, "std": std}
    return TrainingData(
        x_train.contiguous().to(device), y_train.to(device), x_val.contiguous().to(device), y_val.to(device),
        class_names=list(data.class_names), size=data.size,
        recipe=data.meta.get("recipe") or Recipe(size=data.size).to_dict(), dataset=data.meta.get("name"),
        loss_weight=loss_weight, normalization=normalization)


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """Every BatchNorm's running-statistics momentum (PyTorch's convention: the weight of each new batch)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def build_model_and_optimizer(cfg: TrainConfig, num_classes: int, size: int, device: torch.device, *,
                              fresh: bool = True, on_init: Callable[[dict], None] | None = None,
                              ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The registry model on ``device`` (channels-last) and its optimizer; seeded by the caller.

    A ``fresh`` run starts from ``--pretrained`` / ``--init-from`` weights (``on_init`` gets the init-from report);
    a resumed one does not (its checkpoint replaces every weight, and the source may be gone by then)."""
    model = create_model(cfg.model, num_classes=num_classes, input_size=size, pretrained=cfg.pretrained and fresh,
                         **cfg.model_args)
    if cfg.bn_momentum is not None and "bn_momentum" not in cfg.model_args:
        set_bn_momentum(model, cfg.bn_momentum)
    if fresh and cfg.init_from:
        report = init_from(model, cfg.init_from)
        if on_init is not None:
            on_init(report)
    model = model.to(device, memory_format=torch.channels_last)
    return model, make_optimizer(cfg, model)


def weights_meta(cfg: TrainConfig, td: TrainingData, epoch: int) -> dict:
    """What a weights file carries so it can be used without the run folder: model, classes, recipe."""
    return {
        "model": cfg.model,
        "model_args": cfg.model_args,
        "class_names": td.class_names,
        "input_size": td.size,
        "recipe": td.recipe,
        "scaling": "divide by 255",
        "normalization": td.normalization,
        "epoch": epoch,
        "dataset": td.dataset,
        "bloodcell_version": __version__,
    }


def classifier_for(state: TrainState, td: TrainingData) -> Classifier:
    """The model being trained, seen through the inference core (so validation predicts as evaluate does)."""
    recipe = Recipe.from_dict(td.recipe, where=f"dataset {td.dataset}")
    return Classifier(weights_model(state), class_names=td.class_names, recipe=recipe, normalization=td.normalization,
                      device=td.x_val.device)


def validate(clf: Classifier, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Validation loss and accuracy (one host sync, at the end)."""
    logits = clf.logits(x)
    loss = F.cross_entropy(logits, y)
    acc = (logits.argmax(1) == y).float().mean()
    return float(loss), float(acc)


def mix_alpha(cfg: TrainConfig) -> float:
    """``--mix-alpha``, or the usual alpha of the chosen mix (mixup 0.2, cutmix 1.0)."""
    return cfg.mix_alpha if cfg.mix_alpha is not None else MIX_ALPHA.get(cfg.mix, 1.0)


def batch_draws(cfg: TrainConfig, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The random numbers of a global batch of ``n`` for the options that are on, in a fixed order (so the
    generator, and with it a resumed or multi-process run, advances the same way); none when all are off."""
    draws = {}
    if cfg.scale_jitter:
        draws["zoom"] = zoom_draws(n, cfg.scale_jitter, gen)
    if cfg.color_jitter:
        draws["colour"] = colour_draws(n, cfg.color_jitter, gen)
    if cfg.mix != "none":
        draws["mix"] = mix_draws(n, cfg.mix, gen)
    return draws


def jitter(xb: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scale then colour jitter of a uint8 training batch (after the flips), with this rank's draws."""
    if "zoom" in draws:
        xb = apply_scale_jitter(xb, draws["zoom"])
    if "colour" in draws:
        xb = apply_colour_jitter(xb, draws["colour"])
    return xb


def inputs_and_targets(x: torch.Tensor, y: torch.Tensor, draws: dict[str, torch.Tensor], cfg: TrainConfig,
                       num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's input and the loss's target: the labels, or with ``--mix`` the mixed images and soft targets
    (pairs from the same rank's shard)."""
    if "mix" not in draws:
        return x, y
    return apply_mix(x, y, draws["mix"], cfg.mix, mix_alpha(cfg), num_classes)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


# In a multi-process run the ranks decide together, every this many batches, whether to save a part-epoch state.
SAVE_CHECK_BATCHES = 20


def run_epoch(state: TrainState, td: TrainingData, cfg: TrainConfig, epoch: int, *, progress: bool = False,
              save_every: float = 300.0, on_save: Callable[[dict], None] | None = None) -> dict:
    """Train one epoch (or the rest of a stopped one); returns train_loss, train_acc and seconds.

    Losses and correct counts stay on the device; the host reads them once, at the end (and when a part-epoch
    state is saved every ``save_every`` seconds through ``on_save``). In a multi-process run every rank draws the
    whole batch's indices and augmentation codes and trains on its shard; the sums are added over ranks. A
    training split on disk (``ShardedImages``) is read one batch ahead in a background thread, each rank reading
    only its shard of the batch; the batches are the same, so the results are those of the in-memory run.
    """
    from tqdm import tqdm

    net, optimizer, scaler, gen = state.net or state.model, state.optimizer, state.scaler, state.generator
    d = state.dist
    device = td.x_train.device
    n, bs = len(td.x_train), cfg.batch_size
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    norm = Normalizer(**(td.normalization or {})).to(device)
    steps, num_classes = -(-n // bs), len(td.class_names)

    def lr_of(step: int) -> float:
        return step_lr(cfg.lr, cfg.schedule, epoch, cfg.epochs, step, steps, cfg.warmup_epochs)

    net.train()
    t0 = last_save = time.perf_counter()
    partial, state.partial = state.partial, None
    if partial:  # the generators were restored with the state, so the rest of the epoch replays exactly
        perm, first, seen = partial["perm"], partial["next"], int(partial.get("seen", partial["next"]))
        # a part-epoch record holds the sums over all ranks: rank 0 carries them on, the others start at zero
        loss_sum = torch.tensor(float(partial["loss_sum"]) if d.main else 0.0, dtype=acc_dtype, device=device)
        correct = torch.tensor(int(partial["correct"]) if d.main else 0, device=device)
        t0 -= partial["seconds"]
    else:
        perm, first, seen = torch.randperm(n, generator=gen), 0, 0
        loss_sum = torch.zeros((), dtype=acc_dtype, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
    perm_dev = perm.to(device)
    autocast = torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(cfg.precision, torch.float32),
                              enabled=cfg.precision != "fp32")
    bar = tqdm(range(first, n, bs), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
               disable=not (progress and d.main), leave=False, initial=first // bs, total=-(-n // bs))
    # take(idx): plain indexing in memory; for a split on disk, the batch read while the previous one trained
    with batch_reader(td.x_train, perm, range(first, n, bs), bs, d) as take:
        for i in bar:
            batch = perm_dev[i : i + bs]
            codes = augment_codes(len(batch), cfg.augment, gen) if cfg.augment != "none" else None
            draws = batch_draws(cfg, len(batch), gen)
            if len(batch) < d.world:  # a last batch too small to give every rank an image is left out
                continue
            set_lr(optimizer, lr_of(i // bs))  # per step: the warm-up ramps within epochs
            idx = distributed.shard(batch, d)
            draws = {k: distributed.shard(v, d) for k, v in draws.items()}
            xb = take(idx) if codes is None else apply_augment(take(idx), distributed.shard(codes, d), cfg.augment)
            yb = td.y_train[idx]
            x_seen = jitter(xb, draws)  # uint8: what the student sees before normalising (and the teacher)
            x_in, target = inputs_and_targets(norm(x_seen), yb, draws, cfg, num_classes)
            with autocast:
                logits = net(x_in)
                # soft targets (--mix) take the class weights and label smoothing as hard labels do
                loss = F.cross_entropy(logits, target, weight=td.loss_weight, label_smoothing=cfg.label_smoothing)
                if state.teacher is not None:  # knowledge distillation (training/distill.py); --mix is refused
                    loss = distillation_loss(loss, logits, teacher_logits(state.teacher, x_seen),
                                             alpha=cfg.distill_alpha, temperature=cfg.distill_temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if state.ema is not None:
                state.ema.update_parameters(state.model)
            loss_sum += loss.detach().to(acc_dtype) * len(idx)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(batch)
            if on_save and i + bs < n:
                due = time.perf_counter() - last_save >= save_every
                if d.active and (i // bs) % SAVE_CHECK_BATCHES:
                    continue  # ranks agree on saving only every SAVE_CHECK_BATCHES batches (one broadcast each)
                if distributed.any_rank(d, due, device):
                    total_loss, total_correct = distributed.all_sum(d, loss_sum), distributed.all_sum(d, correct)
                    on_save({"next": i + bs, "perm": perm, "seen": seen, "loss_sum": float(total_loss),
                             "correct": int(total_correct), "seconds": time.perf_counter() - t0})
                    if d.active:  # the saved record holds the sums over ranks: rank 0 carries them, others restart
                        loss_sum = total_loss if d.main else torch.zeros_like(loss_sum)
                        correct = total_correct if d.main else torch.zeros_like(correct)
                    last_save = time.perf_counter()
    loss_sum, correct = distributed.all_sum(d, loss_sum), distributed.all_sum(d, correct)
    return {"train_loss": float(loss_sum) / max(seen, 1), "train_acc": int(correct) / max(seen, 1),
            "lr": lr_of(steps - 1),  # the epoch's last step's, which is the epoch's rate once warm-up is over
            "train_seconds": time.perf_counter() - t0}


def save_checkpoint(path: Path, state: TrainState, finished_epoch: int, inside: dict | None = None) -> None:
    """Everything the loop needs to go on: after epoch ``finished_epoch`` (0-based), or ``inside`` the next.

    In a multi-process run every rank must call it (each rank's RNG state is gathered); rank 0 writes."""
    ranks = distributed.gather(state.dist, rng_state())
    if not state.dist.main:
        return
    save_state(path, {
        "model": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
        "optimizer": state.optimizer.state_dict(), "generator": state.generator.get_state(),
        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
        **ranks[0], **({"rank_rng": ranks} if state.dist.active else {}),
        "history": state.history, "best": state.best, "epoch": finished_epoch, "init_from": state.init_from,
        "ema": {k: v.detach().cpu() for k, v in state.ema.state_dict().items()} if state.ema is not None else None,
        **({"partial": inside} if inside else {}),
    })


def load_checkpoint(path: Path, state: TrainState) -> None:
    """Restore ``state`` from ``path`` (weights, optimizer, scaler, generators, history, where to go on)."""
    st = load_state_file(path, STATE_KEYS)
    partial = st.get("partial")  # set when the run was stopped inside epoch ``epoch + 2`` (1-based)
    if partial is not None and (not isinstance(partial, dict) or set(PARTIAL_KEYS) - set(partial)):
        raise BloodcellError(f"{path}: corrupt training state (the part-epoch record lacks "
                             f"{sorted(set(PARTIAL_KEYS) - set(partial or {}))}); delete it to start afresh")
    restore_training_state(st, path, state.model, state.optimizer, state.generator, state.scaler)
    ranks = st.get("rank_rng")
    if state.dist.active and ranks and len(ranks) == state.dist.world:  # each rank's own dropout generator
        restore_training_state({**st, **ranks[state.dist.rank]}, path, state.model, state.optimizer,
                               state.generator, state.scaler)
    state.history, state.best = [dict(h) for h in st["history"]], dict(st["best"])
    state.next_epoch, state.partial = st["epoch"] + 1, partial
    state.init_from = st.get("init_from")  # states saved before --init-from existed have none
    if state.ema is not None:
        if st.get("ema") is None:
            raise BloodcellError(f"{path}: the training state holds no moving average of the weights although the "
                                 "run's config has ema on; delete it to start afresh")
        load_state(state.ema, st["ema"], path)


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool | None = None,
          data: PreparedData | None = None, log=print, extend_to: int | None = None,
          save_every: float = 300.0, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train ``cfg`` into run folder ``out``; with ``resume`` continue from where it was stopped.

    On resume the saved config is used; ``extend_to`` may raise its epoch count. Besides the state at the end of
    each epoch, the state inside an epoch is saved every ``save_every`` seconds (an epoch of a large model takes
    over half an hour on a 2-core CPU), so a killed run loses at most that much; the resumed run ends exactly
    as an uninterrupted one. The run folder is locked while training. ``on_epoch(row)`` is called with each
    epoch's history row once that epoch is saved (a sweep reports it to its pruner; an exception it raises stops
    the run with the epochs so far kept).
    Returns the training summary (also written to ``metrics.json`` under "training").
    """
    out = Path(out)
    cfg.validate()
    d = distributed.from_env()
    if not d.main:  # rank 0 checks, creates and locks the folder; the other ranks only read from it
        return _train_locked(cfg, out, resume, progress, data, lambda s: None, extend_to, save_every, d, None)
    if out.exists() and not out.is_dir():
        raise BloodcellError(f"--out {out}: exists and is not a folder")
    if resume:
        if not (out / "config.json").is_file():
            raise BloodcellError(f"{out}: no run to resume (config.json missing)")
    else:  # whether it already holds a run is checked under the lock, so a running holder is named
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BloodcellError(f"--out {out}: cannot create the run folder ({e.strerror})") from None
    with run_lock(out):
        return _train_locked(cfg, out, resume, progress, data, log, extend_to, save_every, d, on_epoch)


def _train_locked(cfg: TrainConfig, out: Path, resume: bool, progress: bool | None, data: PreparedData | None,
                  log, extend_to: int | None, save_every: float, d: Dist, on_epoch) -> dict:
    device = resolve_device(cfg.device)
    if d.active and device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    distributed.start(d, device)
    try:
        result = _run(cfg, out, resume, progress, data, log, extend_to, save_every, d, device, on_epoch)
        distributed.barrier(d)  # no rank closes its connections while rank 0 still writes (gloo would abort)
        return result
    finally:
        distributed.stop(d)


def _run(cfg: TrainConfig, out: Path, resume: bool, progress: bool | None, data: PreparedData | None,
         log, extend_to: int | None, save_every: float, d: Dist, device: torch.device, on_epoch) -> dict:
    state_path, config_path = out / "state.pt", out / "config.json"
    if resume:
        saved = TrainConfig.load(config_path)
        if extend_to and extend_to > saved.epochs:  # a resume may extend a run on request, never shorten it
            saved.epochs = extend_to
        cfg = saved
    elif config_path.exists() and d.main:  # another process created it between our check and the lock
        raise BloodcellError(f"{out}: already holds a run; use --resume to continue it or choose another --out")
    threads = set_threads(cfg.threads or (max(1, (os.cpu_count() or 1) // distributed.local_world()) if d.active
                                          else None))
    configure_determinism(device)
    torch.manual_seed(cfg.seed + d.rank)  # ranks draw different dropout masks; the weights start as rank 0's
    np.random.seed(cfg.seed)
    if data is None:
        data = load_dataset(cfg.data, cfg.size, cfg.data_dir)
    td = prepare_training_data(cfg, data, device)
    inits: list[dict] = []
    model, optimizer = build_model_and_optimizer(cfg, data.num_classes, data.size, device,
                                                 fresh=not (resume and state_path.is_file()), on_init=inits.append)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    state = TrainState(model, optimizer, scaler, torch.Generator().manual_seed(cfg.seed), dist=d,
                       init_from=inits[0] if inits else None)
    if state.init_from:
        log(describe(state.init_from))
    state.teacher = load_teacher(cfg.teacher, class_names=td.class_names, size=td.size, recipe=td.recipe,
                                 normalization=td.normalization, device=device)
    if d.active:
        if getattr(model, "needs_pretraining", False):
            raise BloodcellError(f"model '{cfg.model}' has a pre-training stage, which runs in one process only; "
                                 "train it without torchrun/--nproc")
        if cfg.sync_bn:
            if device.type != "cuda":
                raise BloodcellError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel); "
                                     "without it each process keeps its own BatchNorm statistics")
            state.model = model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters
        state.net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    state.ema = make_ema(model, cfg.ema)
    if resume and state_path.is_file():
        load_checkpoint(state_path, state)
        if state.partial:
            log(f"resuming {out} in epoch {state.next_epoch + 1} of {cfg.epochs}, "
                f"after {state.partial['next']} images")
        else:
            log(f"resuming {out} after epoch {state.next_epoch} of {cfg.epochs}")
    if d.main:
        cfg.save(config_path)
    # e.g. the AutoClassifier's autoencoder stage, done once before the first classifier epoch
    if getattr(model, "needs_pretraining", False) and state.next_epoch == 0 and not state.partial:
        from bloodcell.training.autoencoder import pretrain

        pretrain(model, td.x_train, td.x_val, Normalizer(**(td.normalization or {})).to(device), cfg, out,
                 state.generator, log)

    if progress is None:
        progress = sys.stderr.isatty()
    clf = classifier_for(state, td)
    recal = recalibration_sample(td.x_train, cfg.bn_recalibrate, cfg.seed) if cfg.bn_recalibrate else None
    for epoch in range(state.next_epoch, cfg.epochs):
        def save_inside(inside: dict, epoch: int = epoch) -> None:
            save_checkpoint(state_path, state, epoch - 1, inside)

        stats = run_epoch(state, td, cfg, epoch, progress=progress, save_every=save_every, on_save=save_inside)
        t_val = time.perf_counter()
        if recal is not None:  # the statistics of these weights, not a lagging average (bn_recalibrate.py)
            recalibrate_bn(weights_model(state), recal, Normalizer(**(td.normalization or {})).to(device))
        val_loss, val_acc = distributed.from_main(d, validate(clf, td.x_val, td.y_val), device)
        if not (math.isfinite(stats["train_loss"]) and math.isfinite(val_loss)):
            kept = f"epoch {state.history[-1]['epoch']} is kept in {out}" if state.history else "nothing was saved"
            raise BloodcellError(f"training diverged in epoch {epoch + 1} (train loss {stats['train_loss']}, val "
                                 f"loss {val_loss}): the weights are no longer finite; {kept}. Lower --lr "
                                 f"(it is {cfg.lr:g})")
        seconds = stats["train_seconds"] + time.perf_counter() - t_val
        row = {"epoch": epoch + 1, "train_loss": round(stats["train_loss"], 6),
               "train_acc": round(stats["train_acc"], 6), "val_loss": round(val_loss, 6),
               "val_acc": round(val_acc, 6), "lr": stats["lr"], "seconds": round(seconds, 3),
               "load": machine_load()}  # sampled once per epoch: the last minute's load average
        state.history.append(row)
        meta = weights_meta(cfg, td, epoch + 1)
        improved = val_acc > state.best["val_acc"]
        if improved:
            state.best = {"val_acc": val_acc, "epoch": epoch + 1}
        if d.main:
            if improved:
                save_weights(out / "best.safetensors", weights_model(state), meta)
            save_weights(out / "last.safetensors", weights_model(state), meta)
            write_text(out / "history.csv", csv_text(HISTORY_FIELDS, state.history))
        save_checkpoint(state_path, state, epoch)
        log(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  acc {row['train_acc']:.4f}  "
            f"val_loss {val_loss:.4f}  val_acc {val_acc:.4f}  lr {stats['lr']:.2e}  {row['seconds']:.1f}s "
            f"(train {stats['train_seconds']:.1f}s, load {row['load']})")
        if on_epoch is not None:
            on_epoch(dict(row))
    return _write_summary(cfg, out, state, td, threads, device) if d.main else {}


def _write_summary(cfg: TrainConfig, out: Path, state: TrainState, td: TrainingData, threads: int,
                   device: torch.device) -> dict:
    secs = [h["seconds"] for h in state.history]
    summary = {
        "model": cfg.model,
        "params_keras": count_params_keras(state.model),
        "params_trainable": count_params_trainable(state.model),
        "epochs": len(state.history),
        "first_epoch_seconds": secs[0] if secs else None,
        "mean_epoch_seconds": round(float(np.mean(secs)), 3) if secs else None,
        "total_seconds": round(float(np.sum(secs)), 3),
        "best_epoch": state.best["epoch"],
        "best_val_acc": state.best["val_acc"],
        "final_val_acc": state.history[-1]["val_acc"] if state.history else None,
        "threads": threads,
        "processes": state.dist.world,
        "device": device_name(device),
        "machine": cpu_name(),  # the CPU: epoch seconds mean little without it
        "train_images": len(td.y_train),
        "train_class_counts": torch.bincount(td.y_train.cpu(), minlength=len(td.class_names)).tolist(),
        "class_names": td.class_names,  # predict cross-checks a weights file's classes against these
        "init_from": state.init_from,  # what --init-from loaded and which tensors kept their initialisation
        "distillation": distill_summary(cfg),  # --teacher, alpha and temperature (None without a teacher)
    }
    metrics_path = out / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    metrics["training"] = summary
    write_json(metrics_path, metrics)
    return summary
