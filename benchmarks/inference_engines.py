"""Inference speed and accuracy of one trained model through each engine, in one run with alternating rounds.

Engines: PyTorch eager fp32 (what ``bloodcell evaluate --speed`` measures: channels_last, inference mode), PyTorch
eager under bf16 autocast (only where the CPU has AVX-512 BF16 or AMX; ONNX Runtime's CPU provider has no bf16
convolutions), ONNX Runtime fp32 and ONNX Runtime int8 from a bundle written by ``bloodcell export --int8``.
Per round, every engine runs once, the order rotating from round to round: batch 256 (images/s over
``--batches`` batches) and batch 1 (median ms over ``--singles`` images). Best and median over the rounds are
reported, with each engine's accuracy on the whole test split, the files' sizes and the CPU flags that matter.

Then ``bloodcell predict``'s path over folders of the run's test JPEGs, as they are here (lossless crops of the PBC
originals) and rebuilt at the originals' full size (``--full-size``, see ``rebuild_full_size``): the runtime's
``predict_files`` end to end, decoding alone with the same threads, decoding in one thread, and the model alone on
the decoded images, so one can see what limits it.

Usage (from the project root; the run's dataset prepared, the original images present):
    BLOODCELL_DATA_DIR=/tmp/bcdata python benchmarks/inference_engines.py --run runs/se-cnn-pbc
    python benchmarks/inference_engines.py --run RUN --bundle B --rounds 2 --folder-images 200 --out /tmp/e

Writes inference_engines.md and inference_engines.json into --out (default benchmarks/results/deploy/).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, JpegImagePlugin

from bloodcell.data.store import load_dataset
from bloodcell.deploy import export_bundle
from bloodcell.inference import Classifier
from bloodcell.io import markdown_table, write_json, write_text
from bloodcell.machine import cpu_name, machine_load
from bloodcell.runtime import load
from bloodcell.runtime.bundle import read_bundle
from bloodcell.runtime.predictor import normalize_nchw, preprocess_file
from bloodcell.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "deploy"
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
TARGETS = {"onnx_fp32_vs_torch_b256": 2.5, "onnx_fp32_b1_ms": 1.0, "int8_vs_onnx_fp32_b256": 1.3,
           "int8_max_loss_points": 0.3}


def cpu_flags() -> dict[str, bool]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {f: False for f in FLAGS}
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return {f: f in have for f in FLAGS}


class TorchEngine:
    def __init__(self, clf: Classifier, bf16: bool = False):
        self.model, self.bf16 = clf.model.eval(), bf16

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            return self.model(t).float().numpy()


class OrtEngine:
    def __init__(self, bundle: Path, precision: str, threads: int):
        self.p = load(bundle, precision=precision, threads=threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.p.session.run(None, {"images": x})[0]


def time_engine(fn, big: np.ndarray, batches: int, singles: np.ndarray) -> tuple[float, float]:
    """(images/s at the batch of ``big`` over ``batches`` runs, median ms of single images), after a warm-up."""
    fn(big)
    fn(singles[:1])
    t0 = time.perf_counter()
    for _ in range(batches):
        fn(big)
    ips = batches * len(big) / (time.perf_counter() - t0)
    lat = []
    for i in range(len(singles)):
        s = time.perf_counter()
        fn(singles[i : i + 1])
        lat.append(time.perf_counter() - s)
    return ips, 1000 * statistics.median(lat)


def accuracy(fn, images: np.ndarray, labels: np.ndarray, norm: dict | None) -> float:
    pred = np.concatenate([fn(normalize_nchw(images[i : i + 256], norm)).argmax(1) for i in range(0, len(images), 256)])
    return float((pred == labels).mean())


def rebuild_full_size(files: list[Path], dest: Path, width: int, height: int) -> list[Path]:
    """Copies of ``files`` at the PBC originals' size, for the predict study: each image centred on a
    ``width`` x ``height`` canvas, the margin filled by mirroring the image (the slide's own texture, not a flat
    colour that would decode faster than a real margin), saved as JPEG with the source's quantization tables and
    chroma subsampling. The files here are lossless crops of the originals (README of ../shared/data), so this
    restores the originals' pixel count and JPEG settings, not their exact margins; mirrored content compresses
    about as well as the real one, so decoding costs about what the originals cost."""
    out = []
    for f in files:
        with Image.open(f) as im:
            arr = np.asarray(im.convert("RGB"))
            qtables, sampling = getattr(im, "quantization", None), JpegImagePlugin.get_sampling(im)
        h, w = arr.shape[:2]
        top, left = max(0, (height - h) // 2), max(0, (width - w) // 2)
        padded = np.pad(arr, ((top, max(0, height - h - top)), (left, max(0, width - w - left)), (0, 0)),
                        mode="symmetric")
        path = dest / f"{f.parent.name}_{f.stem}.jpg"
        kw = {"qtables": qtables, "subsampling": sampling} if qtables and sampling >= 0 else {"quality": 75}
        Image.fromarray(padded).save(path, "JPEG", **kw)
        out.append(path)
    return out


def describe_sizes(files: list[Path]) -> str:
    """The files' most common size and their mean file size, e.g. '216x219 px, 9.6 kB'."""
    sizes = Counter()
    for f in files:
        with Image.open(f) as im:
            sizes[im.size] += 1
    (w, h), _ = sizes.most_common(1)[0]
    return f"{w}x{h} px, {statistics.mean(f.stat().st_size for f in files) / 1e3:.1f} kB"


def folder_study(bundle: Path, files: list[Path], threads: int, precision: str, repeats: int) -> dict:
    """predict_files end to end, decoding alone (threads, one thread) and the model alone: wall time (best of
    ``repeats``) and the process's CPU time (all threads), so one sees which part uses the cores."""
    pred = load(bundle, precision=precision, threads=threads, spinning=False)  # as bloodcell predict loads it

    def measure(fn) -> tuple[float, float]:
        fn()  # warm-up (file cache, the model's shapes)
        best = (float("inf"), float("inf"))
        for _ in range(repeats):
            w, c = time.perf_counter(), time.process_time()
            fn()
            best = min(best, (time.perf_counter() - w, time.process_time() - c))
        return best

    def decode_threads() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda f: preprocess_file(f, pred.recipe), files))

    arrays = np.stack([preprocess_file(f, pred.recipe)[0] for f in files])
    parts = {"predict_files": lambda: pred.predict_files(files),
             "decode_threads": decode_threads,
             "decode_one_thread": lambda: [preprocess_file(f, pred.recipe) for f in files],
             "model_only": lambda: pred.predict_arrays(arrays, batch_size=256)}
    n = len(files)
    out = {"files": n, "threads": threads, "precision": precision}
    for name, fn in parts.items():
        wall, cpu = measure(fn)
        out[f"{name}_images_per_s"] = n / wall
        out[f"{name}_cpu_ms_per_image"] = 1000 * cpu / n
    out["model_share_of_cpu"] = out["model_only_cpu_ms_per_image"] / (
        out["model_only_cpu_ms_per_image"] + out["decode_threads_cpu_ms_per_image"])
    return out


def cli_seconds(bundle: Path, folder: Path) -> float:
    """Wall seconds of ``python -m bloodcell predict BUNDLE FOLDER`` (process start included)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bloodcell", "predict", str(bundle), str(folder)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def full_size(text: str) -> tuple[int, int] | None:
    """``WxH`` as (W, H), or None for '0'."""
    if text.strip() == "0":
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH such as 360x363 (or 0), got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"expected a positive WxH, got {text!r}")
    return w, h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--checkpoint", default="best")
    ap.add_argument("--bundle", default=None, help="an exported bundle with int8 (default: export one to a temp dir)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=4, help="batches of 256 timed per round (default 4)")
    ap.add_argument("--singles", type=int, default=200, help="single images timed per round (default 200)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--folder-images", type=int, default=1000, help="test JPEGs for the predict study")
    ap.add_argument("--full-size", type=full_size, default=(360, 363), metavar="WxH",
                    help="also study the JPEGs rebuilt at this size, the PBC originals' (default: 360x363; 0 skips)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    run = Path(a.run)
    cfg = TrainConfig.load(run / "config.json")
    clf = Classifier.from_run(run, a.checkpoint, device="cpu")
    data = load_dataset(cfg.data, cfg.size, cfg.data_dir)
    norm = clf.normalization
    test_x = np.ascontiguousarray(data.images["test"].transpose(0, 3, 1, 2))
    test_y = np.asarray(data.labels["test"])
    tmp = tempfile.TemporaryDirectory(prefix="bloodcell-engines-")
    bundle = Path(a.bundle) if a.bundle else Path(tmp.name) / "bundle"
    if not (bundle / "bundle.json").is_file():
        export_bundle(run, bundle, checkpoint=a.checkpoint, int8=True, log=lambda s: print(s, file=sys.stderr))
    b = read_bundle(bundle)
    flags = cpu_flags()

    engines = {"PyTorch eager fp32": TorchEngine(clf)}
    if flags["avx512_bf16"] or flags["amx_bf16"]:
        engines["PyTorch eager bf16 (autocast)"] = TorchEngine(clf, bf16=True)
    engines["ONNX Runtime fp32"] = OrtEngine(bundle, "fp32", a.threads)
    if "int8" in b["models"]:
        engines["ONNX Runtime int8"] = OrtEngine(bundle, "int8", a.threads)
    rng = np.random.default_rng(0)
    big = normalize_nchw(test_x[rng.choice(len(test_x), 256, replace=len(test_x) < 256)], norm)
    singles = normalize_nchw(test_x[rng.choice(len(test_x), a.singles, replace=len(test_x) < a.singles)], norm)
    acc = {name: accuracy(fn, test_x, test_y, norm) for name, fn in engines.items()}
    load_before = machine_load()
    names = list(engines)
    per = {n: {"b256": [], "b1_ms": []} for n in names}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            ips, ms = time_engine(engines[n], big, a.batches, singles)
            per[n]["b256"].append(ips)
            per[n]["b1_ms"].append(ms)
        print(f"round {r + 1}: " + ", ".join(f"{n} {per[n]['b256'][-1]:.0f}/s {per[n]['b1_ms'][-1]:.2f} ms"
                                             for n in names), file=sys.stderr, flush=True)
    load_after = machine_load()
    sizes = {"PyTorch eager fp32": clf.source.stat().st_size, "ONNX Runtime fp32": b["models"]["fp32"]["bytes"]}
    sizes["PyTorch eager bf16 (autocast)"] = sizes["PyTorch eager fp32"]
    if "int8" in b["models"]:
        sizes["ONNX Runtime int8"] = b["models"]["int8"]["bytes"]
    bundle_bytes = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file())
    results = {n: {"b256_best": max(per[n]["b256"]), "b256_median": statistics.median(per[n]["b256"]),
                   "b1_ms_best": min(per[n]["b1_ms"]), "b1_ms_median": statistics.median(per[n]["b1_ms"]),
                   "rounds_b256": per[n]["b256"], "rounds_b1_ms": per[n]["b1_ms"], "test_accuracy": acc[n],
                   "model_bytes": sizes[n]} for n in names}

    # the predict path over folders of JPEGs: the files here (lossless ~216x219 crops of the PBC originals) and
    # copies rebuilt at the originals' size (the issue's "full-size JPEGs"; the originals are not here)
    src = Path((data.meta.get("source") or {}).get("path", ""))
    paths = [src / p for p in (data.meta.get("paths") or {}).get("test", [])][: a.folder_images]
    folders = []
    if paths and all(p.is_file() for p in paths[:5]):
        sets = [("files here", False, paths)]
        if a.full_size:
            width, height = a.full_size
            sets.append((f"full-size ({width}x{height}, rebuilt)", True,
                         rebuild_full_size(paths, Path(tmp.name), width, height)))
        for label, is_full_size, files in sets:
            described = describe_sizes(files)
            for precision in sorted(b["models"]):
                folders.append({"set": label, "full_size": is_full_size, "described": described,
                                **folder_study(bundle, files, a.threads, precision, repeats=3)})
        with tempfile.TemporaryDirectory(prefix="bloodcell-jpegs-") as d:
            for p in sets[-1][2]:
                os.symlink(p, Path(d) / p.name)
            folders[0]["cli_set"] = sets[-1][0]
            folders[0]["cli_seconds"] = cli_seconds(bundle, Path(d))
            folders[0]["cli_images_per_s"] = len(paths) / folders[0]["cli_seconds"]

    t = results["PyTorch eager fp32"]
    o = results["ONNX Runtime fp32"]
    q = results.get("ONNX Runtime int8")
    checks = [("ONNX fp32 >= 2.5x PyTorch eager at batch 256 (median)", o["b256_median"] / t["b256_median"],
               o["b256_median"] / t["b256_median"] >= TARGETS["onnx_fp32_vs_torch_b256"], "x"),
              ("ONNX fp32 <= 1 ms at batch 1 (median)", o["b1_ms_median"],
               o["b1_ms_median"] <= TARGETS["onnx_fp32_b1_ms"], " ms")]
    if q:
        loss = 100 * (o["test_accuracy"] - q["test_accuracy"])
        checks += [("int8 >= 1.3x ONNX fp32 at batch 256 (median)", q["b256_median"] / o["b256_median"],
                    q["b256_median"] / o["b256_median"] >= TARGETS["int8_vs_onnx_fp32_b256"], "x"),
                   ("int8 loses <= 0.3 points of test accuracy", loss, loss <= TARGETS["int8_max_loss_points"],
                    " points")]
    full = [f for f in folders if f["full_size"]] or folders  # the target is over full-size JPEGs
    for f in full:
        checks.append((f"predict over {f['set']} JPEGs ({f['precision']} model) limited by decoding: the model's "
                       "share of the CPU time (model + decoding) below half", f["model_share_of_cpu"],
                       f["model_share_of_cpu"] < 0.5, ""))
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": a.threads, "flags": flags,
               "load_before": load_before, "load_after": load_after, "torch": torch.__version__,
               "onnxruntime": __import__("onnxruntime").__version__}
    cmd = "python benchmarks/inference_engines.py " + " ".join(argv if argv is not None else sys.argv[1:])
    flag_text = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items())
    rows = [[n, f"{r['b256_best']:.0f}", f"{r['b256_median']:.0f}", f"{r['b1_ms_best']:.3f}",
             f"{r['b1_ms_median']:.3f}", f"{r['test_accuracy']:.4f}", f"{r['model_bytes'] / 1e6:.2f}"]
            for n, r in results.items()]
    size = f"{clf.input_size}x{clf.input_size}"
    md = [f"# Inference engines: {cfg.model} ({run.name}, {a.checkpoint} checkpoint, {size})",
          "", f"Written by `{cmd}` on {machine['cpu']} ({machine['cores']} cores, {a.threads} threads; load average "
          f"{load_before} before, {load_after} after), torch {machine['torch']}, ONNX Runtime "
          f"{machine['onnxruntime']}.", "", f"CPU flags: {flag_text}.", "",
          f"{a.rounds} alternating rounds; per round and engine: {a.batches} batches of 256 and {a.singles} single "
          f"images (median). Accuracy on the whole test split ({len(test_y)} images). Bundle on disk: "
          f"{bundle_bytes / 1e6:.2f} MB (all files).", "",
          markdown_table(["engine", "batch 256 best (images/s)", "batch 256 median", "batch 1 best (ms)",
                          "batch 1 median (ms)", "test accuracy", "model file MB"], rows), ""]
    if "PyTorch eager bf16 (autocast)" not in results:
        md += ["bf16: not measured, the CPU has neither AVX-512 BF16 nor AMX.", ""]
    if folders:
        md += [f"`bloodcell predict` over {folders[0]['files']} PBC JPEGs of the test split, {a.threads} threads, "
               "best of 3 after a warm-up; CPU time is the process's, all threads. 'files here' are the JPEGs of "
               "../shared/data/pbc, lossless crops of the originals with about 36% of their pixels; 'full-size' "
               "are those files rebuilt at the originals' size (each centred, its margin mirrored, saved with "
               "the source's JPEG quantization tables and subsampling), since the originals are not here:", "",
               markdown_table(["JPEGs", "model", "predict_files (images/s)", "decoding alone, threads (images/s)",
                               "decoding alone, 1 thread", "model alone (images/s)", "CPU ms per image: decoding",
                               "CPU ms per image: model", "model's share of the CPU"],
                              [[f"{f['set']}: {f['described']}", f["precision"],
                                f"{f['predict_files_images_per_s']:.0f}",
                                f"{f['decode_threads_images_per_s']:.0f}", f"{f['decode_one_thread_images_per_s']:.0f}",
                                f"{f['model_only_images_per_s']:.0f}", f"{f['decode_threads_cpu_ms_per_image']:.2f}",
                                f"{f['model_only_cpu_ms_per_image']:.2f}", f"{100 * f['model_share_of_cpu']:.0f}%"]
                               for f in folders]), "",
               f"The whole command (`python -m bloodcell predict BUNDLE FOLDER`, fp32, process start included, "
               f"{folders[0]['cli_set']} JPEGs) took {folders[0]['cli_seconds']:.2f} s for {folders[0]['files']} "
               f"files ({folders[0]['cli_images_per_s']:.0f} images/s).", ""]
    md += ["## Targets", "", markdown_table(["target", "measured", "met"],
                                            [[c, f"{v:.3g}{unit}", "yes" if ok else "**no**"]
                                             for c, v, ok, unit in checks]), ""]
    out = Path(a.out)
    write_text(out / "inference_engines.md", "\n".join(md))
    write_json(out / "inference_engines.json", {"command": cmd, "machine": machine, "bundle_bytes": bundle_bytes,
                                                "quantization": b.get("quantization"), "results": results,
                                                "folder": folders, "targets": [
                                                    {"target": c, "measured": v, "met": ok}
                                                    for c, v, ok, _ in checks]})
    print("\n".join(md))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
