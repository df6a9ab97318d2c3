"""``medlens serve``: trained runs behind a REST API (FastAPI + uvicorn) with a browser viewer at ``/``.

``create_app(runs, ServeSettings(...))`` builds the ASGI app; ``serve(...)`` runs it with uvicorn. The
exported model (``medlens export``, ONNX Runtime) is used when a run has one, PyTorch otherwise; inputs are
prepared by ``medlens.run.Predictor`` only. ``standalone_loader.py`` runs an ONNX export without medlens.
"""

from medlens.serve.app import ServeSettings, create_app, load_api_keys

__all__ = ["ServeSettings", "create_app", "load_api_keys", "serve"]


def serve(runs, settings: ServeSettings) -> None:
    """Run the server in this process until interrupted (uvicorn, JSON logs, no access log)."""
    import uvicorn

    from medlens.serve.logs import configure

    configure()
    app = create_app(runs, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=5)
