"""``medlens models list``: the model registry, read without importing it.

The registry fills as ``medlens.models`` imports its architecture modules (timm's pattern), which imports torch,
MONAI and every architecture: seconds and hundreds of MB for a table. So the listing reads the same facts from
the source: each ``@register_model(...)`` decorator (name, dims, task), its factory's parameter names and the
first line of its docstring, exactly what the registry records, plus the classical models of
``engine/classical.py``. ``tests/unit/test_cli_structure.py`` imports the registry and checks that the two agree.
A registration this scan cannot read (arguments that are not literals, a factory that is not a plain module-level
function, source files that are not there) makes the listing import the registry instead: slower, never wrong.
"""

from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.table import Table

from medlens.cli.common import console

app = typer.Typer(help="The model registry.", no_args_is_help=True)

PACKAGE = Path(__file__).resolve().parents[1]       # src/medlens
MODELS = PACKAGE / "models"                         # the architecture modules
CLASSICAL = PACKAGE / "engine" / "classical.py"     # CLASSICAL_MODELS: random forest and SVM
# the factory parameters every model takes, not shown as options
COMMON_PARAMS = ("in_channels", "num_outputs", "spatial_dims", "input_size")


@dataclass(frozen=True)
class CatalogueEntry:
    """What ``models.registry.ModelEntry`` records of one model, without its factory."""

    name: str
    dims: tuple[int, ...]
    task: str
    params: tuple[str, ...]
    summary: str


class NotStatic(Exception):
    """A registration that only importing the module can read."""


@app.command("list")
def list_(pattern: str = typer.Argument("*", help="wildcard filter, e.g. 'resnet*'")) -> None:
    """Registered architectures with their dimensions and options."""
    models, classical = catalogue()
    t = Table(title="medlens models")
    t.add_column("name", no_wrap=True, style="bold")
    t.add_column("dims", no_wrap=True)
    t.add_column("options")
    t.add_column("description", ratio=1)
    for e in models:
        if fnmatch.fnmatch(e.name, pattern):
            t.add_row(e.name, "/".join(f"{d}D" for d in e.dims),
                      ", ".join(p for p in e.params if p not in COMMON_PARAMS), e.summary)
    for name, summary in classical.items():
        if fnmatch.fnmatch(name, pattern):
            t.add_row(name, "2D/3D", "n_estimators / C, class_weight", summary)
    console.print(t)


def catalogue() -> tuple[list[CatalogueEntry], dict[str, str]]:
    """The registered models sorted by name, and the classical models: from the source when every registration
    is literal, else from the imported registry."""
    try:
        return scan_models(MODELS), scan_literal(CLASSICAL, "CLASSICAL_MODELS")
    except (NotStatic, OSError, SyntaxError):
        return live_catalogue()


def live_catalogue() -> tuple[list[CatalogueEntry], dict[str, str]]:
    """The same, from the registry itself (imports torch and every architecture)."""
    from medlens.engine.classical import CLASSICAL_MODELS
    from medlens.models import list_models

    return ([CatalogueEntry(e.name, e.dims, e.task, tuple(e.params), e.summary) for e in list_models()],
            dict(CLASSICAL_MODELS))


def scan_models(folder: Path) -> list[CatalogueEntry]:
    """Every ``@register_model(...)`` in the modules of ``folder``, as the registry would record it, sorted by
    name. Raises ``NotStatic`` for a registration it cannot read exactly."""
    found: dict[str, CatalogueEntry] = {}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        read: set[int] = set()   # the register_model names of the decorators read below
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and len(node.decorator_list) == 1:
                deco = node.decorator_list[0]
                if isinstance(deco, ast.Call) and _is_register(deco.func):
                    entry = _entry(node, deco, path)
                    if entry.name in found:
                        raise NotStatic(f"{path}:{node.lineno}: model '{entry.name}' registered twice")
                    found[entry.name] = entry
                    read.add(id(deco.func))
        for node in ast.walk(tree):   # any other use (nested, stacked, called directly): only importing reads it
            if isinstance(node, (ast.Name, ast.Attribute)) and _is_register(node) and id(node) not in read:
                raise NotStatic(f"{path}:{node.lineno}: a use of register_model this scan cannot read")
    return [found[k] for k in sorted(found)]


def scan_literal(path: Path, name: str) -> dict[str, str]:
    """The literal value of the module-level assignment ``name = {...}`` in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError as e:
                raise NotStatic(f"{path}:{node.lineno}: {name} is not a literal") from e
            if not isinstance(value, dict):
                raise NotStatic(f"{path}:{node.lineno}: {name} is not a dict")
            return {str(k): str(v) for k, v in value.items()}
    raise NotStatic(f"{path}: no module-level {name} = ...")


def _is_register(func: ast.expr) -> bool:
    return (isinstance(func, ast.Name) and func.id == "register_model") or \
        (isinstance(func, ast.Attribute) and func.attr == "register_model")


def _entry(fn: ast.FunctionDef, call: ast.Call, path: Path) -> CatalogueEntry:
    """``register_model(name=None, *, dims=(2,), task="classification")`` read as the registry reads it."""
    try:
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except ValueError as e:
        raise NotStatic(f"{path}:{call.lineno}: register_model arguments are not literals") from e
    if len(args) > 1 or None in kwargs or set(kwargs) - {"dims", "task", "min_size"}:
        raise NotStatic(f"{path}:{call.lineno}: register_model arguments this scan does not know")
    name = args[0] if args else None
    dims = kwargs.get("dims", (2,))
    task = kwargs.get("task", "classification")
    if not (name is None or isinstance(name, str)) or not isinstance(task, str) \
            or not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        raise NotStatic(f"{path}:{call.lineno}: register_model arguments of unexpected types")
    a = fn.args
    params = [p.arg for p in a.posonlyargs + a.args] + ([a.vararg.arg] if a.vararg else []) \
        + [p.arg for p in a.kwonlyargs] + ([a.kwarg.arg] if a.kwarg else [])
    doc = (ast.get_docstring(fn) or "").strip().splitlines()   # inspect.getdoc's cleaning, as the registry's
    return CatalogueEntry(name or fn.name, tuple(dims), task, tuple(params), doc[0] if doc else "")
