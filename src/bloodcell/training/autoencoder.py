"""Stage 1 of the AutoClassifier: train its encoder as part of an autoencoder on MSE reconstruction.

Called by the training loop before the classifier epochs when the model has ``needs_pretraining``. Writes
``history_autoencoder.csv`` and ``autoencoder_reconstructions.png`` (validation originals above their
reconstructions) into the run folder, then freezes the encoder for stage 2.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from bloodcell.data.tensors import Normalizer
from bloodcell.io import csv_text, write_text
from bloodcell.training.checkpoint import load_state_file, restore_training_state, rng_state, save_state
from bloodcell.training.config import TrainConfig

AE_HISTORY_FIELDS = ["epoch", "train_mse", "val_mse", "seconds"]
PRETRAIN_STATE = "pretrain_state.pt"


@torch.inference_mode()
def reconstruction_mse(autoencoder: nn.Module, images: torch.Tensor, norm: Normalizer, batch_size: int = 256) -> float:
    autoencoder.eval()
    total = torch.zeros((), device=images.device)
    for i in range(0, len(images), batch_size):
        xb = images[i : i + batch_size]
        total += F.mse_loss(autoencoder(norm(xb)), xb.float() / 255, reduction="sum")
    return float(total) / max(1, images.numel())


@torch.inference_mode()
def save_reconstructions(autoencoder: nn.Module, images: torch.Tensor, norm: Normalizer, path: Path,
                         n: int = 8) -> None:
    """A PNG grid: the first ``n`` images on top, their reconstructions below."""
    autoencoder.eval()
    xb = images[:n]
    rec = (autoencoder(norm(xb)).clamp(0, 1) * 255).round().to(torch.uint8)
    rows = [torch.cat(list(t.permute(0, 2, 3, 1).cpu()), dim=1) for t in (xb, rec)]
    Image.fromarray(np.ascontiguousarray(torch.cat(rows, dim=0).numpy())).save(path)


def pretrain(model: nn.Module, x_train: torch.Tensor, x_val: torch.Tensor, norm: Normalizer, cfg: TrainConfig,
             out: Path, gen: torch.Generator, log: Callable[[str], None] = print) -> list[dict]:
    """Train ``model.make_autoencoder()`` (Adam, ``cfg.lr``) on MSE to pixels in [0, 1]; freeze the encoder after.

    Resumable like the classifier stage: each epoch's state goes to ``pretrain_state.pt`` (kept, so a run stopped
    before its first classifier epoch does not pre-train again), and an interrupted run continues from it.
    """
    autoencoder = model.make_autoencoder().to(x_train.device, memory_format=torch.channels_last)
    model.freeze_encoder(False)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=cfg.lr)
    epochs = getattr(model, "pretrain_epochs", None) or cfg.epochs
    n, bs, history, start = len(x_train), cfg.batch_size, [], 0
    state_path = out / PRETRAIN_STATE
    if state_path.is_file():
        st = load_state_file(state_path, ("autoencoder", "optimizer", "generator", "torch_rng", "history", "epoch"))
        restore_training_state({**st, "model": st["autoencoder"]}, state_path, autoencoder, optimizer, gen)
        history, start = [dict(h) for h in st["history"]], st["epoch"] + 1
        log(f"resuming the autoencoder stage after epoch {start} of {epochs}")
    for epoch in range(start, epochs):
        autoencoder.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(x_train.device)
        loss_sum = torch.zeros((), device=x_train.device)  # on the device: no host sync per batch
        for i in range(0, n, bs):
            xb = x_train[perm[i : i + bs]]
            loss = F.mse_loss(autoencoder(norm(xb)), xb.float() / 255)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(xb)
        val_mse = reconstruction_mse(autoencoder, x_val, norm)
        row = {"epoch": epoch + 1, "train_mse": round(float(loss_sum) / n, 6), "val_mse": round(val_mse, 6),
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        write_text(out / "history_autoencoder.csv", csv_text(AE_HISTORY_FIELDS, history))
        save_state(state_path, {"autoencoder": {k: v.detach().cpu() for k, v in autoencoder.state_dict().items()},
                                "optimizer": optimizer.state_dict(), "generator": gen.get_state(), **rng_state(),
                                "history": history, "epoch": epoch})
        log(f"autoencoder {epoch + 1:>3}/{epochs}  mse {row['train_mse']:.5f}  val_mse {val_mse:.5f}  "
            f"{row['seconds']:.1f}s")
    save_reconstructions(autoencoder, x_val, norm, out / "autoencoder_reconstructions.png")
    model.freeze_encoder(True)
    return history
