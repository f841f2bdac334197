"""What the server serves: a run folder (PyTorch ``Classifier``) or an exported bundle (ONNX Runtime), and the
``GET /v1/model`` description of it, built only from the files the run or bundle holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bloodcell import __version__
from bloodcell.errors import BloodcellError
from bloodcell.io import read_json


@dataclass
class Served:
    """The predictor and everything ``/v1/model`` reports about it."""

    predictor: object
    kind: str  # "run", "ensemble" or "bundle"
    engine: str  # "torch" or "onnxruntime"
    path: Path
    info: dict = field(default_factory=dict)

    @property
    def can_explain(self) -> bool:
        return self.kind == "run"


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def load_served(target: str | Path, checkpoint: str = "best", device: str = "cpu") -> Served:
    """Load ``target``: a folder with ``bundle.json`` runs with ``bloodcell.runtime`` (ONNX Runtime), anything else
    (a run folder or a ``.safetensors`` file) with the PyTorch ``Classifier``."""
    path = Path(target)
    if not path.exists():
        raise BloodcellError(f"{path}: no such run folder, weights file or bundle")
    if (path / "bundle.json").is_file():
        try:
            from bloodcell.runtime import load
        except ImportError as e:
            raise BloodcellError(f"{path} is an exported bundle, but the torch-free runtime is not available ({e}); "
                                 "install 'bloodcell[runtime]' or serve the run folder instead") from None
        predictor = load(path, spinning=False)  # idle ONNX Runtime threads must not spin: requests need the cores
        b = predictor.bundle
        card = path / "MODEL_CARD.md"
        info = {"name": b["model"]["name"], "model_args": b["model"].get("model_args", {}),
                "recipe": b.get("recipe"), "input_size": b.get("input_size"),
                "metrics": {"test": _scalars(b.get("test_metrics") or {})} if b.get("test_metrics") else {},
                "model_card": card.read_text(encoding="utf-8") if card.is_file() else None,
                "calibrated": b.get("temperature") is not None, "source": b.get("source", {})}
        return Served(predictor, "bundle", "onnxruntime", path, info)
    from bloodcell.inference import Classifier

    clf = Classifier.from_run(path, checkpoint, device=device)
    run_dir = path if path.is_dir() else None
    metrics = {}
    if run_dir and (run_dir / "metrics.json").is_file():
        raw = read_json(run_dir / "metrics.json") or {}
        metrics = {k: _scalars(v) for k, v in raw.items() if isinstance(v, dict)}
    meta = clf.meta
    card_file = run_dir / "MODEL_CARD.md" if run_dir else None
    info = {"name": meta.get("model"), "model_args": meta.get("model_args", {}), "recipe": clf.recipe.to_dict(),
            "input_size": clf.input_size, "metrics": metrics,
            "model_card": (card_file.read_text(encoding="utf-8") if card_file and card_file.is_file()
                           else run_card(meta, clf.class_names, metrics, path)),
            "calibrated": clf.mode() is not None, "source": {"run": str(path), "checkpoint": checkpoint,
                                                             "epoch": meta.get("epoch")}}
    members = getattr(clf, "member_runs", None)
    if members:  # Grad-CAM explains one model: the page and /v1/explain say to serve a member run for it
        info["source"].update(checkpoint=clf.checkpoint, vote=clf.vote, members=[str(m) for m in members])
    return Served(clf, "ensemble" if members else "run", "torch", path, info)


def run_card(meta: dict, classes: list[str], metrics: dict, path: Path) -> str:
    """A short markdown card for a run folder (a bundle carries the full MODEL_CARD.md of ``bloodcell export``)."""
    lines = [f"# {meta.get('model')} ({meta.get('input_size')}x{meta.get('input_size')}, {len(classes)} classes)", "",
             f"Served from the run folder `{path.name}` (bloodcell {__version__}). Classes: {', '.join(classes)}.", ""]
    for split, m in metrics.items():
        if split == "training":
            continue
        acc = m.get("accuracy")
        if isinstance(acc, (int, float)):
            lines.append(f"- {split}: accuracy {acc:.4f} on {m.get('n', '?')} images (from metrics.json)")
    if len(lines) == 4:
        lines.append("- not evaluated yet: run 'bloodcell evaluate' on the run folder for test metrics")
    lines += ["", "For research use, not for diagnosis: every prediction flagged 'review' needs a human look."]
    return "\n".join(lines) + "\n"
