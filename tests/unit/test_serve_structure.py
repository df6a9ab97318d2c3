"""``medlens serve`` as a thin adapter (issue 29): routes, auth, errors and the served-model registry in their own
modules, nothing imported from ``workflow/``, and the backend looked up in the export registry. No data needed."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from medlens.errors import ConfigError
from medlens.run.exporters import Exporter, get_exporter, register_exporter, unregister_exporter
from medlens.serve import auth as auth_mod
from medlens.serve.auth import Auth
from medlens.serve.models import served_format
from medlens.serve.routes import ROUTERS

SERVE = Path(__file__).resolve().parents[2] / "src" / "medlens" / "serve"
KEY, OTHER = "k" * 20, "o" * 20


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return out | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_serve_imports_nothing_from_workflow_even_inside_functions():
    files = sorted(SERVE.rglob("*.py"))
    assert len(files) >= 12
    bad = {f.relative_to(SERVE).as_posix(): sorted(m for m in _imports(f) if m.startswith("medlens.workflow"))
           for f in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_create_app_only_assembles_and_every_route_lives_in_a_router_module():
    tree = ast.parse((SERVE / "app.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "create_app")
    assert fn.end_lineno - fn.lineno + 1 <= 60       # 408 lines, every route a closure, before issue 29
    routes = {(r.path, tuple(sorted(r.methods)), r.endpoint.__module__) for router in ROUTERS for r in router.routes}
    assert {(p, m) for p, m, _ in routes} == {
        ("/v1/models", ("GET",)), ("/v1/models/{name}", ("GET",)), ("/v1/models/{name}/predict", ("POST",)),
        ("/v1/models/{name}/segment", ("POST",)), ("/healthz", ("GET",)), ("/readyz", ("GET",)),
        ("/metrics", ("GET",)), ("/", ("GET",)), ("/login", ("POST",)), ("/logout", ("POST",))}
    by_module = {m.rsplit(".", 1)[-1]: set() for _, _, m in routes}
    for p, _, m in routes:
        by_module[m.rsplit(".", 1)[-1]].add(p)
    assert by_module == {"predict": {"/v1/models/{name}/predict", "/v1/models/{name}/segment"},
                         "status": {"/v1/models", "/v1/models/{name}", "/healthz", "/readyz", "/metrics"},
                         "viewer": {"/", "/login", "/logout"}}


def test_sessions_map_a_random_token_to_the_key_and_die_with_it(monkeypatch):
    a = Auth((KEY,))
    assert a.required and a.valid(KEY) and not a.valid(OTHER) and not a.valid(None) and not a.valid("")
    token = a.new_session(KEY)
    assert KEY not in token and a.session_valid(token) and not a.session_valid("forged")
    assert KEY not in repr(a.sessions)                    # the server keeps the key's hash, not the key
    a.api_keys = (OTHER,)                                  # the key is withdrawn: its sessions stop working
    assert not a.session_valid(token) and token not in a.sessions
    a.api_keys = (KEY,)
    t2 = a.new_session(KEY)
    a.end_session(t2)
    assert not a.session_valid(t2)
    monkeypatch.setattr(auth_mod, "SESSION_TTL_S", 0.0)    # expired sessions are refused and dropped
    t3 = a.new_session(KEY)
    time.sleep(0.01)
    assert not a.session_valid(t3)
    monkeypatch.setattr(auth_mod, "MAX_SESSIONS", 3)       # a flood of logins keeps at most MAX_SESSIONS
    monkeypatch.setattr(auth_mod, "SESSION_TTL_S", 3600.0)
    tokens = [a.new_session(KEY) for _ in range(5)]
    assert len(a.sessions) == 3 and set(a.sessions) == set(tokens[-3:])
    assert not Auth(()).required


class ToyServable(Exporter):
    name = "toy-served"
    file_name = "model.toy-served.bin"
    servable = True
    runtime = "toy-runtime"


def test_serve_picks_its_backend_from_the_export_registry(tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    assert served_format(run, "auto") is None                          # no export: PyTorch
    assert served_format(run, "torch") is None
    assert served_format(run, "onnx") is get_exporter("onnx")          # asked for: its file is verified on open
    with pytest.raises(ConfigError, match=r"--backend must be one of auto, onnx, torch, not 'torchscript'"):
        served_format(run, "torchscript")                               # registered, but not a served format
    register_exporter(ToyServable)
    try:
        assert served_format(run, "toy-served") is get_exporter("toy-served")
        assert served_format(run, "auto") is None
        (run / "export" / "model.toy-served.bin").write_bytes(b"x")
        assert served_format(run, "auto") is get_exporter("toy-served")   # found by the registry, no branch
        assert served_format(run, "auto", classical=True) is None
        (run / "export" / "model.onnx").write_bytes(b"x")
        assert served_format(run, "auto") is get_exporter("onnx")         # registration order decides
    finally:
        unregister_exporter("toy-served")
    with pytest.raises(ConfigError, match="not 'toy-served'"):
        served_format(run, "toy-served")
