"""Issue 29: the workflow's structure, measured.

- ``medlens.workflow.train`` talks to the task paths and the run life-cycle only: at most 12 medlens modules
  imported directly (grimp, in-function imports included; 21 before issue 29), and no cycle
  (``workflow.anomaly`` once imported ``workflow.train``'s private ``_write_start`` and was imported by it).
- the import-linter contracts of pyproject.toml forbid a cycle and a private name imported across modules:
  shown on a small package that has both, checked by the real ``lint-imports``.
- the run life-cycle (``workflow.lifecycle``): a folder is checked before anything is written, a second
  writer is refused in one line while the first holds the lock, and the start writes ``run.json`` with
  status ``training`` and ``config.yaml``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from medlens.config import config_from_dict
from medlens.errors import MedlensError
from medlens.run import InputPrep, RunMeta
from medlens.workflow.lifecycle import RunStart, write_start

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("medlens")


def test_train_imports_at_most_twelve_medlens_modules_and_no_workflow_cycle(graph):
    direct = graph.find_modules_directly_imported_by("medlens.workflow.train")
    assert len(direct) <= 12, sorted(direct)
    assert "medlens.workflow.lifecycle" in direct
    # the task paths do not reach back into the orchestrator
    for path in ("medlens.workflow.anomaly", "medlens.workflow.classifier", "medlens.workflow.segmentation",
                 "medlens.workflow.federate", "medlens.workflow.lifecycle"):
        assert graph.find_shortest_chain(path, "medlens.workflow.train") is None, path


def _package(tmp: Path) -> None:
    pkg = tmp / "toypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "b.py").write_text("def _hidden():\n    return 1\n\n\ndef shown():\n    return 2\n")
    (pkg / "a.py").write_text("from toypkg.b import shown\n\n\ndef f():\n    from toypkg.b import _hidden\n"
                              "    return _hidden() + shown()\n")
    (pkg / "c.py").write_text("import toypkg.d\n")
    (pkg / "d.py").write_text("def g():\n    import toypkg.c\n")


def _lint(tmp: Path, contracts: str) -> subprocess.CompletedProcess:
    (tmp / "lint.toml").write_text(
        '[tool.importlinter]\nroot_package = "toypkg"\n'
        'contract_types = ["private_names: tools.lint_private_names.PrivateNamesContract"]\n' + contracts)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT)])}
    return subprocess.run([str(LINT), "lint.toml", "--no-cache"], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_contracts_break_on_a_cycle_and_on_a_private_name(tmp_path):
    _package(tmp_path)
    r = _lint(tmp_path, '[[tool.importlinter.contracts]]\nname = "acyclic"\ntype = "acyclic_siblings"\n'
                        'ancestors = ["toypkg"]\n\n'
                        '[[tool.importlinter.contracts]]\nname = "private names"\ntype = "private_names"\n')
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "acyclic BROKEN" in out and "private names BROKEN" in out, out
    assert "toypkg.a (l.5) imports _hidden from toypkg.b" in out, out
    assert "imports shown" not in out

    # an allowed exception keeps the contract; the rest of the package is clean
    (tmp_path / "toypkg" / "d.py").write_text("def g():\n    return 0\n")
    r = _lint(tmp_path, '[[tool.importlinter.contracts]]\nname = "acyclic"\ntype = "acyclic_siblings"\n'
                        'ancestors = ["toypkg"]\n\n'
                        '[[tool.importlinter.contracts]]\nname = "private names"\ntype = "private_names"\n'
                        'allow = ["toypkg.a -> toypkg.b._hidden"]\n')
    assert r.returncode == 0, r.stdout + r.stderr
    assert "acyclic KEPT" in r.stdout and "private names KEPT" in r.stdout


def test_the_project_keeps_its_import_contracts():
    r = subprocess.run([str(LINT), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for contract in ("no import cycle between sibling medlens modules", "no private name (_x) imported"):
        assert contract in r.stdout


def _meta() -> RunMeta:
    return RunMeta(task="binary", model="small_cnn", in_channels=1, n_outputs=1, input_size=[28, 28],
                   class_names=["normal", "pneumonia"],
                   preprocessing=InputPrep(spatial_dims=2, size=[28, 28], mean=[0.0], std=[1.0]))


def test_the_life_cycle_checks_locks_and_starts_a_run(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(MedlensError, match="not a medlens run"):
        RunStart(foreign, overwrite=True)  # refused at once: nothing is written or removed
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]

    path = tmp_path / "run"
    cfg = config_from_dict({"name": "run", "data": {"source": "medmnist", "name": "pneumoniamnist"}}, "test")
    with RunStart(path) as from_checkpoint:
        assert from_checkpoint is False and (path / ".medlens-run").is_file()
        with pytest.raises(MedlensError, match="another medlens process is writing this run folder"):
            with RunStart(path, overwrite=True):
                pass
        meta = _meta()
        meta.status = "complete"
        write_start(cfg, meta, path)
    assert json.loads((path / "run.json").read_text())["status"] == "training"
    assert "pneumoniamnist" in (path / "config.yaml").read_text()
    assert not [p for p in path.iterdir() if ".tmp" in p.name]
