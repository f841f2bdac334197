"""Run an exported bundle with ONNX Runtime: the same preprocessing, answers and ``Prediction`` as the Classifier.

Only numpy, Pillow and onnxruntime are imported here (and bloodcell's torch-free data code), so a bundle runs
where PyTorch is not installed. Files are decoded by a thread pool (Pillow releases the GIL while it decodes and
resizes), so a folder of full-size JPEGs uses every core and the model is not what limits it.
"""

from __future__ import annotations

import os
import warnings as pywarnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bloodcell.data.images import ImageDecodeError, list_image_files, load_rgb
from bloodcell.data.recipe import Recipe, apply_recipe
from bloodcell.errors import BloodcellError
from bloodcell.prediction import Prediction
from bloodcell.runtime.bundle import INPUT_NAME, model_file, read_bundle, recipe_of

# As in bloodcell.inference.classifier: an image whose shorter side is under this fraction of the recipe's crop
# was not what the model saw in training; its prediction carries the same warning (tests compare the two).
SMALL_IMAGE_FRACTION = 0.5
PARALLEL_DECODE_FROM = 8  # fewer files than this decode in the calling thread


def preprocess_file(path: str | Path, recipe: Recipe) -> tuple[np.ndarray, list[str]]:
    """A file as model input (the training recipe), with warnings about what makes it doubtful."""
    img = load_rgb(path)
    warnings = []
    if min(img.size) < SMALL_IMAGE_FRACTION * recipe.crop and img.size != (recipe.size,) * 2:
        warnings.append(f"image is {img.width}x{img.height}, much smaller than the {recipe.crop} px "
                        "crop the model was trained on; the result is unreliable")
    return apply_recipe(img, recipe), warnings


def normalize_nchw(images: np.ndarray, normalization: dict | None) -> np.ndarray:
    """uint8 NCHW -> float32 in [0, 1], standardised per channel when the model was (exactly as ``Normalizer``)."""
    x = images.astype(np.float32) / np.float32(255)
    if normalization:
        x = (x - np.asarray(normalization["mean"], np.float32).reshape(1, 3, 1, 1)) / np.asarray(
            normalization["std"], np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray(x)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float32) / np.float32(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _session(path: Path, threads: int | None, spinning: bool):
    try:
        import onnxruntime as ort
    except ImportError:
        raise BloodcellError("onnxruntime is not installed; install the runtime with "
                             "pip install 'bloodcell[runtime]' (or pip install onnxruntime)") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    if not spinning:  # idle ORT threads would otherwise spin and take the cores the decoders need
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for a bad file
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BloodcellError(f"{path}: not a valid ONNX model ONNX Runtime can load ({text[:300]})") from None


class BundlePredictor:
    """An exported model with its preprocessing; the ``Classifier``'s array and file API without torch."""

    def __init__(self, folder: str | Path, precision: str = "fp32", threads: int | None = None,
                 spinning: bool = True):
        self.folder = Path(folder)
        self.bundle = read_bundle(self.folder)
        self.precision = precision
        self.source = model_file(self.folder, self.bundle, precision)
        self.class_names: list[str] = list(self.bundle["class_names"])
        self.recipe = recipe_of(self.bundle, self.folder / "bundle.json")
        self.normalization = self.bundle.get("normalization")
        self.temperature = float(self.bundle.get("temperature") or 1.0)
        self.threads = threads or os.cpu_count() or 1
        self.session = _session(self.source, threads, spinning)
        self._check_signature()

    def _check_signature(self) -> None:
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        want = [3, self.input_size, self.input_size]
        if len(ins) != 1 or ins[0].name != INPUT_NAME or list(ins[0].shape[1:]) != want or len(outs) != 1:
            got = [(i.name, i.shape) for i in ins]
            raise BloodcellError(f"{self.source}: the model takes {got}, not one '{INPUT_NAME}' input of "
                                 f"N x {' x '.join(map(str, want))} as bundle.json says")
        n = outs[0].shape[-1] if outs[0].shape else None
        if isinstance(n, int) and n != self.num_classes:
            raise BloodcellError(f"{self.source}: the model has {n} outputs but bundle.json names "
                                 f"{self.num_classes} classes")

    @property
    def input_size(self) -> int:
        return self.recipe.size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ------------------------------------------------------------ arrays in, arrays out
    def logits(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Logits of a uint8 NCHW batch (any size), as float32 N x classes."""
        if len(images) == 0:
            return np.zeros((0, self.num_classes), np.float32)
        out = [self.session.run(None, {INPUT_NAME: normalize_nchw(images[i : i + batch_size], self.normalization)})[0]
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def probabilities(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Softmax of the logits divided by ``temperature`` (1.0 unless the bundle carries a calibrated one)."""
        return softmax(self.logits(images, batch_size), self.temperature)

    def predict_arrays(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """N x H x W x 3 uint8 images already at the input size -> N x classes probabilities."""
        if images.ndim != 4 or images.shape[1:] != (self.input_size, self.input_size, 3):
            raise BloodcellError(f"expected N x {self.input_size} x {self.input_size} x 3 images, "
                                 f"got shape {images.shape}")
        return self.probabilities(np.ascontiguousarray(images).transpose(0, 3, 1, 2), batch_size)

    # ------------------------------------------------------------ files
    def preprocess(self, path: str | Path) -> tuple[np.ndarray, list[str]]:
        """A file as model input (the training recipe), with warnings about what makes it doubtful."""
        return preprocess_file(path, self.recipe)

    def _decode(self, path: Path):
        try:
            return self.preprocess(path)
        except ImageDecodeError as e:
            return e

    def predict_files(self, paths: list[str | Path], top_k: int = 3, batch_size: int = 64,
                      workers: int | None = None) -> list[Prediction]:
        """Every image file under ``paths`` (folders recursively), in order; unreadable files get an error.

        ``workers`` decoding threads (default: one per core, when there are enough files to be worth it); they
        decode the next chunk of files while the model runs on this one.
        """
        if top_k < 1:
            raise BloodcellError(f"--top-k must be at least 1, not {top_k}")
        files = list_image_files(paths)
        k = min(top_k, self.num_classes)
        workers = workers or (self.threads if len(files) >= PARALLEL_DECODE_FROM else 1)
        chunk = max(batch_size, 128 * workers)
        parts = [files[i : i + chunk] for i in range(0, len(files), chunk)]
        results: list[Prediction] = []
        pool = ThreadPoolExecutor(workers) if workers > 1 else None

        def start(part: list[Path]) -> list:
            return [pool.submit(self._decode, f) for f in part] if pool else part

        # load_rgb records decoder warnings with warnings.catch_warnings, which is not thread-safe: whatever the
        # decoding threads leave in the global warnings state is put back as it was once they are done
        with pywarnings.catch_warnings():
            try:
                pending = start(parts[0]) if parts else []
                for i, part in enumerate(parts):
                    decoded = [f.result() for f in pending] if pool else [self._decode(f) for f in pending]
                    pending = start(parts[i + 1]) if i + 1 < len(parts) else []
                    results.extend(self._classify(part, decoded, k, batch_size))
            finally:
                if pool:
                    pool.shutdown(cancel_futures=True)
        index = {str(f): i for i, f in enumerate(files)}
        results.sort(key=lambda r: index.get(r.path, 0))
        return results

    def _classify(self, part: list[Path], decoded: list, k: int, batch_size: int) -> list[Prediction]:
        """Predictions for one chunk of decoded files (errors kept in place)."""
        out, arrays, ok = [], [], []
        for f, d in zip(part, decoded):
            if isinstance(d, ImageDecodeError):
                out.append(Prediction(str(f), None, str(d)))
                continue
            arrays.append(d[0])
            ok.append((f, d[1]))
        if not arrays:
            return out
        probs = self.predict_arrays(np.stack(arrays), batch_size=max(batch_size, len(arrays)))
        for (f, warnings), pr in zip(ok, probs):
            if not np.isfinite(pr).all():
                out.append(Prediction(str(f), None, "the model's output is not finite (diverged weights?)"))
                continue
            order = np.argsort(-pr, kind="stable")[:k]
            out.append(Prediction(str(f), [(self.class_names[i], float(pr[i])) for i in order], warnings=warnings))
        return out


def load(bundle: str | Path, precision: str = "fp32", threads: int | None = None,
         spinning: bool = True) -> BundlePredictor:
    """A bundle folder written by ``bloodcell export``, checked and ready to predict (``fp32`` or ``int8``)."""
    return BundlePredictor(bundle, precision=precision, threads=threads, spinning=spinning)
