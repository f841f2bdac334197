"""Which execution options speed up training on this CPU: memory layout and torch.compile, per model.

Planning the paper suites' CPU hours needs the real training throughput of the expensive models, measured with
nothing else running. This times full training steps (batch 64, the paper's optimizer) of each model in eager
mode with channels_last (what ``bloodcell train`` uses), eager NCHW, and ``torch.compile`` (inductor) with
channels_last; it also reports whether the CPU has AVX-512 and which kernels torch dispatches to. The bf16
autocast comparison is in ``model_throughput.py --precisions fp32,bf16``.

Usage (from the project root; stop background training first, it shares the cores):
    python benchmarks/speed_options.py --models cnn,inception,resnet34,se-vgg15
    python benchmarks/speed_options.py --models se-cnn --options eager-cl,eager-nchw --steps 2 --out /tmp/x

Writes speed_options.md and speed_options.json into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from model_throughput import TRAIN_BATCH, train_throughput

from bloodcell.errors import BloodcellError
from bloodcell.io import markdown_table, write_text
from bloodcell.machine import cpu_name
from bloodcell.models import get_spec

ROOT = Path(__file__).resolve().parent
OPTIONS = {  # name -> (channels_last, compile)
    "eager-cl": (True, False),
    "eager-nchw": (False, False),
    "compile-cl": (True, True),
}


def cpu_flags() -> str:
    """AVX-512 / AMX flags the kernel reports: bf16 autocast only pays off with native bf16 units."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = sorted({f for f in text.split() if f.startswith(("avx512", "amx"))})
    return ", ".join(flags) or "no AVX-512 or AMX flags"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn,inception,resnet34,se-vgg15", help="comma-separated model names")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"among {', '.join(OPTIONS)} (default: all)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per measurement (default: 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps, compilation included (default: 2)")
    p.add_argument("--out", default=str(ROOT / "results"), help="folder for the .md and .json results")
    a = p.parse_args(argv)
    names, options = a.models.split(","), a.options.split(",")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        p.error(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    for name in names:
        try:
            get_spec(name)
        except BloodcellError as e:
            p.error(str(e))
    env = {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": a.steps, "warmup": a.warmup}
    rows = []
    for name in names:
        for option in options:
            channels_last, compile = OPTIONS[option]
            t0 = time.perf_counter()
            ips = train_throughput(name, "fp32", a.steps, a.warmup, channels_last, compile)
            total = time.perf_counter() - t0
            rows.append({"model": name, "option": option, "train_img_s": round(ips, 1),
                         "epoch_min_11959": round(11959 / ips / 60, 1), "wall_s": round(total, 1)})
            print(f"{name:12s} {option:11s} {ips:7.1f} img/s  (one 11,959-image epoch ~{rows[-1]['epoch_min_11959']} "
                  f"min; this measurement took {total:.0f} s)", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "speed_options.json", json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    table = markdown_table(["model", "option", "train images/s", "epoch minutes (11,959 images)", "wall s"],
                           [[r["model"], r["option"], f"{r['train_img_s']:.1f}", f"{r['epoch_min_11959']:.1f}",
                             f"{r['wall_s']:.0f}"] for r in rows])
    md = (f"# Training speed options (CPU)\n\n{env['cpu']} ({env['cpu_flags']}; torch dispatches "
          f"{env['torch_cpu_capability']} kernels), {env['threads']} threads, torch {env['torch']}; batch "
          f"{TRAIN_BATCH}, {a.steps} timed steps after {a.warmup} warm-up (wall s includes model build, warm-up "
          f"and compilation).\n\n{table}\n")
    write_text(out / "speed_options.md", md)
    print(f"wrote {out / 'speed_options.md'} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
