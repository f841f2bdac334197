"""Training and inference throughput of every registered model at 64x64 on this machine's CPU.

For each model: images/s of a training step (batch 64: forward, cross-entropy, backward, optimizer step) and of
inference (batch 256, eval mode), in fp32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``; models and
inputs in channels_last, as the training loop uses them. A few warm-up steps are not timed.

Usage (from the project root):
    python benchmarks/model_throughput.py                        # all models -> benchmarks/results/
    python benchmarks/model_throughput.py --models se-cnn,vgg --steps 2 --out /tmp/bench
    python benchmarks/model_throughput.py --precisions fp32   # skip bf16 (slow on CPUs without bf16 units)

Writes model_throughput.md and model_throughput.json into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bloodcell.errors import BloodcellError
from bloodcell.io import write_text
from bloodcell.machine import cpu_name
from bloodcell.models import count_params_keras, create_model, get_spec, list_models

ROOT = Path(__file__).resolve().parent
SIZE, TRAIN_BATCH, INFER_BATCH = 64, 64, 256
PRECISIONS = ("fp32", "bf16")


def precision_context(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = get_spec(name).optimizer
    return torch.optim.SGD(params, lr=1e-3) if optimizer == "sgd" else torch.optim.Adam(params, lr=1e-3)


def train_throughput(name: str, precision: str, steps: int, warmup: int,
                     channels_last: bool = True, compile: bool = False) -> float:
    """Images per second of full training steps (warm-up, which includes any compilation, is not timed)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(name, input_size=SIZE).to(memory_format=fmt).train()
    opt = make_optimizer(name, model)
    forward = torch.compile(model) if compile else model
    x = torch.rand(TRAIN_BATCH, 3, SIZE, SIZE).contiguous(memory_format=fmt)
    y = torch.randint(0, 8, (TRAIN_BATCH,))

    def step() -> None:
        with precision_context(precision):
            loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * TRAIN_BATCH / (time.perf_counter() - t0)


@torch.inference_mode()
def inference_throughput(name: str, precision: str, steps: int, warmup: int) -> float:
    """Images per second of eval-mode forward passes."""
    torch.manual_seed(0)
    model = create_model(name, input_size=SIZE).to(memory_format=torch.channels_last).eval()
    x = torch.rand(INFER_BATCH, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):
        with precision_context(precision):
            model(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        with precision_context(precision):
            model(x)
    return steps * INFER_BATCH / (time.perf_counter() - t0)


def measure(name: str, steps: int, warmup: int, precisions: tuple[str, ...] = PRECISIONS) -> dict:
    row = {"model": name, "params_keras": count_params_keras(create_model(name, input_size=SIZE))}
    for precision in precisions:
        row[f"train_{precision}"] = round(train_throughput(name, precision, steps, warmup), 1)
        row[f"infer_{precision}"] = round(inference_throughput(name, precision, steps, warmup), 1)
    return row


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def to_markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# Model throughput at 64x64 (CPU)",
        "",
        f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}; {env['steps']} timed steps after "
        f"{env['warmup']} warm-up; training batch {TRAIN_BATCH} (forward + backward + optimizer step, the paper's "
        f"optimizer), inference batch {INFER_BATCH}; channels_last; bf16 = torch.autocast('cpu', bfloat16).",
        "Images per second, higher is better.",
        "",
        "| model | params (Keras) | train fp32 | train bf16 | infer fp32 | infer bf16 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [fmt(r.get(k)) for k in ("train_fp32", "train_bf16", "infer_fp32", "infer_bf16")]
        lines.append(f"| {r['model']} | {r['params_keras']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated model names (default: every registered model)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default: 2)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16 or both (default: fp32,bf16)")
    p.add_argument("--out", default=str(ROOT / "results"), help="folder for the .md and .json results")
    a = p.parse_args(argv)
    names = a.models.split(",") if a.models else [s.name for s in list_models()]
    precisions = tuple(a.precisions.split(","))
    if not set(precisions) <= set(PRECISIONS):
        p.error(f"--precisions must be among {', '.join(PRECISIONS)}")
    for name in names:
        try:
            get_spec(name)  # unknown names fail before any timing
        except BloodcellError as e:
            p.error(str(e))
    if a.threads:
        torch.set_num_threads(a.threads)
    env = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "steps": a.steps, "warmup": a.warmup, "precisions": list(precisions)}
    rows = []
    for name in names:
        rows.append(measure(name, a.steps, a.warmup, precisions))
        r = rows[-1]
        print(f"{name:16s} train {fmt(r.get('train_fp32')):>8} / {fmt(r.get('train_bf16')):>8} img/s   "
              f"infer {fmt(r.get('infer_fp32')):>8} / {fmt(r.get('infer_bf16')):>8} img/s  (fp32 / bf16)", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "model_throughput.json", json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    write_text(out / "model_throughput.md", to_markdown(rows, env))
    print(f"wrote {out / 'model_throughput.md'} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
