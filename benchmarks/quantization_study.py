"""Which layers make static int8 quantization of a trained attention CNN lose accuracy, and what fixes it.

For one trained run: export fp32 ONNX, then quantize it with ONNX Runtime's static QDQ tools in many ways and
measure each variant's validation and test accuracy, its top-1 agreement with fp32 on the test split, its size and
its ONNX Runtime speed at batch 256. The variants are:

- the naive probe (everything quantized, MinMax, per-channel, int8 activations, 512 calibration images);
- everything quantized with each calibration method (MinMax, Entropy, Percentile) and uint8 activations;
- sensitivity: everything quantized except ONE node group kept in fp32 (attention pooling, attention MLPs, the
  sigmoid gates, the gate products, all attention, the classifier head, the first conv);
- the attention kept in fp32 with each calibration method, per-tensor instead of per-channel, with the head, and
  with the head and the first conv (the three steps of ``bloodcell.deploy.LADDER`` are marked).

Choices are made on the VALIDATION split (here: the fastest variant within 0.3 points of fp32 validation accuracy;
``bloodcell export --int8``: the first ladder step within 0.3 points); the test split only reports them, so the
choice does not fit the test set.

Usage (from the project root; the run's dataset must be prepared):
    BLOODCELL_DATA_DIR=/tmp/bcdata python benchmarks/quantization_study.py --run runs/se-cnn-pbc
    python benchmarks/quantization_study.py --run RUN --only naive,keep-attention --rounds 1 --out /tmp/q

Writes quantization.md and quantization.json into --out (default benchmarks/results/deploy/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bloodcell.data.store import load_dataset
from bloodcell.deploy.bundle import MAX_INT8_LOSS, ort_logits
from bloodcell.deploy.onnx_export import export_onnx
from bloodcell.deploy.quantize import LADDER, QuantConfig, calibration_indices, quantize
from bloodcell.inference import Classifier
from bloodcell.io import markdown_table, write_json, write_text
from bloodcell.machine import cpu_name, machine_load
from bloodcell.runtime.predictor import normalize_nchw
from bloodcell.training.config import TrainConfig

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "deploy"

# name -> (what it is, config, calibration images)
VARIANTS: dict[str, tuple[str, QuantConfig, int]] = {
    "naive": ("the probe: everything, MinMax, per-channel, int8 activations (S8S8), 512 images",
              QuantConfig("minmax", True, "int8", ()), 512),
    "all-minmax": ("everything, MinMax, uint8 activations (U8S8)", QuantConfig("minmax", True, "uint8", ()), 1024),
    "all-entropy": ("everything, Entropy", QuantConfig("entropy", True, "uint8", ()), 1024),
    "all-percentile": ("everything, Percentile 99.999", QuantConfig("percentile", True, "uint8", ()), 1024),
    "fp32-attention-pool": ("all but the attention's global avg/max pooling",
                            QuantConfig("minmax", True, "uint8", ("attention-pool",)), 1024),
    "fp32-attention-mlp": ("all but the attention MLPs", QuantConfig("minmax", True, "uint8", ("attention-mlp",)),
                           1024),
    "fp32-attention-gate": ("all but the attention's sum + sigmoid gates",
                            QuantConfig("minmax", True, "uint8", ("attention-gate",)), 1024),
    "fp32-attention-mul": ("all but the products feature map x gate",
                           QuantConfig("minmax", True, "uint8", ("attention-mul",)), 1024),
    "fp32-head": ("all but the classifier head", QuantConfig("minmax", True, "uint8", ("head",)), 1024),
    "fp32-first-conv": ("all but the first conv", QuantConfig("minmax", True, "uint8", ("first-conv",)), 1024),
    "keep-attention": ("attention blocks in fp32, MinMax", QuantConfig("minmax", True, "uint8", ("attention",)), 1024),
    "keep-attention-entropy": ("attention in fp32, Entropy", QuantConfig("entropy", True, "uint8", ("attention",)),
                               1024),
    "keep-attention-percentile": ("attention in fp32, Percentile 99.999",
                                  QuantConfig("percentile", True, "uint8", ("attention",)), 1024),
    "keep-attention-int8act": ("attention in fp32, MinMax, int8 activations (S8S8)",
                               QuantConfig("minmax", True, "int8", ("attention",)), 1024),
    "keep-attention-per-tensor": ("attention in fp32, MinMax, per-tensor weights",
                                  QuantConfig("minmax", False, "uint8", ("attention",)), 1024),
    "keep-attention-head": ("attention and head in fp32, MinMax",
                            QuantConfig("minmax", True, "uint8", ("attention", "head")), 1024),
    "keep-attention-head-first-conv": ("attention, head and first conv in fp32, MinMax",
                                       QuantConfig("minmax", True, "uint8", ("attention", "head", "first-conv")), 1024),
}


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def speeds(paths: dict[str, Path], x: np.ndarray, rounds: int, threads: int) -> dict[str, float]:
    """Median images/s at the batch of ``x`` per model, over ``rounds`` rounds in which every model runs once, the
    order rotating (so a burst of other work on the machine falls on all of them alike)."""
    sessions = {n: session(p, threads) for n, p in paths.items()}
    for s in sessions.values():
        s.run(None, {"images": x})  # warm-up
    names, times = list(sessions), {n: [] for n in sessions}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            sessions[n].run(None, {"images": x})
            times[n].append(time.perf_counter() - t0)
    return {n: len(x) / statistics.median(t) for n, t in times.items()}


def nchw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--checkpoint", default="best")
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument("--rounds", type=int, default=7, help="alternating speed rounds at batch 256 (default 7)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    names = a.only.split(",") if a.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")

    run = Path(a.run)
    cfg = TrainConfig.load(run / "config.json")
    clf = Classifier.from_run(run, a.checkpoint, device="cpu")
    data = load_dataset(cfg.data, cfg.size, cfg.data_dir)
    norm = clf.normalization
    val_x, val_y = nchw(data.images["val"]), np.asarray(data.labels["val"])
    test_x, test_y = nchw(data.images["test"]), np.asarray(data.labels["test"])
    train_y = np.asarray(data.labels["train"])
    rng = np.random.default_rng(0)
    bench_x = normalize_nchw(test_x[rng.choice(len(test_x), 256, replace=len(test_x) < 256)], norm)
    load_start = machine_load()

    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bloodcell-qstudy-") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx(clf.model, fp32, clf.input_size, name=cfg.model)
        v32 = ort_logits(fp32, val_x, norm).argmax(1)
        t32 = ort_logits(fp32, test_x, norm).argmax(1)
        acc = {"val": float((v32 == val_y).mean()), "test": float((t32 == test_y).mean())}
        results["fp32"] = {"val_accuracy": acc["val"], "test_accuracy": acc["test"], "bytes": fp32.stat().st_size}
        print(f"fp32: val {acc['val']:.4f} test {acc['test']:.4f}", flush=True)
        for name in names:
            what, qc, n_cal = VARIANTS[name]
            idx = calibration_indices(train_y, n_cal, 0)
            q = Path(tmp) / f"{name}.onnx"
            t0 = time.perf_counter()
            info = quantize(fp32, q, nchw(data.images["train"][idx]), norm, qc)
            secs = time.perf_counter() - t0
            v8 = ort_logits(q, val_x, norm).argmax(1)
            t8 = ort_logits(q, test_x, norm).argmax(1)
            r = {"what": what, "config": qc.to_dict(), "calibration_images": info["calibration_images"],
                 "nodes_kept_fp32": len(info["nodes_kept_fp32"]), "quantize_seconds": round(secs, 1),
                 "val_accuracy": float((v8 == val_y).mean()), "test_accuracy": float((t8 == test_y).mean()),
                 "test_agreement_with_fp32": float((t8 == t32).mean()), "bytes": q.stat().st_size}
            r["val_loss_points"] = 100 * (acc["val"] - r["val_accuracy"])
            r["test_loss_points"] = 100 * (acc["test"] - r["test_accuracy"])
            results[name] = r
            print(f"{name}: val {r['val_accuracy']:.4f} ({-r['val_loss_points']:+.2f}) test {r['test_accuracy']:.4f} "
                  f"({-r['test_loss_points']:+.2f}) agree {r['test_agreement_with_fp32']:.4f} [{secs:.0f}s]",
                  flush=True)
        load_before = machine_load()
        ips = speeds({"fp32": fp32, **{n: Path(tmp) / f"{n}.onnx" for n in names}}, bench_x, a.rounds, a.threads)
        for n, v in ips.items():
            results[n]["images_per_s_b256"] = v
            results[n]["speedup_vs_fp32"] = v / ips["fp32"]

    ok = [n for n in names if results[n]["val_loss_points"] <= 100 * MAX_INT8_LOSS + 1e-9]
    chosen = next((n for c in LADDER for n in ok if VARIANTS[n][1] == c), None)  # what export --int8 keeps
    for n in names:
        r = results[n]
        step = next((i + 1 for i, c in enumerate(LADDER) if c == VARIANTS[n][1]), None)
        tags = [t for t, on in (("chosen", n == chosen), (f"export ladder step {step}", step)) if on]
        rows.append([f"`{n}`" + (f" **({', '.join(tags)})**" if tags else ""), r["what"], r["calibration_images"],
                     f"{r['val_accuracy']:.4f} ({-r['val_loss_points']:+.2f})",
                     f"{r['test_accuracy']:.4f} ({-r['test_loss_points']:+.2f})",
                     f"{r['test_agreement_with_fp32']:.4f}", f"{r['bytes'] / 1e6:.2f}",
                     f"{r['images_per_s_b256']:.0f} ({r['speedup_vs_fp32']:.2f}x)"])
    f = results["fp32"]
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": a.threads, "load_before": load_start,
               "load_before_speed_rounds": load_before,
               "load_after": machine_load(), "onnxruntime": __import__("onnxruntime").__version__}
    cmd = "python benchmarks/quantization_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"# Static int8 quantization of {cfg.model} ({run.name}, {a.checkpoint} checkpoint)", "",
          f"Written by `{cmd}` on {machine['cpu']} ({machine['cores']} cores, {a.threads} threads; load average "
          f"{machine['load_before']} before, {machine['load_after']} after), ONNX Runtime {machine['onnxruntime']}.",
          "", f"fp32 ONNX: validation accuracy {f['val_accuracy']:.4f} ({len(val_y)} images), test accuracy "
          f"{f['test_accuracy']:.4f} ({len(test_y)} images), {f['bytes'] / 1e6:.2f} MB, "
          f"{f['images_per_s_b256']:.0f} images/s at batch 256.", "",
          "All variants: static QDQ, int8 weights, calibrated on a stratified subset of the training split. "
          "Accuracy columns give the change against fp32 in points; speed is the median of "
          f"{a.rounds} alternating rounds at batch 256 on 256 test images, every model once per round (load average "
          f"{load_before} before them; benchmarks/inference_engines.py measures the chosen one with batch 1 too).",
          "",
          markdown_table(["variant", "what", "calib. images", "val accuracy", "test accuracy",
                          "test top-1 agreement with fp32", "MB", "images/s (vs fp32)"], rows), "",
          (f"`bloodcell export --int8` tries the ladder steps in order and keeps the first within "
           f"{100 * MAX_INT8_LOSS:.1f} points of fp32 on the validation split: here `{chosen}`." if chosen else
           f"No ladder step stays within {100 * MAX_INT8_LOSS:.1f} points of fp32 validation accuracy."), ""]
    out = Path(a.out)
    write_text(out / "quantization.md", "\n".join(md))
    write_json(out / "quantization.json", {"command": cmd, "machine": machine, "run": str(run),
                                           "checkpoint": a.checkpoint, "chosen": chosen, "results": results})
    print(f"wrote {out / 'quantization.md'}")
    print(json.dumps({"chosen": chosen}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
