"""Static int8 quantization of an exported model with ONNX Runtime's own tools (QDQ format, calibrated).

benchmarks/quantization_study.py measures, per node group, what quantizing costs and which settings avoid a loss
(benchmarks/results/deploy/quantization.md). ``bloodcell export --int8`` tries the ``LADDER`` in order, fastest
first, and keeps the first setting within 0.3 points of fp32 on the validation split; ``keep_float`` names the node
groups kept in fp32 (found from the module each ONNX node came from, which the exporter records).
"""

from __future__ import annotations

import ast
import contextlib
import io
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bloodcell.errors import BloodcellError
from bloodcell.runtime.bundle import INPUT_NAME
from bloodcell.runtime.predictor import normalize_nchw

CALIBRATIONS = ("minmax", "entropy", "percentile")
# Node groups that can be kept in fp32 (see node_groups)
KEEP_FLOAT = ("attention", "attention-pool", "attention-mlp", "attention-gate", "attention-mul", "head", "first-conv")
ATTENTION_CLASSES = ("ChannelAttention", "SpatialAttention", "CBAM", "SqueezeExcite")


@dataclass(frozen=True)
class QuantConfig:
    """One way to quantize: calibration method, granularity, types, and which node groups stay fp32."""

    calibration: str = "minmax"
    per_channel: bool = True
    activations: str = "uint8"  # U8S8: on x86 (VNNI too) S8S8 QDQ ran slower than fp32 in the study
    keep_float: tuple[str, ...] = ()
    percentile: float = 99.999
    op_types: tuple[str, ...] | None = None  # None: every op type ONNX Runtime can quantize
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise BloodcellError(f"calibration must be one of {', '.join(CALIBRATIONS)}, not {self.calibration!r}")
        if self.activations not in ("int8", "uint8"):
            raise BloodcellError(f"activations must be int8 or uint8, not {self.activations!r}")
        bad = [k for k in self.keep_float if k not in KEEP_FLOAT]
        if bad:
            raise BloodcellError(f"unknown node group {bad[0]!r} to keep in fp32 (known: {', '.join(KEEP_FLOAT)})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_float"] = list(self.keep_float)
        d["op_types"] = list(self.op_types) if self.op_types else None
        return d


DEFAULT = QuantConfig()
# fastest first: everything quantized; then the attention blocks in fp32; then also the head and the first conv
LADDER = (DEFAULT, QuantConfig(keep_float=("attention",)), QuantConfig(keep_float=("attention", "head", "first-conv")))


def _classes_of(node) -> list[str]:
    """The module classes a node was exported from (outermost first), from the exporter's metadata."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.class_hierarchy":
            try:
                return [str(c) for c in ast.literal_eval(p.value)]
            except (ValueError, SyntaxError):
                return []
    return []


def node_groups(model) -> dict[str, list[str]]:
    """Node names per group, from the module each node was exported from.

    ``attention``: every node inside an attention block (ChannelAttention, SpatialAttention, CBAM, SqueezeExcite),
    split into ``attention-pool`` (the global average/max pooling), ``attention-mlp`` (its Gemm/MatMul/Conv and
    their ReLUs), ``attention-gate`` (the sum, the sigmoid and its reshape) and ``attention-mul`` (the product of
    the feature map with the gate); ``head``: the last dense layer outside attention; ``first-conv``.
    """
    nodes = list(model.graph.node)
    inside = [n for n in nodes if any(c.rsplit(".", 1)[-1] in ATTENTION_CLASSES for c in _classes_of(n))]
    names = {n.name for n in inside}
    kind = {"attention-pool": ("ReduceMean", "ReduceMax", "GlobalAveragePool", "GlobalMaxPool"),
            "attention-mlp": ("Gemm", "MatMul", "Conv", "Relu"),
            "attention-mul": ("Mul",)}
    groups = {g: [n.name for n in inside if n.op_type in ops] for g, ops in kind.items()}
    typed = {x for v in groups.values() for x in v}
    groups["attention-gate"] = [n.name for n in inside if n.name not in typed]
    groups["attention"] = [n.name for n in inside]
    dense = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul") and n.name not in names]
    groups["head"] = dense[-1:]
    groups["first-conv"] = [n.name for n in nodes if n.op_type == "Conv"][:1]
    return groups


def calibration_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Exactly ``min(n, len(labels))`` indices keeping the class proportions (the stratified subset rounds per
    class; the few images it is off by are added or dropped at random)."""
    from bloodcell.data.tensors import stratified_subset

    n = min(n, len(labels))
    idx = stratified_subset(labels, n, seed)
    rng = np.random.default_rng(seed)
    if len(idx) > n:
        idx = np.sort(rng.choice(idx, n, replace=False))
    elif len(idx) < n:
        rest = np.setdiff1d(np.arange(len(labels)), idx)
        idx = np.sort(np.concatenate([idx, rng.choice(rest, n - len(idx), replace=False)]))
    return idx


class ArrayReader:
    """Calibration batches for ONNX Runtime: uint8 NCHW images, normalised as the model expects."""

    def __init__(self, images: np.ndarray, normalization: dict | None, batch: int = 64):
        self.images, self.normalization, self.batch = images, normalization, batch
        self.start, self.end = 0, len(images)
        self._it: Iterator | None = None

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        """ONNX Runtime's strided calibration: only ``images[start:end]`` until the next call."""
        self.start, self.end = start_index, min(end_index, len(self.images))
        self._it = None

    def _batches(self) -> Iterator[dict]:
        for i in range(self.start, self.end, self.batch):
            yield {INPUT_NAME: normalize_nchw(self.images[i : min(i + self.batch, self.end)], self.normalization)}

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def quantize(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray, normalization: dict | None,
             config: QuantConfig = DEFAULT) -> dict:
    """Write the static-int8 (QDQ) version of ``fp32_path`` calibrated on ``calibration`` (uint8 NCHW); returns
    what was done (settings, the nodes kept in fp32) for bundle.json."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise BloodcellError("no calibration images")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    model = onnx.load(str(fp32_path))
    groups = node_groups(model)
    exclude = sorted({n for g in config.keep_float for n in groups[g]})
    # histograms (entropy, percentile) hold every activation of the images they see: 128 at a time keeps the
    # memory to a few hundred MB (min-max merges the same way); their collector needs equal batches
    n = len(calibration)
    if n >= 32:  # batches of 32, strides of up to 128 images: fewer than 32 images may be left out
        n -= n % 32
        batch = 32
        stride = next(k * 32 for k in (4, 3, 2, 1) if n % (k * 32) == 0)
    else:
        batch = stride = n
    extra = {"CalibStridedMinMax": stride, "ActivationSymmetric": False, "WeightSymmetric": True,
             "CalibPercentile": config.percentile, **config.extra}
    # the histogram calibrators print their progress; bloodcell's own log says what is done
    with tempfile.TemporaryDirectory(prefix="bloodcell-quant-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        pre = Path(tmp) / "pre.onnx"
        # shape inference only: ONNX Runtime's graph optimisation would rename the nodes excluded above
        quant_pre_process(str(fp32_path), str(pre), skip_optimization=True, skip_onnx_shape=False,
                          skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), ArrayReader(calibration[:n], normalization, batch),
                        quant_format=QuantFormat.QDQ, per_channel=config.per_channel,
                        activation_type=qtype[config.activations], weight_type=QuantType.QInt8,
                        calibrate_method=methods[config.calibration], nodes_to_exclude=exclude or None,
                        op_types_to_quantize=list(config.op_types) if config.op_types else None,
                        extra_options=extra)
    return {**config.to_dict(), "format": "QDQ", "weights": "int8", "calibration_images": int(n),
            "nodes_kept_fp32": exclude}
