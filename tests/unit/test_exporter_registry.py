"""Export formats are a registry (issue 29): a format is one module registering an ``Exporter``; ``export_run``
and ``serve`` look formats up by name, and the registry imports none of them.

The toy format below is registered from this test module only (no edit anywhere else) and ``export_run`` writes
it, runs its parity check hook, checks its parity against PyTorch on real test images and reports it; a toy
whose file does not reproduce the network is refused with nothing written.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from clirun import medlens
from medlens.errors import ConfigError, MedlensError
from medlens.run import Run
from medlens.run.exporters import (Exporter, get_exporter, list_exporters, register_exporter, report_path,
                                   sha256_of, unregister_exporter)
from medlens.run.exporters.registry import _temp_pattern
from probes import one_line_error

SRC = Path(__file__).resolve().parents[2] / "src" / "medlens"
TOY = "toy-state-dict"


class StateDictExporter(Exporter):
    """A toy format: the network's state dict (``torch.save``), loaded back into a copy of the run's network."""

    name = TOY
    label = "state dict"
    file_name = "model.toy.pt"
    checked: ClassVar[list[str]] = []   # the names the parity check hook was called with
    scale = 1.0                   # != 1: the file does not reproduce the network (parity must refuse it)

    def write(self, run: Run, path: Path) -> None:
        torch.save({k: v * self.scale if v.is_floating_point() else v for k, v in run.model.state_dict().items()},
                   path)

    def load(self, path: Path, run: Run, *, threads: int | None = None, data: bytes | None = None):
        net = copy.deepcopy(run.model)
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()

    def check(self, net, run: Run, name: str) -> None:
        self.checked.append(name)


@pytest.fixture
def toy():
    register_exporter(StateDictExporter)
    StateDictExporter.checked.clear()
    yield get_exporter(TOY)
    unregister_exporter(TOY)
    StateDictExporter.scale = 1.0


def test_the_registry_imports_none_of_the_formats():
    tree = ast.parse((SRC / "run" / "exporters" / "registry.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported & {"medlens.run.exporters.onnx_exporter", "medlens.run.exporters.torchscript_exporter"} == set()
    assert not any(m and m.startswith("medlens.run.exporters.") and not m.endswith(".base") for m in imported), imported
    assert [e.name for e in list_exporters()][:2] == ["onnx", "torchscript"]
    onnx = get_exporter("onnx")
    assert onnx.servable and onnx.files() == {"model.onnx": "onnx", "model.int8.onnx": "onnx-int8"}
    assert not get_exporter("torchscript").servable


def test_an_unknown_format_is_one_line_with_did_you_mean():
    with pytest.raises(ConfigError, match=r"--format must be one of onnx, torchscript.*not 'onxx' "
                                          r"\(did you mean 'onnx'\?\)") as e:
        get_exporter("onxx")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not 'tflite'$"):
        get_exporter("tflite")


def test_register_and_unregister_a_toy_format(toy):
    assert get_exporter(TOY) is toy and TOY in [e.name for e in list_exporters()]
    with pytest.raises(ValueError, match="registered twice"):
        register_exporter(StateDictExporter)

    class Clash(Exporter):
        name, file_name = "clash", "model.onnx"

    with pytest.raises(ValueError, match=r"writes \['model.onnx'\], which another format writes"):
        register_exporter(Clash)
    unregister_exporter(TOY)
    with pytest.raises(ConfigError, match=f"not '{TOY}'"):
        get_exporter(TOY)


@pytest.mark.integration
def test_export_run_writes_a_format_registered_here(toy, trained_run, tmp_path):
    import shutil

    from medlens.workflow.export import export_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    stale = run / "export" / ".model.toy.pt.abcd1234.tmp.toy.pt"   # what an export killed half-way leaves
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"half")
    assert _temp_pattern("model.toy.pt").fullmatch(stale.name)
    logs: list[str] = []
    report = export_run(run, TOY, n_parity=16, log=logs.append)
    out = run / "export" / "model.toy.pt"
    assert out.is_file() and not stale.exists()
    assert report["format"] == TOY and report["file"] == "model.toy.pt" and report["parity_data"] == "16 test image(s)"
    assert report["max_abs_prob_diff"] < 1e-6
    assert StateDictExporter.checked == ["model.toy.pt"]        # the hook saw the file under its final name
    assert report["sha256"] == {"model.toy.pt": sha256_of(out)}
    assert json.loads(report_path(run, TOY).read_text())["file"] == "model.toy.pt"
    assert any(s.startswith(f"parity {TOY} vs PyTorch") for s in logs), logs
    assert "removed 1 temporary file(s)" in logs[0]
    # the format is looked up by name: no 'fmt' branch knows it, and quantisation is the formats' own offer
    with pytest.raises(ConfigError, match=r"INT8 quantisation is for ONNX exports \(--format onnx\)"):
        export_run(run, TOY, quantize="int8")


@pytest.mark.integration
def test_a_registered_format_that_breaks_parity_is_refused(toy, trained_run, tmp_path):
    import shutil

    from medlens.workflow.export import export_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    StateDictExporter.scale = 1.5
    with pytest.raises(MedlensError, match="exported model differs from PyTorch by .* nothing written"):
        export_run(run, TOY, n_parity=16)
    assert not (run / "export" / "model.toy.pt").exists() and not report_path(run, TOY).exists()
    assert [p.name for p in (run / "export").iterdir()] == []
    assert Run.open(run).meta.exports is None


def test_the_cli_names_an_unknown_format_in_one_line(tmp_path):
    one_line_error(medlens("export", tmp_path, "--format", "onnxx", "--n", "8"), "--format must be one of",
                   "did you mean 'onnx'")


@pytest.mark.integration
def test_a_registered_format_records_its_hash_under_its_own_key(toy, trained_run, tmp_path, monkeypatch):
    """A new format's ``record_key`` needs no edit of ``RunMeta``: run.json keeps its SHA-256 under that key and
    reads back; a key that is not a short lower-case name (a hostile run.json) is refused."""
    import shutil

    from medlens.run.meta import RunMeta
    from medlens.workflow.export import export_run

    monkeypatch.setattr(StateDictExporter, "record_key", "toy-state")
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    export_run(run, TOY, n_parity=8)
    rec = Run.open(run).meta.exports
    assert rec is not None and set(rec) == {"toy-state"}, rec
    assert rec["toy-state"].sha256 == sha256_of(run / "export" / "model.toy.pt")
    meta = json.loads((run / "run.json").read_text())
    record = meta["exports"]["toy-state"]
    for bad in ("../onnx", "ONNX", "", "x" * 40):
        meta["exports"] = {bad: record}
        with pytest.raises(Exception, match="exports"):
            RunMeta.model_validate(meta)
