"""PyTorch -> ONNX with the maintained exporter (``torch.onnx.export(dynamo=True)``), and the parity checks.

The graph is the model's own forward: float32 NCHW images scaled as in training (``normalize_nchw``) in, logits
out, with a dynamic batch axis. An op the exporter cannot translate becomes a one-line error naming it.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bloodcell.errors import BloodcellError
from bloodcell.io import atomic_write
from bloodcell.runtime.bundle import INPUT_NAME, OUTPUT_NAME

# Node metadata the exporter adds that only helps debugging it (and holds local paths): dropped from the file.
DROP_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.onnxscript.rewriter.rule_name")


def _failed_op(text: str) -> str | None:
    """The operator an exporter error is about, e.g. ``aten._linalg_svd``."""
    for pattern in (r"op='([\w.]+)'", r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]", r"(aten::\w+)",
                    r"Unsupported FX nodes: \{[^}]*?'([\w.]+)'"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def export_onnx(model: nn.Module, path: str | Path, input_size: int, name: str = "the model") -> None:
    """Write ``model`` (eval mode, CPU) as ONNX with a dynamic batch axis; opset as the exporter chooses."""
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    example = torch.rand(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    chatter = io.StringIO()  # the exporter prints its progress; a failure's reason is in the exception
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                        external_data=False, verbose=False)
    except ImportError as e:
        raise BloodcellError(f"exporting needs onnx and onnxscript: pip install 'bloodcell[export]' ({e})") from None
    except Exception as e:  # the exporter's own error types; their message names the failing op
        text = str(e)
        op = _failed_op(text)
        if op:
            raise BloodcellError(f"cannot export {name} to ONNX: operator {op} has no ONNX translation in torch "
                                 f"{torch.__version__}'s exporter (replace it in the model, or register a "
                                 "translation)") from None
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
        raise BloodcellError(f"cannot export {name} to ONNX: {first[:300]}") from None
    proto = program.model_proto
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key not in DROP_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    proto.producer_name = "bloodcell"
    data = proto.SerializeToString()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def parity(reference: np.ndarray, onnx_logits: np.ndarray, rtol: float = 1e-3, atol: float = 1e-6) -> dict:
    """How far ONNX logits are from PyTorch's: max abs difference, top-1 agreement, and whether both are within
    ``atol + rtol * max|reference|`` (float error only; a wrong translation is orders of magnitude off)."""
    ref, got = np.asarray(reference, np.float64), np.asarray(onnx_logits, np.float64)
    if ref.shape != got.shape:
        raise BloodcellError(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape}")
    finite = bool(np.isfinite(got).all())
    diff = float(np.abs(ref - got).max()) if ref.size and finite else (0.0 if finite else float("inf"))
    agree = float((ref.argmax(1) == got.argmax(1)).mean()) if len(ref) else 1.0
    tol = atol + rtol * (float(np.abs(ref).max()) if ref.size else 0.0)
    return {"n": int(len(ref)), "max_abs_logit_diff": diff, "tolerance": tol,
            "top1_agreement": agree, "ok": finite and diff <= tol and agree == 1.0}
