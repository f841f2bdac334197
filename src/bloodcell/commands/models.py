"""``bloodcell models``: the registry with parameter counts and FLOPs."""

from __future__ import annotations

import argparse
import json

from bloodcell.commands.common import text_table


def measure(spec) -> dict:
    """Parameter counts and forward MFLOPs at 64 px; counts are None when the model cannot be built here (e.g.
    an optional library is missing), so the listing still shows every model."""
    from bloodcell.errors import BloodcellError
    from bloodcell.models import count_params_keras, count_params_trainable, create_model
    from bloodcell.models.flops import forward_mflops

    try:
        m = create_model(spec.name, input_size=64).eval()
    except BloodcellError as e:
        return {"params_keras": None, "params_trainable": None, "mflops_64": None, "unavailable": str(e)}
    return {"params_keras": count_params_keras(m), "params_trainable": count_params_trainable(m),
            "mflops_64": forward_mflops(m, 64)}  # FLOPs = 2 x multiply-adds


def cmd_models(a: argparse.Namespace) -> int:
    import re

    from bloodcell.models import list_models

    def natural(spec) -> list:  # cnn-t2-2 before cnn-t2-10
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", spec.name)]

    rows = []
    for spec in sorted(list_models(), key=natural):
        rows.append({"name": spec.name, "family": spec.family, **measure(spec),
                     "optimizer": spec.optimizer,
                     "input_sizes": list(spec.input_sizes) if spec.input_sizes else None,
                     "pretrained": spec.pretrained,
                     "description": spec.description})
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0

    def num(v, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    header = ["name", "family", "params (Keras)", "trainable", "MFLOPs@64", "optimizer", "description"]
    print(text_table(header, [[r["name"], r["family"], num(r["params_keras"], ","), num(r["params_trainable"], ","),
                               num(r["mflops_64"], ",.1f"), r["optimizer"],
                               r["description"] + (f" [{r['unavailable']}]" if "unavailable" in r else "")]
                              for r in rows]))
    print("MFLOPs: forward pass of one 64x64 image, counted by torch FlopCounterMode (1 multiply-add = 2 FLOPs).")
    print("--pretrained (library ImageNet weights): " + ", ".join(r["name"] for r in rows if r["pretrained"]))
    return 0


def add_commands(sub) -> None:
    mo = sub.add_parser("models", help="list the registered models with parameter counts",
                        description="Every registered model with its family, parameter counts (as Keras counts "
                                    "them, BatchNorm moving statistics included, and trainable), forward MFLOPs "
                                    "for one 64x64 image, the paper's optimizer for it, and a description.")
    mo.add_argument("--json", action="store_true", help="print JSON for scripts")
    mo.set_defaults(func=cmd_models)
