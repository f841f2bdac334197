"""Ensembles: finished runs voting as one classifier, loaded wherever a run folder is.

An ensemble folder holds ``ensemble.json`` (members, vote, checkpoint, and what the members share) beside the
metrics of its evaluation. ``EnsembleModule`` puts every member and the vote into one ``nn.Module`` whose output
is the log of the combined probabilities, so the ``Classifier`` machinery (TTA, evaluate, predict, serve and the
ONNX export, which then holds all members in one graph) treats an ensemble as one model.

Votes: ``soft`` = the mean of the members' softmax probabilities. ``majority`` = the class most members predict,
ties broken by the soft mean; its probabilities are (votes + soft mean) / (members + 1), the vote shares with the
soft mean folded in, so their arg-max is exactly the majority decision and they still sum to 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bloodcell.choices import CHECKPOINTS, VOTES
from bloodcell.errors import BloodcellError
from bloodcell.inference.classifier import Classifier
from bloodcell.io import read_json, write_json

ENSEMBLE_JSON = "ensemble.json"
FORMAT = "bloodcell-ensemble-1"
MIN_MEMBERS = 2
TINY = 1e-30  # floor of a majority vote's probabilities before the log (a class no member gives any mass)


def is_ensemble(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ENSEMBLE_JSON).is_file()


def combine(member_logits: torch.Tensor, vote: str) -> torch.Tensor:
    """(members, N, K) logits -> (N, K) log combined probabilities (see the module's docstring)."""
    logp = F.log_softmax(member_logits.float(), -1)
    soft = torch.logsumexp(logp, 0) - math.log(len(logp))  # log of the mean probability, without underflow
    if vote == "soft":
        return soft
    votes = torch.zeros_like(logp).scatter(-1, logp.argmax(-1, keepdim=True), 1.0).sum(0)
    return ((votes + soft.exp()) / (len(logp) + 1)).clamp_min(TINY).log()


class EnsembleModule(nn.Module):
    """All members and the vote as one model: normalised images in, log combined probabilities out."""

    def __init__(self, members: list[nn.Module], vote: str):
        super().__init__()
        if vote not in VOTES:
            raise BloodcellError(f"--vote must be one of {', '.join(VOTES)}, not '{vote}'")
        self.members = nn.ModuleList(members)
        self.vote = vote

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine(torch.stack([m(x).float() for m in self.members]), self.vote)


class EnsembleClassifier(Classifier):
    """A ``Classifier`` whose model is an ``EnsembleModule``; it is never calibrated (calibrate its members)."""

    def __init__(self, module: EnsembleModule, *, members: list[Classifier], folder: Path, checkpoint: str,
                 device: str | torch.device = "cpu", tta: str = "none"):
        first = members[0]
        models = [c.meta["model"] for c in members]
        meta = {"model": f"ensemble ({module.vote} vote of {', '.join(models)})", "model_args": {},
                "class_names": first.class_names, "input_size": first.input_size, "recipe": first.recipe.to_dict(),
                "normalization": first.normalization, "epoch": None, "ensemble": True, "vote": module.vote,
                "checkpoint": checkpoint, "members": [str(c.source.parent) for c in members]}
        super().__init__(module, class_names=first.class_names, recipe=first.recipe,
                         normalization=first.normalization, device=device, meta=meta,
                         source=folder / ENSEMBLE_JSON, tta=tta, calibration=None)
        self.folder, self.vote, self.checkpoint = folder, module.vote, checkpoint
        self.member_runs = [c.source.parent for c in members]
        self.member_weights = [c.source for c in members]

    @property
    def weight_files(self) -> list[Path]:
        return list(self.member_weights)

    def feature_layer(self) -> nn.Linear:
        raise BloodcellError(f"{self.folder}: an ensemble has no single penultimate layer (OOD features); calibrate "
                             "and explain its member runs instead")

    def fit_calibration(self, *args, **kwargs):
        raise BloodcellError(f"{self.folder}: an ensemble is not calibrated itself; run 'bloodcell calibrate' on "
                             f"its member runs ({', '.join(map(str, self.member_runs))})")

    @torch.inference_mode()
    def member_logits(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Every member's logits of a uint8 NCHW batch, (members, N, K), on ``device``."""
        self.model.eval()
        x = [self.norm(images[i : i + batch_size].to(self.device)) for i in range(0, len(images), batch_size)]
        return torch.stack([torch.cat([m(b).float() for b in x]) if x else
                            torch.zeros(0, self.num_classes, device=self.device) for m in self.model.members])


# ------------------------------------------------------------ making, reading and loading ensemble folders
def _finished_run(run: Path) -> dict:
    """A member must be a finished training run; its metrics.json (training summary, test metrics if any)."""
    if not run.is_dir():
        raise BloodcellError(f"{run}: run folder not found")
    if is_ensemble(run):
        raise BloodcellError(f"{run}: is an ensemble itself; give its member runs instead")
    if not (run / "config.json").is_file():
        raise BloodcellError(f"{run}: not a bloodcell run folder (no config.json)")
    metrics = read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
    if not isinstance(metrics, dict) or not isinstance(metrics.get("training"), dict):
        raise BloodcellError(f"{run}: not a finished run (metrics.json has no training summary); finish it with "
                             f"'bloodcell train --resume --out {run}'")
    return metrics


def check_compatible(members: list[Classifier], runs: list[Path]) -> None:
    """Same classes in the same order, input size, crop-resize recipe and normalisation as the first member;
    otherwise one line naming the run that differs."""
    first, where = members[0], runs[0]
    for clf, run in zip(members[1:], runs[1:]):
        for what, a, b in (("class names", clf.class_names, first.class_names),
                           ("input size", clf.input_size, first.input_size),
                           ("preprocessing recipe", clf.recipe.to_dict(), first.recipe.to_dict())):
            if a != b:
                raise BloodcellError(f"{run}: its {what} {a} differ from {where}'s {b}; ensemble members must "
                                     "see the same input and predict the same classes")
        if not same_normalization(clf.normalization, first.normalization):
            raise BloodcellError(f"{run}: its normalisation {clf.normalization} differs from {where}'s "
                                 f"{first.normalization}; ensemble members must share their preprocessing")


def same_normalization(a: dict | None, b: dict | None, tol: float = 1e-6) -> bool:
    if a is None or b is None:
        return a is b
    return all(abs(x - y) <= tol for k in ("mean", "std") for x, y in zip(a[k], b[k]))


def _relative(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` when it can be written so, else absolute."""
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def make_ensemble(runs: list[str | Path], out: str | Path, *, vote: str = "soft", checkpoint: str = "best") -> dict:
    """Check the members and write ``out/ensemble.json``; returns what was written."""
    runs, out = [Path(r) for r in runs], Path(out)
    if vote not in VOTES:
        raise BloodcellError(f"--vote must be one of {', '.join(VOTES)}, not '{vote}'")
    if checkpoint not in CHECKPOINTS:
        raise BloodcellError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, not '{checkpoint}'")
    if len(runs) < MIN_MEMBERS:
        raise BloodcellError(f"an ensemble needs at least {MIN_MEMBERS} member runs, got {len(runs)}")
    seen = set()
    for r in runs:
        if r.resolve() in seen:
            raise BloodcellError(f"{r}: given twice; each member run counts once")
        seen.add(r.resolve())
    if out.resolve() in seen:
        raise BloodcellError(f"--out {out}: is one of the member runs; give a new folder for the ensemble")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_ensemble(out))):
        raise BloodcellError(f"--out {out}: exists and is not an ensemble folder; give a new or empty folder")
    metrics = [_finished_run(r) for r in runs]
    members = [Classifier.from_run(r, checkpoint, device="cpu", calibrated=False) for r in runs]
    check_compatible(members, runs)
    out.mkdir(parents=True, exist_ok=True)
    first = members[0]
    spec = {
        "format": FORMAT, "vote": vote, "checkpoint": checkpoint,
        "class_names": first.class_names, "input_size": first.input_size, "recipe": first.recipe.to_dict(),
        "normalization": first.normalization,
        "members": [{"path": _relative(r, out), "model": c.meta["model"],
                     "params_trainable": m["training"].get("params_trainable"),
                     "params_keras": m["training"].get("params_keras"),
                     "test_accuracy": (m.get("test") or {}).get("accuracy")}
                    for r, c, m in zip(runs, members, metrics)],
    }
    metrics_file = out / "metrics.json"
    if metrics_file.is_file():  # an older ensemble's evaluation no longer describes this one
        metrics_file.unlink()
    write_json(out / ENSEMBLE_JSON, spec)
    return spec


def read_ensemble(folder: str | Path) -> dict:
    """``ensemble.json`` checked field by field, with ``member_runs`` (paths resolved against the folder)."""
    folder = Path(folder)
    path = folder / ENSEMBLE_JSON
    spec = read_json(path)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise BloodcellError(f"{path}: not a bloodcell ensemble file (format {FORMAT})")
    if spec.get("vote") not in VOTES:
        raise BloodcellError(f"{path}: 'vote' must be one of {', '.join(VOTES)}, not {spec.get('vote')!r}")
    if spec.get("checkpoint") not in CHECKPOINTS:
        raise BloodcellError(f"{path}: 'checkpoint' must be one of {', '.join(CHECKPOINTS)}")
    members = spec.get("members")
    if (not isinstance(members, list) or len(members) < MIN_MEMBERS
            or not all(isinstance(m, dict) and isinstance(m.get("path"), str) for m in members)):
        raise BloodcellError(f"{path}: 'members' must list at least {MIN_MEMBERS} members with a 'path'")
    spec["member_runs"] = [(folder / m["path"]).resolve() for m in members]  # an absolute path stays itself
    return spec


def member_runs(folder: str | Path) -> list[Path]:
    return read_ensemble(folder)["member_runs"]


def config_file(run: str | Path) -> Path | None:
    """The training config that describes a run's data: its own, an ensemble's first member's, None for a file."""
    run = Path(run)
    if is_ensemble(run):
        return member_runs(run)[0] / "config.json"
    return run / "config.json" if run.is_dir() else None


def load_ensemble(folder: str | Path, device: str | torch.device = "auto", tta: str = "none") -> EnsembleClassifier:
    """The ensemble as one classifier, its members' weights at the recorded checkpoint (which ``--checkpoint``
    does not change: it was chosen when the ensemble was made)."""
    folder = Path(folder)
    spec = read_ensemble(folder)
    runs = spec["member_runs"]
    for r in runs:
        if not r.is_dir():
            raise BloodcellError(f"{folder / ENSEMBLE_JSON}: member run {r} not found (moved or deleted?)")
    members = [Classifier.from_run(r, spec["checkpoint"], device="cpu", calibrated=False) for r in runs]
    check_compatible(members, runs)
    if members[0].class_names != spec.get("class_names") or members[0].input_size != spec.get("input_size"):
        raise BloodcellError(f"{folder / ENSEMBLE_JSON}: its classes or input size no longer match member "
                             f"{runs[0]}'s (retrained since?); make the ensemble again")
    module = EnsembleModule([c.model for c in members], spec["vote"])
    return EnsembleClassifier(module, members=members, folder=folder, checkpoint=spec["checkpoint"], device=device,
                              tta=tta)

