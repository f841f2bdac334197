"""``bloodcell export``: a run -> a bundle folder that runs without PyTorch.

The bundle holds ``model.onnx`` (fp32), optionally ``model.int8.onnx``, ``bundle.json`` (everything the runtime
needs, the parity and accuracy measured at export, the SHA-256 of every file) and ``MODEL_CARD.md``. It is built
in a temporary folder beside the target and moved into place whole, so an interrupted export leaves no half bundle.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bloodcell import __version__
from bloodcell.data.store import load_dataset
from bloodcell.deploy.card import model_card
from bloodcell.deploy.onnx_export import export_onnx, parity
from bloodcell.deploy.quantize import LADDER, QuantConfig, calibration_indices, quantize
from bloodcell.errors import BloodcellError
from bloodcell.evaluation.metrics import classification_metrics
from bloodcell.inference import Classifier
from bloodcell.inference.ensemble import config_file
from bloodcell.io import current_umask, write_json, write_text
from bloodcell.models import count_params_keras, count_params_trainable
from bloodcell.runtime.bundle import (
    BUNDLE_JSON,
    DIGEST_KEY,
    FORMAT,
    INPUT_NAME,
    MODEL_CARD,
    MODEL_FILES,
    OUTPUT_NAME,
    content_digest,
    file_sha256,
    is_bundle,
)
from bloodcell.runtime.predictor import normalize_nchw, softmax
from bloodcell.training.config import TrainConfig

MAX_INT8_LOSS = 0.003  # 0.3 points of test accuracy: an int8 model losing more is refused unless forced
CALIBRATION_SEED = 0
# What an ensemble graph's output is: the log of its combined probabilities, so softmax gives them back.
ENSEMBLE_PROBABILITIES = {
    "soft": "softmax(output) = the mean of the members' probabilities",
    "majority": "softmax(output) = (member votes + mean member probability) / (members + 1); its arg-max is the "
                "majority decision, ties broken by the mean probability"}


def ort_logits(path: str | Path, images: np.ndarray, normalization: dict | None, batch: int = 256,
               threads: int | None = None) -> np.ndarray:
    """Logits of uint8 NCHW ``images`` through an ONNX file (a plain session: the bundle is not written yet)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = [sess.run(None, {INPUT_NAME: normalize_nchw(images[i : i + batch], normalization)})[0]
           for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def run_temperature(clf: Classifier) -> float | None:
    """The temperature of the run's calibration (``bloodcell calibrate``, no test-time augmentation) when the
    Classifier found one fitted for these weights; None when uncalibrated."""
    if getattr(clf, "calibration", None) is None:
        return None
    t = float(clf.temperature)
    if not 0 < t < float("inf"):
        raise BloodcellError(f"{clf.source}: its calibration's temperature {t!r} is not a positive number")
    return t


def _check_out(out: Path, run: Path) -> None:
    if out.resolve() == run.resolve():
        raise BloodcellError(f"--out {out}: is the run folder itself; give a new folder for the bundle")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_bundle(out))):
        raise BloodcellError(f"--out {out}: exists and is not a bundle folder; give a new or empty folder")


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty or an older bundle) by the finished ``tmp`` folder."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _commands(run: Path, cfg: TrainConfig | None, data_meta: dict, out: Path, checkpoint: str, int8: bool,
              calibration_images: int, force: bool, command: str | None) -> list[str]:
    """The commands that made the bundle: data preparation, training, this export."""
    from bloodcell.choices import RECIPE_SETTINGS

    cmds = []
    src, split = data_meta.get("source") or {}, data_meta.get("split_source") or {}
    size = data_meta.get("size")
    if src.get("kind") == "folder":
        c = f"bloodcell data prepare --source {src['path']} --size {size}"
        if split.get("kind") == "file":
            c += f" --split-file {split['path']}"
        if data_meta.get("name") and data_meta["name"] != Path(src["path"]).name:
            c += f" --name {data_meta['name']}"
        cmds.append(c)
    elif src.get("kind") == "npz":
        cmds.append(f"bloodcell data prepare --npz {src['path']}")
    if cfg is not None:
        # every recipe setting is written out, so the command still makes this model when the defaults change
        rec = RECIPE_SETTINGS["recommended"]
        c = f"bloodcell train --model {cfg.model} --data {cfg.data} --size {cfg.size} --seed {cfg.seed}"
        for key, value in cfg.to_dict().items():
            if key in rec and value is not None and key != "normalize":
                c += f" --{key.replace('_', '-')} {value}"
        if any(cfg.to_dict()[k] is None and v is not None for k, v in rec.items()):
            c += " --recipe paper"  # e.g. the paper's per-model optimizer: only that recipe leaves it unset
        c += " --normalize" if cfg.normalize else ""
        c += "".join(f" --model-arg {k}={v}" for k, v in (cfg.model_args or {}).items())
        c += f" --precision {cfg.precision}" if cfg.precision != "fp32" else ""
        c += f" --threads {cfg.threads}" if cfg.threads else ""
        c += f" --train-limit {cfg.train_limit}" if cfg.train_limit else ""
        c += (f" --teacher {cfg.teacher} --distill-alpha {cfg.distill_alpha} --distill-temperature "
              f"{cfg.distill_temperature}" if cfg.teacher else "")
        cmds.append(c + f" --out {run}")
    if command is None:
        command = f"bloodcell export {run} --out {out}" + (f" --checkpoint {checkpoint}" if checkpoint != "best"
                                                           else "")
        command += f" --int8 --calibration-images {calibration_images}" if int8 else ""
        command += " --force" if force else ""
    cmds.append(command)
    return cmds


def export_bundle(run: str | Path, out: str | Path, *, checkpoint: str = "best", int8: bool = False,
                  calibration_images: int = 1024, force: bool = False, quant: QuantConfig | None = None,
                  data_dir: str | None = None, parity_data: str = "test", command: str | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Export ``run`` into the bundle folder ``out``; returns bundle.json's content.

    ``parity_data="test"`` checks parity and measures accuracy on the run's whole test split (the dataset must be
    prepared); ``"auto"`` falls back to 64 random images when the dataset is missing (``predict --engine onnx``'s
    cache of a run, or a bare weights file).
    int8: each of ``quant`` or else the ``LADDER`` of settings is tried in turn and the first within
    ``MAX_INT8_LOSS`` of fp32 on the validation split is kept; on the test split, an int8 model losing more than
    ``MAX_INT8_LOSS`` is not written unless ``force``, and the result says so in ``["int8_refused"]``.
    """
    run, out = Path(run), Path(out)
    if parity_data not in ("test", "auto"):
        raise BloodcellError(f"parity_data must be 'test' or 'auto', not {parity_data!r}")
    if int8 and parity_data != "test":
        raise BloodcellError("an int8 export needs the run's dataset (its training images calibrate it)")
    if isinstance(calibration_images, bool) or not isinstance(calibration_images, int) or calibration_images < 1:
        raise BloodcellError(f"--calibration-images must be a whole number >= 1, not {calibration_images!r}")
    _check_out(out, run)
    clf = Classifier.from_run(run, checkpoint, device="cpu")
    run_dir = run if run.is_dir() else None
    cfg_file = config_file(run)  # an ensemble's: its first member's, which names the data the members share
    cfg = TrainConfig.load(cfg_file) if cfg_file and cfg_file.is_file() else None
    members = getattr(clf, "member_runs", None)  # an ensemble: one graph holds every member and the vote
    temperature = run_temperature(clf)
    name = clf.meta["model"]
    norm = clf.normalization

    data = None
    if cfg is not None:
        try:
            data = load_dataset(cfg.data, cfg.size, data_dir or cfg.data_dir)
        except BloodcellError as e:
            if parity_data == "test":
                raise BloodcellError(f"{run}: parity is checked on the run's test split, but its dataset cannot be "
                                     f"loaded: {e}") from None
    elif parity_data == "test":
        raise BloodcellError(f"{run}: a bare weights file has no dataset to check parity on; export the run folder")
    if data is not None and data.class_names != clf.class_names:
        raise BloodcellError(f"{run}: the dataset's classes {data.class_names} differ from the model's")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        log(f"exporting {name} ({clf.input_size}x{clf.input_size}) to ONNX")
        fp32 = tmp / MODEL_FILES["fp32"]
        export_onnx(clf.model, fp32, clf.input_size, name=f"model '{name}'")
        if data is not None:
            images = np.ascontiguousarray(data.images["test"]).transpose(0, 3, 1, 2)
            labels = np.asarray(data.labels["test"])
            where = f"the test split ({len(labels)} images)"
        else:
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, (64, 3, clf.input_size, clf.input_size), dtype=np.uint8)
            labels, where = None, "64 random images (the run's dataset was not found)"
        import torch

        ref = clf.logits(torch.from_numpy(images)).cpu().numpy()
        got = ort_logits(fp32, images, norm)
        p32 = parity(ref, got)
        p32["data"] = "test" if labels is not None else "random"
        if not p32["ok"]:
            raise BloodcellError(
                f"{run}: the fp32 ONNX model does not reproduce PyTorch on {where}: top-1 agreement "
                f"{p32['top1_agreement']:.4%}, max |logit difference| {p32['max_abs_logit_diff']:.3g} (tolerance "
                f"{p32['tolerance']:.3g}); the export is not written")
        log(f"fp32 parity on {where}: max |logit difference| {p32['max_abs_logit_diff']:.2e}, top-1 agreement "
            f"{p32['top1_agreement']:.2%}")
        metrics = None
        if labels is not None:
            m = classification_metrics(labels, softmax(got, temperature or 1.0), clf.class_names)
            metrics = {"split": "test", "dataset": data.meta.get("name", cfg.data), "engine": "onnxruntime fp32",
                       **{k: m[k] for k in ("n", "accuracy", "f1_weighted", "f1_macro", "precision_macro",
                                            "recall_macro", "auc_ovr_macro") if k in m},
                       "per_class": m["per_class"], "confusion_matrix": m["confusion_matrix"]}
        models = {"fp32": {"file": fp32.name, "sha256": file_sha256(fp32), "bytes": fp32.stat().st_size}}
        quant_info, refused = None, None
        if int8:
            quant_info, refused = _int8(tmp, fp32, data, clf, norm, got, labels, calibration_images, quant, force,
                                        log)
            if refused is None:
                q = tmp / MODEL_FILES["int8"]
                models["int8"] = {"file": q.name, "sha256": file_sha256(q), "bytes": q.stat().st_size}

        bundle = {
            "format": FORMAT,
            "bloodcell_version": __version__,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "model": {"name": name, "model_args": clf.meta.get("model_args", {}),
                      "params_keras": count_params_keras(clf.model),
                      "params_trainable": count_params_trainable(clf.model)},
            "class_names": clf.class_names,
            "input_size": clf.input_size,
            "recipe": clf.recipe.to_dict(),
            "normalization": norm,
            "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, clf.input_size, clf.input_size],
                      "scaling": "pixels / 255, then (x - mean) / std per channel when normalization is set"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", len(clf.class_names)],
                       "probabilities": "softmax(logits / temperature); temperature null = 1"},
            "temperature": temperature,
            "abstention_threshold": None,  # later issues: selective prediction and OOD flags
            "ood": None,
            "models": models,
            "parity": {"fp32": p32, **({"int8": quant_info["result"]} if quant_info else {})},
            "quantization": quant_info and {k: v for k, v in quant_info.items() if k != "result"},
            "test_metrics": metrics,
            "source": {"run": str(run), "checkpoint": checkpoint if run_dir else None,
                       "epoch": clf.meta.get("epoch"), "weights_sha256": file_sha256(clf.source),
                       "dataset": (data.meta.get("name") if data is not None else None),
                       "dataset_fingerprint": (data.meta.get("fingerprint") if data is not None else None)},
            "commands": _commands(run, None if members else cfg, data.meta if data is not None else {}, out,
                                  checkpoint, int8, calibration_images, force, command),
        }
        if members:
            bundle["source"].update(checkpoint=clf.checkpoint, vote=clf.vote, members=[
                {"run": str(r), "weights": str(w), "weights_sha256": file_sha256(w)}
                for r, w in zip(members, clf.weight_files)])
            bundle["commands"].insert(-1, f"bloodcell ensemble {' '.join(map(str, members))} --vote {clf.vote} "
                                          f"--checkpoint {clf.checkpoint} --out {run}")
            bundle["output"]["probabilities"] = ENSEMBLE_PROBABILITIES[clf.vote]
        bundle[DIGEST_KEY] = content_digest(bundle)
        write_json(tmp / BUNDLE_JSON, bundle)
        write_text(tmp / MODEL_CARD, model_card(bundle, run_dir, data))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if refused:
        bundle["int8_refused"] = refused
    return bundle


def _int8(tmp: Path, fp32: Path, data, clf: Classifier, norm, fp32_logits: np.ndarray, labels: np.ndarray,
          n_calibration: int, quant: QuantConfig | None, force: bool,
          log: Callable[[str], None]) -> tuple[dict, str | None]:
    """Quantize (choosing the setting on the validation split), measure against fp32 on the test split, and keep
    the file only if the loss is allowed."""
    train_labels = np.asarray(data.labels["train"])
    idx = calibration_indices(train_labels, n_calibration, CALIBRATION_SEED)
    calib = np.ascontiguousarray(data.images["train"][idx]).transpose(0, 3, 1, 2)
    val_x = np.ascontiguousarray(data.images["val"]).transpose(0, 3, 1, 2)
    val_y = np.asarray(data.labels["val"])
    val32 = float((ort_logits(fp32, val_x, norm).argmax(1) == val_y).mean())
    q = tmp / MODEL_FILES["int8"]
    tried, info = [], None
    for config in (quant,) if quant else LADDER:
        info = quantize(fp32, q, calib, norm, config)
        val8 = float((ort_logits(q, val_x, norm).argmax(1) == val_y).mean())
        log(f"quantized to int8 ({config.calibration} calibration on {info['calibration_images']} training images, "
            f"fp32 kept for: {', '.join(config.keep_float) or 'nothing'}): validation accuracy {val8:.4f}, fp32 "
            f"{val32:.4f}")
        tried.append({"keep_float": list(config.keep_float), "calibration": config.calibration,
                      "val_accuracy": val8, "val_accuracy_fp32": val32, "val_loss_points": round(100 * (val32 - val8),
                                                                                                   4)})
        if val32 - val8 <= MAX_INT8_LOSS + 1e-12:
            break
        log(f"  more than {100 * MAX_INT8_LOSS:.1f} validation points lost: trying the next setting")
    got = ort_logits(q, np.ascontiguousarray(data.images["test"]).transpose(0, 3, 1, 2), norm)
    acc32 = float((fp32_logits.argmax(1) == labels).mean())
    acc8 = float((got.argmax(1) == labels).mean())
    agree = float((got.argmax(1) == fp32_logits.argmax(1)).mean())
    loss = acc32 - acc8
    result = {"n": int(len(labels)), "data": "test", "top1_agreement_with_fp32": agree, "accuracy": acc8,
              "accuracy_fp32": acc32, "accuracy_loss_points": round(100 * loss, 4),
              "max_loss_points": 100 * MAX_INT8_LOSS, "written": True}
    refused = None
    if loss > MAX_INT8_LOSS + 1e-12:
        refused = (f"the int8 model loses {100 * loss:.2f} points of test accuracy ({acc32:.4f} -> {acc8:.4f}, top-1 "
                   f"agreement with fp32 {agree:.2%}), more than the {100 * MAX_INT8_LOSS:.1f} allowed")
        if force:
            log(f"warning: {refused}; written anyway (--force)")
            result["forced"] = True
            refused = None
        else:
            q.unlink()
            result["written"] = False
            refused += "; model.int8.onnx was not written (--force writes it anyway)"
    log(f"int8 test accuracy {acc8:.4f} (fp32 {acc32:.4f}), top-1 agreement with fp32 {agree:.2%}")
    info.update(calibration_split="train", chosen_on="validation split", tried=tried, result=result)
    return info, refused
