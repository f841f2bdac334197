"""The one inference core: a trained model with everything needed to use it, on any device.

``Classifier`` holds the model, its class names, the crop-resize recipe, the normalisation and the device.
Every command that predicts (evaluate, predict, explain, errors, review, benchmark) and the training loop's
validation go through it, so preprocessing and the model's input can never differ between them.

Trust attaches here: ``tta`` averages the probabilities over test-time-augmentation views (all views of a
chunk in one forward pass); the run's ``calibration.json`` (``bloodcell calibrate``) gives each TTA setting its
temperature (which divides the logits before the softmax; 1.0 = uncalibrated), review threshold, OOD score and
threshold, and conformal scores; ``assess`` and ``predict_files`` turn them into per-image flags.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bloodcell.data.images import ImageDecodeError, list_image_files, load_rgb
from bloodcell.data.recipe import Recipe, apply_recipe
from bloodcell.data.tensors import Normalizer, stratified_subset, to_uint8_nchw
from bloodcell.errors import BloodcellError
from bloodcell.inference.weights import load_model, resolve_weights
from bloodcell.machine import resolve_device
from bloodcell.prediction import Prediction
from bloodcell.trust.calibration import calibration_metrics, fit_temperature, mean_probabilities
from bloodcell.trust.conformal import nonconformity, prediction_sets
from bloodcell.trust.ood import FEATURE_METHODS, FeatureStats, ood_scores, threshold_at_rate
from bloodcell.trust.selective import threshold_for_accuracy
from bloodcell.trust.store import Calibration, ModeCalibration, file_sha256, load_calibration
from bloodcell.trust.tta import n_views, tta_views

# An image whose shorter side is under this fraction of the recipe's crop was not what the model saw in
# training (a 200 px crop of a ~360 px smear image); its prediction carries a warning.
SMALL_IMAGE_FRACTION = 0.5
OOD_STATUS = "not a blood-cell image?"
DEFAULT_OOD_METHOD = "mahalanobis"  # measured against msp, energy and knn in benchmarks/trust.py (docs/trust.md)
DEFAULT_CONFORMAL_METHOD = "lac"  # the smaller sets at the same coverage there
FEATURE_TRAIN_LIMIT = 6000  # training images whose features fit the OOD statistics (stratified)
MAX_FEATURE_DIM = 16384  # wider penultimate layers (the plain CNN's) fall back to the energy score


class Classifier:
    """A trained model and its preprocessing; ``predict_files`` never stops at a bad file."""

    def __init__(self, model: nn.Module, *, class_names: list[str], recipe: Recipe,
                 normalization: dict | None = None, device: str | torch.device = "cpu", meta: dict | None = None,
                 temperature: float = 1.0, source: Path | None = None, tta: str = "none",
                 calibration: Calibration | None = None):
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.class_names = list(class_names)
        self.recipe = recipe
        self.normalization = normalization
        self.norm = Normalizer(**(normalization or {})).to(self.device)
        self.meta = dict(meta or {})
        n_views(tta)
        self.tta = tta
        self.calibration = calibration
        mode = self.mode(tta)
        self.temperature = mode.temperature if mode else float(temperature)
        self.source = source

    @classmethod
    def from_run(cls, run_or_file: str | Path, checkpoint: str = "best", device: str = "auto", tta: str = "none",
                 calibrated: bool = True) -> Classifier:
        """Load a run folder's ``best``/``last`` weights, or a bare ``.safetensors`` file, with the
        ``calibration.json`` beside them when it was fitted for these weights (``calibrated=False`` skips it).
        An ensemble folder (``bloodcell ensemble``) gives an ``EnsembleClassifier`` with its recorded checkpoint."""
        n_views(tta)
        from bloodcell.inference import ensemble

        if ensemble.is_ensemble(run_or_file):
            return ensemble.load_ensemble(run_or_file, device=device, tta=tta)
        path = resolve_weights(run_or_file, checkpoint)
        model, meta = load_model(path)
        if Path(run_or_file).is_dir():
            check_against_config(meta, Path(run_or_file), path)
        recipe = Recipe.from_dict(meta["recipe"], where=str(path))
        if recipe.size != meta["input_size"]:
            recipe = Recipe(size=meta["input_size"], crop=recipe.crop)
        calibration = load_calibration(path.parent, path) if calibrated else None
        return cls(model, class_names=meta["class_names"], recipe=recipe, normalization=meta.get("normalization"),
                   device=device, meta=meta, source=path, tta=tta, calibration=calibration)

    @property
    def input_size(self) -> int:
        return self.recipe.size

    @property
    def weight_files(self) -> list[Path]:
        """The weights files the model was loaded from (an ensemble's: one per member)."""
        return [self.source] if self.source else []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def mode(self, tta: str | None = None) -> ModeCalibration | None:
        """The calibration of one TTA setting (default: the classifier's), or None when uncalibrated."""
        tta = tta or self.tta
        n_views(tta)
        return self.calibration.modes.get(tta) if self.calibration else None

    def temperature_for(self, tta: str | None = None) -> float:
        tta = tta or self.tta
        if tta == self.tta:
            return self.temperature
        mode = self.mode(tta)
        return mode.temperature if mode else self.temperature

    def feature_layer(self) -> nn.Linear:
        """The last linear layer mapping to the classes: its input is the penultimate feature vector."""
        layers = [m for m in self.model.modules() if isinstance(m, nn.Linear) and m.out_features == self.num_classes]
        if not layers:
            raise BloodcellError(f"{self.meta.get('model', 'this model')} has no final linear layer to read "
                                 "penultimate features from")
        return layers[-1]

    # ------------------------------------------------------------ tensors in, tensors out (on the device)
    @torch.inference_mode()
    def logits(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Logits of a uint8 NCHW batch (any size, on any device), in eval mode, as a tensor on ``device``."""
        self.model.eval()
        if len(images) == 0:
            return torch.zeros(0, self.num_classes, device=self.device)
        out = [self.model(self.norm(images[i : i + batch_size].to(self.device, non_blocking=True)))
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).float()

    @torch.inference_mode()
    def view_logits(self, images: torch.Tensor, tta: str | None = None, batch_size: int = 512,
                    features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of every TTA view, (views, N, classes), on ``device``: each chunk of images goes through the
        model once with all its views stacked. With ``features``, also the view-averaged input of the last
        linear layer, (N, D)."""
        tta = tta or self.tta
        v = n_views(tta)
        self.model.eval()
        step = max(1, batch_size // v)
        captured: list[torch.Tensor] = []
        hook = self.feature_layer().register_forward_hook(
            lambda _m, inputs, _o: captured.append(inputs[0].flatten(1))) if features else None
        out, feats = [], []
        try:
            for i in range(0, len(images), step):
                x = images[i : i + step].to(self.device, non_blocking=True)
                out.append(self.model(self.norm(tta_views(x, tta))).float().view(v, len(x), -1))
                if features:
                    feats.append(captured.pop().float().view(v, len(x), -1).mean(0))
        finally:
            if hook is not None:
                hook.remove()
        if not out:
            width = self.feature_layer().in_features if features else 0
            return (torch.zeros(v, 0, self.num_classes, device=self.device),
                    torch.zeros(0, width, device=self.device) if features else None)
        return torch.cat(out, 1), (torch.cat(feats) if features else None)

    def probabilities(self, images: torch.Tensor, batch_size: int = 512, tta: str | None = None) -> torch.Tensor:
        """Softmax of the logits divided by the temperature, averaged over the TTA views, on ``device``."""
        z, _ = self.view_logits(images, tta, batch_size)
        return torch.softmax(z / self.temperature_for(tta), -1).mean(0)

    # ------------------------------------------------------------ trust signals
    def assess(self, images: torch.Tensor, tta: str | None = None, *, review_below: float | None = None,
               target_accuracy: float | None = None, conformal: float | None = None,
               batch_size: int = 512) -> dict[str, np.ndarray]:
        """One pass over a uint8 NCHW batch -> probabilities and the per-image trust signals (NumPy).

        Keys: ``probs``, ``confidence``, ``view_logits`` (V x N x K), ``ood_score`` (higher = less like the
        training cells), ``ood`` (flagged; None when uncalibrated), ``review`` (confidence below the threshold, or
        flagged OOD), ``review_threshold``, ``ood_threshold``, ``sets`` (conformal membership, N x K) when
        ``conformal`` (an alpha) is given. The review threshold is ``review_below``, else the one reaching
        ``target_accuracy`` on validation, else the calibration's default; uncalibrated, nothing is reviewed
        unless asked.
        """
        tta = tta or self.tta
        mode = self.mode(tta)
        self.check_trust_options(tta, review_below, target_accuracy, conformal)
        use_features = mode is not None and mode.ood_method in FEATURE_METHODS
        z, f = self.view_logits(images, tta, batch_size, features=use_features)
        z = z.cpu().numpy()
        probs = mean_probabilities(z, self.temperature_for(tta))
        conf = probs.max(1) if len(probs) else np.zeros(0)
        out: dict = {"probs": probs, "confidence": conf, "view_logits": z, "tta": tta}
        if review_below is not None:
            threshold = review_below
        elif target_accuracy is not None:
            threshold = mode.threshold_for(target_accuracy)
            threshold = np.inf if threshold is None else threshold
        else:
            threshold = (np.inf if mode.review_threshold is None else mode.review_threshold) if mode else None
        out["review_threshold"] = threshold
        review = conf < threshold if threshold is not None else np.zeros(len(conf), bool)
        if mode is not None and len(probs):
            out["ood_score"] = ood_scores(mode.ood_method, probs=probs, logits=z.mean(0),
                                          features=None if f is None else f.cpu().numpy(),
                                          stats=self.calibration.features)
            out["ood"] = out["ood_score"] > mode.ood_threshold
            out["ood_threshold"], out["ood_method"] = mode.ood_threshold, mode.ood_method
            review = review | out["ood"]
        else:
            out["ood_score"], out["ood"], out["ood_threshold"], out["ood_method"] = -conf, None, None, "msp"
        out["review"] = review
        if conformal is not None:
            out["conformal_q"] = mode.conformal_q(conformal)
            out["sets"] = prediction_sets(probs, out["conformal_q"], mode.conformal_method)
        return out

    def check_trust_options(self, tta: str, review_below: float | None, target_accuracy: float | None,
                            conformal: float | None) -> None:
        """One-line errors for trust options out of range, or needing a calibration the run lacks."""
        check_trust_options(review_below, target_accuracy, conformal)
        if self.mode(tta) is None and (target_accuracy is not None or conformal is not None):
            what = "--target-accuracy" if target_accuracy is not None else "--conformal"
            where = str(self.source.parent if self.source else "RUN")
            raise BloodcellError(f"{what} needs the run's validation calibration (for --tta {tta}): run "
                                 f"'bloodcell calibrate {where}' first")

    # ------------------------------------------------------------ fitting the calibration (bloodcell calibrate)
    def fit_calibration(self, val_images: torch.Tensor, val_labels: np.ndarray, train_images: torch.Tensor,
                        train_labels: np.ndarray, *, checkpoint: str = "best", modes: tuple[str, ...] = ("none",),
                        target_accuracy: float = 0.995, ood_rate: float = 0.01, ood_method: str | None = None,
                        conformal_method: str = DEFAULT_CONFORMAL_METHOD, seed: int = 0) -> Calibration:
        """Fit every trust setting on held-out (validation) images; the training images only give the feature
        statistics of the OOD score. Each TTA setting in ``modes`` gets its own temperature and thresholds."""
        if self.source is None:
            raise BloodcellError("only a classifier loaded from a weights file can be calibrated")
        val_labels = np.asarray(val_labels).reshape(-1)
        notes = []
        method = ood_method or DEFAULT_OOD_METHOD
        stats = None
        if method in FEATURE_METHODS:
            width = self.feature_layer().in_features
            if width > MAX_FEATURE_DIM and ood_method is None:
                notes.append(f"penultimate layer {width} wide (over {MAX_FEATURE_DIM}): OOD score 'energy'")
                method = "energy"
            else:
                keep = stratified_subset(np.asarray(train_labels), FEATURE_TRAIN_LIMIT, seed)
                _, tf = self.view_logits(train_images[torch.from_numpy(keep)], "none", features=True)
                stats = FeatureStats.fit(tf.cpu().numpy(), np.asarray(train_labels)[keep], seed=seed)
        out = {}
        for tta in modes:
            z, f = self.view_logits(val_images, tta, features=stats is not None)
            z = z.cpu().numpy()
            t = fit_temperature(z, val_labels)
            probs = mean_probabilities(z, t)
            conf, correct = probs.max(1), probs.argmax(1) == val_labels
            scores = ood_scores(method, probs=probs, logits=z.mean(0),
                                features=None if f is None else f.cpu().numpy(), stats=stats)
            true_scores = nonconformity(probs, conformal_method)[np.arange(len(val_labels)), val_labels]
            before = calibration_metrics(mean_probabilities(z, 1.0), val_labels)
            after = calibration_metrics(probs, val_labels)
            summary = {"val_before": {k: before[k] for k in ("ece", "mce", "nll", "brier", "accuracy")},
                       "val_after": {k: after[k] for k in ("ece", "mce", "nll", "brier", "accuracy")},
                       "thresholds": {str(a): threshold_for_accuracy(conf, correct, a) for a in (0.99, 0.995, 0.999)}}
            out[tta] = ModeCalibration(tta, t, threshold_for_accuracy(conf, correct, target_accuracy), method,
                                       threshold_at_rate(scores, ood_rate), conformal_method, np.sort(true_scores),
                                       conf, correct, summary)
        info = {"validation_images": int(len(val_labels)),
                "feature_train_images": int(len(stats.bank)) if stats is not None else 0, "notes": notes}
        return Calibration(checkpoint, file_sha256(self.source), target_accuracy, ood_rate, out, stats, info)

    # ------------------------------------------------------------ arrays and files (the host boundary)
    def predict_arrays(self, images: np.ndarray, batch_size: int = 512, tta: str | None = None) -> np.ndarray:
        """N x H x W x 3 uint8 images already at the input size -> N x classes probabilities (NumPy)."""
        if images.ndim != 4 or images.shape[1:] != (self.input_size, self.input_size, 3):
            raise BloodcellError(f"expected N x {self.input_size} x {self.input_size} x 3 images, "
                                 f"got shape {images.shape}")
        return self.probabilities(to_uint8_nchw(images), batch_size, tta).cpu().numpy()

    def preprocess(self, path: str | Path) -> tuple[np.ndarray, list[str]]:
        """A file as model input (the training recipe), with warnings about what makes it doubtful."""
        img = load_rgb(path)
        warnings = []
        if min(img.size) < SMALL_IMAGE_FRACTION * self.recipe.crop and img.size != (self.input_size,) * 2:
            warnings.append(f"image is {img.width}x{img.height}, much smaller than the {self.recipe.crop} px "
                            "crop the model was trained on; the result is unreliable")
        return apply_recipe(img, self.recipe), warnings

    def predict_files(self, paths: list[str | Path], top_k: int = 3, batch_size: int = 64, *, tta: str | None = None,
                      review_below: float | None = None, target_accuracy: float | None = None,
                      conformal: float | None = None) -> list[Prediction]:
        """Every image file under ``paths`` (folders recursively), in order; unreadable files get an error.

        Each prediction's ``flags`` carry the trust signals of ``assess``: ``status`` ("ok", "review" or
        "not a blood-cell image?"), ``confidence``, ``review``, ``review_threshold``, ``ood_score``,
        ``out_of_distribution``, ``ood_threshold``, ``tta``, ``calibrated`` and, with ``conformal``,
        ``conformal_set`` and ``conformal_alpha``.
        """
        if top_k < 1:
            raise BloodcellError(f"--top-k must be at least 1, not {top_k}")
        tta = tta or self.tta
        self.check_trust_options(tta, review_below, target_accuracy, conformal)
        files = list_image_files(paths)
        k = min(top_k, self.num_classes)
        results: list[Prediction] = []
        for start in range(0, len(files), batch_size):
            arrays, ok = [], []
            for f in files[start : start + batch_size]:
                try:
                    arr, warnings = self.preprocess(f)
                except ImageDecodeError as e:
                    results.append(Prediction(str(f), None, str(e)))
                    continue
                arrays.append(arr)
                ok.append((f, warnings))
            if not arrays:
                continue
            a = self.assess(to_uint8_nchw(np.stack(arrays)), tta, review_below=review_below,
                            target_accuracy=target_accuracy, conformal=conformal)
            for j, ((f, warnings), pr) in enumerate(zip(ok, a["probs"])):
                if not np.isfinite(pr).all():
                    results.append(Prediction(str(f), None, "the model's output is not finite (diverged weights?)"))
                    continue
                order = np.argsort(-pr, kind="stable")[:k]
                results.append(Prediction(str(f), [(self.class_names[i], float(pr[i])) for i in order],
                                          warnings=warnings, flags=self.flags_of(a, j, conformal)))
        index = {str(f): i for i, f in enumerate(files)}
        results.sort(key=lambda r: index.get(r.path, 0))
        return results

    def flags_of(self, a: dict, j: int, conformal: float | None) -> dict:
        """Image ``j``'s trust flags from an ``assess`` result, as JSON-ready values."""
        ood = None if a["ood"] is None else bool(a["ood"][j])
        review = bool(a["review"][j])
        t = a["review_threshold"]
        flags = {"status": OOD_STATUS if ood else "review" if review else "ok",
                 "confidence": float(a["confidence"][j]), "review": review,
                 "review_threshold": None if t is None or not np.isfinite(t) else float(t),
                 "ood_score": float(a["ood_score"][j]), "out_of_distribution": ood,
                 "ood_threshold": a["ood_threshold"], "ood_method": a["ood_method"], "tta": a["tta"],
                 "calibrated": self.mode(a["tta"]) is not None}
        if t is not None and not np.isfinite(t):
            flags["review_note"] = "no confidence threshold reaches the target accuracy on validation: review all"
        if conformal is not None:
            flags["conformal_alpha"] = conformal
            flags["conformal_set"] = [self.class_names[i] for i in np.flatnonzero(a["sets"][j])]
        return flags


def check_trust_options(review_below: float | None, target_accuracy: float | None, conformal: float | None) -> None:
    """One-line errors for trust options out of range, before any work."""
    if review_below is not None and target_accuracy is not None:
        raise BloodcellError("give --review-below or --target-accuracy, not both")
    if review_below is not None and not 0 <= review_below <= 1:
        raise BloodcellError(f"--review-below is a probability between 0 and 1, got {review_below}")
    if target_accuracy is not None and not 0 < target_accuracy < 1:
        raise BloodcellError(f"--target-accuracy must be between 0 and 1 (e.g. 0.995), got {target_accuracy}")
    if conformal is not None and not 0 < conformal < 1:
        raise BloodcellError(f"--conformal takes the miscoverage alpha between 0 and 1 (e.g. 0.01 for sets that "
                             f"hold the true class 99% of the time), got {conformal}")


def check_against_config(meta: dict, run_dir: Path, weights: Path) -> None:
    """A run folder's weights must describe the model its ``config.json`` trained, with the classes its
    ``metrics.json`` recorded (so an edited file is refused even without its metadata digest)."""
    from bloodcell.io import read_json

    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        recorded = (read_json(metrics) or {}).get("training", {}).get("class_names")
        if recorded is not None and recorded != meta["class_names"]:
            raise BloodcellError(f"{weights}: its class names {meta['class_names']} differ from the ones the run "
                                 f"trained with {recorded} ({metrics}); the file was edited or comes from another run")
    config = run_dir / "config.json"
    if not config.is_file():
        return
    cfg = read_json(config)
    if not isinstance(cfg, dict):
        raise BloodcellError(f"{config}: not a JSON object")
    for key, mkey in (("model", "model"), ("size", "input_size"), ("model_args", "model_args")):
        if key in cfg and cfg[key] != meta.get(mkey, {} if key == "model_args" else None):
            raise BloodcellError(f"{weights}: its {mkey} {meta.get(mkey)!r} differs from {key} {cfg[key]!r} in "
                                 f"{config}; the folder mixes two runs")
