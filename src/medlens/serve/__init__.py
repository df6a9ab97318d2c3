"""``medlens serve``: trained runs behind a REST API (FastAPI + uvicorn) with a browser viewer at ``/``.

``create_app(runs, ServeSettings(...))`` builds the ASGI app; ``serve(...)`` (``server.py``) runs it with uvicorn. The
exported model (``medlens export``, ONNX Runtime) is used when a run has one, PyTorch otherwise; inputs are
prepared by ``medlens.run.Predictor`` only. ``standalone_loader.py`` runs an ONNX export without medlens.
"""

from medlens.serve.app import ServeSettings, create_app, load_api_keys
from medlens.serve.server import serve

__all__ = ["ServeSettings", "create_app", "load_api_keys", "serve"]
