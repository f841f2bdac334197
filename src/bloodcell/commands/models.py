"""``bloodcell models``: the registry with parameter counts and FLOPs."""

from __future__ import annotations

import argparse
import json

from bloodcell.commands.common import text_table


def cmd_models(a: argparse.Namespace) -> int:
    import re

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bloodcell.models import count_params_keras, count_params_trainable, create_model, list_models

    def natural(spec) -> list:  # cnn-t2-2 before cnn-t2-10
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", spec.name)]

    rows = []
    for spec in sorted(list_models(), key=natural):
        m = create_model(spec.name, input_size=64).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            m(torch.zeros(1, 3, 64, 64))
        rows.append({"name": spec.name, "family": spec.family, "params_keras": count_params_keras(m),
                     "params_trainable": count_params_trainable(m),
                     "mflops_64": round(counter.get_total_flops() / 1e6, 1),  # FLOPs = 2 x multiply-adds
                     "optimizer": spec.optimizer,
                     "input_sizes": list(spec.input_sizes) if spec.input_sizes else None,
                     "description": spec.description})
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ["name", "family", "params (Keras)", "trainable", "MFLOPs@64", "optimizer", "description"]
    print(text_table(header, [[r["name"], r["family"], f"{r['params_keras']:,}", f"{r['params_trainable']:,}",
                               f"{r['mflops_64']:,.1f}", r["optimizer"], r["description"]] for r in rows]))
    print("MFLOPs: forward pass of one 64x64 image, counted by torch FlopCounterMode (1 multiply-add = 2 FLOPs).")
    return 0


def add_commands(sub) -> None:
    mo = sub.add_parser("models", help="list the registered models with parameter counts",
                        description="Every registered model with its family, parameter counts (as Keras counts "
                                    "them, BatchNorm moving statistics included, and trainable), forward MFLOPs "
                                    "for one 64x64 image, the paper's optimizer for it, and a description.")
    mo.add_argument("--json", action="store_true", help="print JSON for scripts")
    mo.set_defaults(func=cmd_models)
