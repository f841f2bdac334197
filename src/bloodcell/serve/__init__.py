"""``bloodcell serve``: a REST API (FastAPI on uvicorn) and a web page over a run folder or an exported bundle.

Importing this package imports no torch: a bundle is served with ONNX Runtime alone (``serve.model``).
"""

from bloodcell.serve.app import Limits, ServeConfig, create_app
from bloodcell.serve.model import Served, load_served

__all__ = ["Limits", "ServeConfig", "Served", "create_app", "load_served"]
