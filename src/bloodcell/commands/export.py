"""``bloodcell export``: a trained run -> a bundle folder that runs with ONNX Runtime, without PyTorch."""

from __future__ import annotations

import argparse
import sys

from bloodcell.commands.common import add_checkpoint_arg, positive_int


def cmd_export(a: argparse.Namespace) -> int:
    from bloodcell.deploy import MAX_INT8_LOSS, export_bundle

    command = " ".join(["bloodcell", *sys.argv[1:]]) if sys.argv[1:2] == ["export"] else None
    b = export_bundle(a.run_dir, a.out, checkpoint=a.checkpoint, int8=a.int8,
                      calibration_images=a.calibration_images, force=a.force, data_dir=a.data_dir,
                      command=command, log=lambda s: print(s, file=sys.stderr))
    files = ", ".join(e["file"] for e in b["models"].values())
    m = b.get("test_metrics")
    acc = f"; test accuracy {m['accuracy']:.4f}" if m else ""
    print(f"wrote {a.out}: {files}, bundle.json, MODEL_CARD.md{acc}")
    if b.get("int8_refused"):
        from bloodcell.io import warn

        warn(f"{b['int8_refused']} (the limit is {100 * MAX_INT8_LOSS:.1f} points)")
        return 1
    return 0


def add_commands(sub) -> None:
    ex = sub.add_parser(
        "export", help="export a run to an ONNX bundle that runs without PyTorch",
        description="Write BUNDLE_DIR with model.onnx (fp32, dynamic batch), bundle.json (classes, recipe, "
        "normalisation, test metrics, parity, SHA-256 of every file) and MODEL_CARD.md. Parity with PyTorch is "
        "checked on the run's whole test split (top-1 agreement must be 100%%). With --int8 also model.int8.onnx: "
        "static QDQ quantization with ONNX Runtime, calibrated on training images; if quantizing everything loses "
        "more than 0.3 points on the validation split, the attention blocks (then also the head and first conv) "
        "stay in fp32. It is not written if it loses more than 0.3 points of test accuracy, unless --force (exit "
        "status 1 when refused). Run the bundle with 'bloodcell predict BUNDLE_DIR IMAGES...' or "
        "bloodcell.runtime.load(BUNDLE_DIR).")
    ex.add_argument("run_dir", help="a run folder made by 'bloodcell train'")
    ex.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="folder to write (new, empty or an older "
                    "bundle, which is replaced)")
    add_checkpoint_arg(ex, "export")
    ex.add_argument("--int8", action="store_true", help="also write a static-int8 model (faster on most CPUs)")
    ex.add_argument("--calibration-images", type=positive_int, default=1024, metavar="N",
                    help="training images (stratified) that calibrate the int8 ranges (default: %(default)s)")
    ex.add_argument("--force", action="store_true",
                    help="write the int8 model even if it loses more than 0.3 points of test accuracy")
    ex.add_argument("--data-dir", default=None,
                    help="folder of prepared datasets (default: the run's, else $BLOODCELL_DATA_DIR or the cache)")
    ex.set_defaults(func=cmd_export)
