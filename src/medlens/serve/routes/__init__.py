"""The HTTP routes of ``medlens serve``, one ``APIRouter`` per concern: ``predict`` (predict, segment),
``status`` (models, health, readiness, metrics) and ``viewer`` (the page, login, logout). Each route gets the
app's ``ServeContext`` as a FastAPI dependency; ``app.create_app`` includes the routers in this order."""

from medlens.serve.routes import predict, status, viewer

ROUTERS = (status.models_router, predict.router, status.router, viewer.router)

__all__ = ["ROUTERS", "predict", "status", "viewer"]
