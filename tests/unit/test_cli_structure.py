"""The command line in one style (issue 29): every command a module-level function that ``cli/main.py`` composes,
no long function, the one import-deferral rule of docs/ARCHITECTURE.md ("Imports"), and a start-up that loads
none of the library: ``medlens --help`` and ``medlens models list`` import no torch. ``models list`` reads the
model registry from the source; here the live registry is imported and the two must agree. No data needed."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medlens.cli import models_cmd
from medlens.cli.models_cmd import CLASSICAL, MODELS, NotStatic, catalogue, live_catalogue, scan_literal, scan_models

CLI = Path(models_cmd.__file__).resolve().parent
MAX_FUNCTION_LINES = 80   # run_cmd.register was 259 lines of closures before issue 29
HEAVY = ("torch", "numpy", "monai", "lightning", "pandas", "scipy", "sklearn")


def _modules() -> list[Path]:
    files = sorted(CLI.glob("*.py"))
    assert len(files) >= 15
    return files


def test_no_function_in_the_cli_is_longer_than_80_lines():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.name}:{node.name}"] = n
    assert long == {}


def test_commands_are_module_level_functions_composed_by_main():
    """No ``register(app)`` that defines commands as closures: a nested function is never a command."""
    for path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node not in tree.body:
                assert not node.decorator_list, f"{path.name}:{node.lineno}: a decorated nested function"
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "register" for n in tree.body), path.name


def _module_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports that run when the module is imported (``if TYPE_CHECKING:`` blocks are types only)."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        for n in ast.walk(node):
            if isinstance(n, ast.Import):
                out += [(n.lineno, a.name) for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
                out.append((n.lineno, n.module))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                break
    return out


def test_cli_modules_import_only_stdlib_typer_rich_and_the_cli_at_module_level():
    """The one deferral mechanism: everything else is imported in the body of the command that runs it."""
    bad = {}
    for path in _modules():
        for line, module in _module_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            top = module.split(".")[0]
            ok = top in sys.stdlib_module_names or top in ("typer", "rich") or module == "medlens.cli" \
                or module.startswith("medlens.cli.")
            if not ok:
                bad[f"{path.name}:{line}"] = module
    assert bad == {}


def _loaded_after(*argv: str) -> tuple[str, set[str]]:
    """Run ``medlens ARGV`` in a fresh interpreter (as the console script does); its output and which of the
    heavy packages it loaded."""
    code = textwrap.dedent(f"""
        import sys
        from medlens.cli.main import main
        rc = main({list(argv)!r})
        print("LOADED", ",".join(m for m in {HEAVY!r} if m in sys.modules), "RC", rc)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "160"})
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1].split()
    assert last[0] == "LOADED" and last[-2:] == ["RC", "0"], r.stdout[-400:]
    return r.stdout, set(filter(None, last[1].split(","))) if len(last) == 4 else set()


@pytest.mark.parametrize("argv", [("--help",), ("models", "list"), ("models", "list", "resnet*"), ("data", "--help"),
                                  ("train", "--help")])
def test_help_and_models_list_import_no_torch(argv):
    out, loaded = _loaded_after(*argv)
    assert loaded == set(), f"medlens {' '.join(argv)} imported {sorted(loaded)}"
    if argv[:2] == ("models", "list"):
        assert "resnet18" in out and ("small_cnn" in out) == (len(argv) == 2)


def test_the_catalogue_read_from_the_source_is_the_live_registry():
    models, classical = live_catalogue()           # imports torch and every architecture
    scanned = scan_models(MODELS)
    assert [e.name for e in scanned] == [e.name for e in models] and len(models) >= 16
    for s, m in zip(scanned, models):
        assert s == m, f"models list would show {s}, the registry holds {m}"
    assert scan_literal(CLASSICAL, "CLASSICAL_MODELS") == classical
    assert catalogue() == (models, classical)       # the shipped package is read without the fallback


@pytest.mark.parametrize("source, reason", [
    ("@register_model('toy', dims=DIMS)\ndef toy(in_channels, num_outputs):\n    pass\n", "not literals"),
    ("def make():\n    @register_model('toy')\n    def toy(in_channels, num_outputs):\n        pass\n", "cannot read"),
    ("def toy(in_channels, num_outputs):\n    pass\n\n\nregister_model('toy')(toy)\n", "cannot read"),
    ("@other\n@register_model('toy')\ndef toy(in_channels, num_outputs):\n    pass\n", "cannot read"),
    ("@register_model('toy')\ndef a(x, y):\n    pass\n\n\n@register_model('toy')\ndef b(x, y):\n    pass\n", "twice"),
])
def test_a_registration_the_scan_cannot_read_exactly_is_not_guessed(tmp_path, source, reason):
    (tmp_path / "toy.py").write_text("from medlens.models.registry import register_model\n\n\n" + source)
    with pytest.raises(NotStatic, match=reason):
        scan_models(tmp_path)


def test_the_scan_reads_a_registration_as_the_registry_records_it(tmp_path):
    (tmp_path / "toy.py").write_text(textwrap.dedent('''
        from medlens.models import registry


        @registry.register_model(dims=(2, 3), task="segmentation")
        def toy_net(in_channels: int, num_outputs: int, *layers, spatial_dims: int = 2, width=8, **kw):
            """
            A toy network.

            More text.
            """
    '''))
    (e,) = scan_models(tmp_path)
    assert (e.name, e.dims, e.task, e.summary) == ("toy_net", (2, 3), "segmentation", "A toy network.")
    assert e.params == ("in_channels", "num_outputs", "layers", "spatial_dims", "width", "kw")
