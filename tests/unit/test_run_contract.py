"""The run contract, the layering and the review fixes that need no training."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medlens.errors import DataError, MedlensError
from medlens.run.meta import SCHEMA_VERSION, RunMeta

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "medlens"


def _meta_dict(**over) -> dict:
    d = {"schema_version": SCHEMA_VERSION, "task": "binary", "model": "small_cnn", "in_channels": 1,
         "n_outputs": 1, "input_size": [28, 28], "class_names": ["a", "b"],
         "preprocessing": {"spatial_dims": 2, "size": [28, 28], "mean": [0.5], "std": [0.2]}}
    d.update(over)
    return d


def test_run_meta_round_trip_and_one_line_refusals(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    with pytest.raises(MedlensError, match="not a medlens run folder"):
        RunMeta.load(run)
    (run / "run.json").write_text(json.dumps(_meta_dict(schema_version=1)))
    with pytest.raises(MedlensError, match=f"schema version 1 .* reads version {SCHEMA_VERSION}") as e:
        RunMeta.load(run)
    assert "\n" not in str(e.value)
    (run / "run.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt run.json"):
        RunMeta.load(run)
    (run / "run.json").write_text(json.dumps(_meta_dict(task="survival")))
    with pytest.raises(DataError, match="invalid run.json \\(task"):
        RunMeta.load(run)
    meta = RunMeta.model_validate(_meta_dict(threshold={"rule": "youden", "value": 0.37}))
    meta.save(run)
    back = RunMeta.load(run)
    assert back == meta and back.threshold.value == 0.37 and back.spatial_dims == 2
    assert back.preprocessing.spec().size == (28, 28)


def test_run_json_is_parsed_in_one_module_only():
    readers = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if '"run.json"' in p.read_text()
               or "'run.json'" in p.read_text()]
    # the standalone loader is shipped without medlens (it must not import it): issue 25 gives it its own
    # small reader of the few run.json fields it checks an export against
    assert sorted(readers) == ["run/meta.py", "serve/standalone_loader.py"], readers


def test_model_registry_imports_no_architecture():
    tree = ast.parse((SRC / "models" / "registry.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.startswith("medlens.models.") for m in imported), imported
    from medlens.models import list_models

    assert {"small_cnn", "resnet18", "unet"} <= {e.name for e in list_models()}


def test_import_layers_contract_holds():
    r = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    import tomllib

    n = len(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"])
    assert n >= 5    # layers, acyclic siblings, private modules, private names, serve -> workflow forbidden
    assert r.returncode == 0 and f"{n} kept, 0 broken" in r.stdout, r.stdout[-3000:]


def test_validation_scores_match_the_reported_metrics():
    """What training monitors (torchmetrics) equals what evaluation reports (scikit-learn)."""
    from medlens.engine.module import validation_scores
    from medlens.evaluation.metrics import compute_metrics

    rng = np.random.default_rng(3)
    cases = [("binary", rng.integers(0, 2, 300), rng.random(300)),
             ("ordinal", rng.integers(0, 5, 300), rng.dirichlet(np.ones(5), 300)),
             ("multilabel", rng.integers(0, 2, (300, 4)), rng.random((300, 4)))]
    for task, y, p in cases:
        got = validation_scores(task, torch.tensor(p, dtype=torch.float32), torch.tensor(y))
        ref = compute_metrics(task, y, p, 0.5 if task == "binary" else None, n_boot=0)["metrics"]
        assert got["val_auc"] == pytest.approx(ref["auc"]["value"], abs=1e-6)
        assert got["val_acc"] == pytest.approx(ref["medmnist_acc"]["value"], abs=1e-6)
        if task == "ordinal":
            assert got["val_qwk"] == pytest.approx(ref["qwk"]["value"], abs=1e-5)


def test_training_dice_matches_the_evaluation_dice():
    from medlens.engine.segmentation import foreground_dice
    from medlens.evaluation.segmetrics import dice

    rng = np.random.default_rng(0)
    for n in (2, 3):
        a, b = rng.integers(0, n, (40, 50)), rng.integers(0, n, (40, 50))
        assert foreground_dice(a, b, n) == pytest.approx(np.mean([dice(a == k, b == k) for k in range(1, n)]),
                                                         abs=1e-6)
    empty = np.zeros((8, 8), int)
    assert foreground_dice(empty, empty, 2) == 1.0


def test_splits_do_not_depend_on_the_string_hash_seed():
    """PYTHONHASHSEED only acts at start-up, so medlens must not depend on it: two interpreters with
    different hash seeds split string patient ids identically."""
    code = ("import json,numpy as np;from medlens.data.splits import patient_split;"
            "ids=[f'patient-{i%37}' for i in range(300)];y=np.array([i%3==0 for i in range(300)],int);"
            "print(json.dumps([sorted(map(int,s)) for s in patient_split(y,ids,0.2,0.2,seed=5)]))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")]
    assert outs[0] and outs[0] == outs[1]
    from medlens.engine.train import seed_everything

    before = os.environ.get("PYTHONHASHSEED")
    seed_everything(11)
    assert os.environ.get("PYTHONHASHSEED") == before  # no ineffective claim of control


def test_debug_flag_is_parsed_not_scanned(tmp_path):
    """A file argument that happens to read '--debug' must not switch on tracebacks; the option does.
    ``main`` parses the flag, so the console script's entry point is called in this process (tests/clirun.py,
    which prints an escaping exception's traceback as the interpreter would)."""
    from clirun import medlens

    r = medlens("predict", tmp_path / "norun", "--", "--debug")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "run folder not found" in r.stderr
    r = medlens("--debug", "predict", tmp_path / "norun", "x.png")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_unique_output_stems(tmp_path):
    from medlens.utils import unique_stems

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "series").mkdir()
    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "c.nii.gz", tmp_path / "series",
             tmp_path / "b" / "X.jpg"]
    assert unique_stems(files) == ["x", "x-2", "c", "series", "X-3"]


def test_report_sections_are_data_and_unknown_ones_are_skipped(tmp_path):
    from medlens.run.sections import read_sections, write_section

    write_section(tmp_path, "explanations", "Explanations", {"method": "gradcam", "groups": []})
    (tmp_path / "report_sections" / "raw.json").write_text(json.dumps({"title": "x", "html": "<b>x</b>"}))
    (tmp_path / "report_sections" / "bad.json").write_text("{")
    sections, skipped = read_sections(tmp_path)
    assert [s["kind"] for s in sections] == ["explanations"]
    assert sorted(skipped) == ["bad.json (not JSON)", "raw.json (not a medlens section)"]
    with pytest.raises(ValueError):
        write_section(tmp_path, "html", "x", {})


@pytest.mark.parametrize("color,clahe,bits", [("gray", False, 8), ("green", True, 8), ("rgb", False, 8),
                                              ("gray", False, 16)])
def test_training_data_and_predictor_prepare_identical_tensors(tmp_path, color, clahe, bits):
    """One preparation path: a file loaded for training equals the same file prepared for prediction."""
    from PIL import Image as PILImage

    from medlens.config import config_from_dict
    from medlens.run import Predictor, Run
    from medlens.transforms.preprocess import prepared_data

    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    files = []
    for k in range(12):
        cls = root / ("a" if k % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        if bits == 16:
            arr = (rng.random((37, 53)) * 60000).astype(np.uint16)
        else:
            arr = (rng.random((37, 53, 3)) * 255).astype(np.uint8) if color != "gray" else \
                (rng.random((37, 53)) * 255).astype(np.uint8)
        f = cls / f"img{k:02d}.png"
        PILImage.fromarray(arr).save(f)
        files.append(f)
    cfg = config_from_dict({"data": {"source": "folder", "path": str(root), "size": 24, "color": color,
                                     "clahe": clahe, "val_fraction": 0.25, "test_fraction": 0.25}})
    data = prepared_data(cfg.data, seed=0)
    c = data.train.in_channels
    meta = RunMeta.model_validate(_meta_dict(in_channels=c, input_size=[24, 24], preprocessing={
        "spatial_dims": 2, "size": [24, 24], "color": color, "clahe": clahe, "mean": [0.0] * c, "std": [1.0] * c}))
    predictor = Predictor(Run(tmp_path, meta, cfg))
    for split in ("train", "val", "test"):
        ds = data.get(split)
        x, _ = ds.batch(np.arange(len(ds)))
        for i, src in enumerate(ds.sources):
            np.testing.assert_array_equal(x[i].numpy(), predictor.prepare(src))
