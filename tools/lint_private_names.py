"""An import-linter contract type: no module imports another module's private name.

``from medlens.engine.train import _fit`` couples the importer to what the imported module calls its own
business: a rename there breaks a module elsewhere without warning. import-linter's built-in contracts see
modules, not names (``private_modules`` covers ``_module`` files only), so this contract reads each module's
``from X import a, _b`` statements (at any depth: function-level imports included) with ``ast``; ``_b``
(one leading underscore, not a dunder) imported from another module of the root package breaks it.

pyproject.toml::

    [tool.importlinter]
    contract_types = ["private_names: tools.lint_private_names.PrivateNamesContract"]

    [[tool.importlinter.contracts]]
    type = "private_names"
    allow = ["medlens.a -> medlens.b._name"]   # optional, each a known exception to remove

``lint-imports`` runs from the repository root, which it puts on ``sys.path``; this file imports nothing of
medlens (reading source only, so checking needs neither torch nor the package's imports).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import grimp
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_file(module: str, package_dirs: dict[str, Path]) -> Path | None:
    root, _, rest = module.partition(".")
    base = package_dirs[root].joinpath(*rest.split(".")) if rest else package_dirs[root]
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_name_imports(graph: grimp.ImportGraph, roots: set[str]) -> list[dict]:
    """Every ``from M import _x`` in the roots' modules where M is another module of a root package."""
    package_dirs = {}
    for root in roots:
        spec = importlib.util.find_spec(root)
        if spec is None or not spec.submodule_search_locations:
            continue
        package_dirs[root] = Path(next(iter(spec.submodule_search_locations)))
    found = []
    for module in sorted(graph.modules):
        if module.partition(".")[0] not in package_dirs:
            continue
        path = _module_file(module, package_dirs)
        if path is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            imported = _resolve(module, path.name == "__init__.py", node)
            if imported.partition(".")[0] not in package_dirs or imported == module:
                continue
            for alias in node.names:
                if _is_private(alias.name):
                    found.append({"importer": module, "imported": imported, "name": alias.name,
                                  "line": node.lineno})
    return found


class PrivateNamesContract(Contract):
    """No module of the root packages imports a private name (``_x``) from another of their modules.

    Options: ``allow`` (optional): ``"importer -> imported._name"`` entries, known exceptions to remove."""

    type_name = "private_names"

    allow = fields.SetField(subfield=fields.StringField(), required=False)

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        roots = {m.partition(".")[0] for m in graph.modules if "." not in m}
        allowed = {a.replace(" ", "") for a in (self.allow or set())}  # type: ignore[union-attr]
        found = private_name_imports(graph, roots)
        broken = [f for f in found if f"{f['importer']}->{f['imported']}.{f['name']}" not in allowed]
        used = {f"{f['importer']}->{f['imported']}.{f['name']}" for f in found}
        warnings = [f"allowed private-name import no longer present: {a}" for a in sorted(allowed - used)]
        return ContractCheck(kept=not broken, warnings=warnings, metadata={"imports": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        output.print_error("Private names may only be used inside the module that defines them:", bold=False)
        output.new_line()
        for f in check.metadata["imports"]:
            output.print_error(f"- {f['importer']} (l.{f['line']}) imports {f['name']} from {f['imported']}",
                               bold=False)
            output.new_line()
