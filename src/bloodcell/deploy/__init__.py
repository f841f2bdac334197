"""Deployment: export a run to an ONNX bundle (fp32, optionally int8) with its model card and parity checks.

Running a bundle needs none of this (and no torch): see ``bloodcell.runtime``.
"""

from bloodcell.deploy.bundle import MAX_INT8_LOSS, export_bundle
from bloodcell.deploy.quantize import DEFAULT, LADDER, QuantConfig

__all__ = ["DEFAULT", "LADDER", "MAX_INT8_LOSS", "QuantConfig", "export_bundle"]
