"""Run files validated like inputs, and exported models bound to their run (issue 25, Deliver 4 and 5).

Hostile run folders are copies of the shared tiny PneumoniaMNIST run with run.json or the ONNX file edited,
driven through the real ``predict``/``export``/``serve`` code and the standalone loader.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clirun import medlens

REPO = Path(__file__).resolve().parents[2]
LOADER = REPO / "src" / "medlens" / "serve" / "standalone_loader.py"


def one_line_error(r, *needles, json_logs: bool = False) -> str:
    """One error line naming what is wrong (``json_logs``: serve's structured JSON log lines set aside)."""
    assert r.returncode != 0, r.stdout[-1000:]
    lines = [ln for ln in r.stderr.strip().splitlines()
             if ln.strip() and not (json_logs and ln.startswith('{"ts":'))]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--debug" not in lines[0], lines[0]   # the CLI's last-resort line for an unexpected exception
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    return dst


def edit_run_json(run: Path, fn) -> None:
    p = run / "run.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))   # NaN and Infinity as Python's json writes them (what a hand edit gives)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def png(tmp_path_factory, data_root) -> Path:
    d = np.load(data_root / "medmnist" / "pneumoniamnist.npz")
    p = tmp_path_factory.mktemp("png") / "xray.png"
    Image.fromarray(d["test_images"][0]).save(p)
    return p


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    """The shared run, exported to ONNX by a real ``medlens export`` after one was killed (kill -9) half-way."""
    run = copy_run(trained_run, tmp_path_factory.mktemp("exp") / "run")
    export = run / "export"
    proc = subprocess.Popen([sys.executable, "-m", "medlens.cli.main", "export", str(run), "--n", "200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if export.is_dir() and any(f.name.startswith(".model.onnx.") for f in export.iterdir()):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "export finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    left = sorted(f.name for f in export.iterdir() if f.name.startswith("."))
    assert left and all(".tmp." in f for f in left), left   # the leftovers of the killed export
    (export / ".model.onnx.NOT-OURS.tmp.onnx").write_bytes(b"someone else's")   # not medlens's name pattern
    (export / "notes.tmp.onnx").write_bytes(b"keep")
    r = medlens("export", run, "--n", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(f.name for f in export.iterdir())
    assert not any(n in names for n in left), names          # cleaned by the next export
    assert ".model.onnx.NOT-OURS.tmp.onnx" in names and "notes.tmp.onnx" in names   # only medlens's own
    return run


def load_loader():
    spec = importlib.util.spec_from_file_location("standalone_loader_under_test", LOADER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- run.json refused field by field
def _set(path: str, value):
    def fn(d):
        *head, last = path.split(".")
        for k in head:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    return fn


HOSTILE = [
    ("threshold.value", math.nan, "threshold.value"),
    ("threshold.value", math.inf, "threshold.value"),
    ("threshold.value", -5.0, "threshold.value"),
    ("threshold.value", 7.0, "threshold.value"),
    ("calibration.params.a", math.nan, "calibration.params: a is nan"),
    ("calibration.params.a", -1.3, "calibration.params: a is -1.3: a Platt slope must be > 0"),
    ("calibration.params.b", KeyError, "calibration.params: platt calibration takes a and b; 'b' is missing"),
    ("calibration", {"method": "temperature", "params": {"t": 0.0}, "fitted_on": "val", "n": 10},
     "calibration.params: t is 0.0"),
    ("calibration.params.a", 1e308, "Platt fit on logits stays within"),
    ("class_names", [], "class_names"),
    ("class_names", ["pneumonia"], "class_names"),
    ("class_names", ["normal", "normal"], "class_names"),
    ("preprocessing.size", [0, 28], "preprocessing.size: [0, 28]"),
    ("preprocessing.size", [-28, 28], "preprocessing.size: [-28, 28]"),
    ("preprocessing.size", [200000, 200000], "preprocessing.size: [200000, 200000]"),
    ("input_size", [200000, 200000], "input_size"),
    ("preprocessing.pixel_spacing", math.nan, "preprocessing.pixel_spacing: nan"),
    ("preprocessing.pixel_spacing", -1.0, "preprocessing.pixel_spacing: -1.0"),
    ("preprocessing.window", "40,0", "preprocessing.window"),
    ("preprocessing.window", "40,nan", "preprocessing.window"),
    ("preprocessing.std", [math.nan], "preprocessing.std"),
    ("input_profile.distance_limit", math.nan, "input_profile.distance_limit: nan"),
    ("input_profile.hist_range", [math.nan, 1.0], "input_profile.hist_range: [nan, 1.0]"),
    ("model_params.widths", [10 ** 12, 16, 32], "model_params: widths[0]"),
    ("model_params.widths", [8, 16, math.inf], "model_params: widths[2]"),
    ("n_outputs", 5, "class_names"),
    ("in_channels", 0, "in_channels"),
]


@pytest.mark.parametrize("field, value, needle", HOSTILE, ids=[f"{f}={v}" for f, v, _ in HOSTILE])
def test_hostile_run_json_is_refused_in_one_line_naming_the_field(trained_run, tmp_path, png, field, value, needle):
    run = copy_run(trained_run, tmp_path / "run")
    edit_run_json(run, _set(field, value))
    r = medlens("predict", run, png)
    one_line_error(r, "run.json", needle)


def test_a_network_far_larger_than_its_weights_is_refused_before_it_is_built(trained_run, tmp_path, png):
    """widths of 65,536 are plain numbers, but the network they describe holds 770 GB of weights: refused
    from a network built on PyTorch's meta device (nothing allocated), not by an out-of-memory kill."""
    run = copy_run(trained_run, tmp_path / "run")
    edit_run_json(run, _set("model_params.widths", [65536, 65536, 65536]))
    t0 = time.monotonic()
    one_line_error(medlens("predict", run, png), "run.json", "does not match the weights")
    assert time.monotonic() - t0 < 60


def test_run_json_nested_100000_deep_is_one_line(trained_run, tmp_path, png):
    run = copy_run(trained_run, tmp_path / "run")
    p = run / "run.json"
    text = p.read_text()
    p.write_text(text.rstrip()[:-1] + ', "transfer": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}")
    one_line_error(medlens("predict", run, png), "run.json", "nested deeper")
    p.write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(medlens("predict", run, png), "run.json", "nested deeper")


def test_genuine_run_still_predicts(trained_run, png):
    r = medlens("predict", trained_run, png)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "normal" in r.stdout or "pneumonia" in r.stdout


def test_non_finite_probabilities_after_calibration_are_refused(trained_run, png):
    """A calibration that slips past validation (set in memory) and yields NaN: the Predictor refuses after
    calibrating, instead of thresholding NaN ("NaN >= t" is False: every input 'normal')."""
    from medlens.errors import DataError
    from medlens.run import Calibration, Predictor, Run

    run = Run.open(trained_run)
    run.meta.calibration = Calibration.model_construct(method="platt", params={"a": math.nan, "b": 0.0}, n=10,
                                                       fitted_on="val")
    with pytest.raises(DataError, match="non-finite probabilities after platt calibration"):
        Predictor(run).predict_files([str(png)])
    with pytest.raises(ValueError, match="a is nan"):   # and the same value is refused when validated
        Calibration.model_validate(run.meta.calibration.model_dump())


# ---------------------------------------------------------------- status: complete, or --allow-incomplete
def test_a_run_that_did_not_finish_is_refused_by_predict_export_and_serve(trained_run, tmp_path, png):
    from medlens.errors import MedlensError, MedlensWarning
    from medlens.serve.models import ServedModel

    run = copy_run(trained_run, tmp_path / "run")
    edit_run_json(run, _set("status", "training"))
    one_line_error(medlens("predict", run, png), "run is in state 'training'", "--allow-incomplete")
    one_line_error(medlens("export", run, "--n", "8"), "run is in state 'training'")
    assert not (run / "export" / "model.onnx").exists()
    with pytest.raises(MedlensError, match="run is in state 'training'"):
        ServedModel(run)
    ok = medlens("predict", run, png, "--allow-incomplete")
    assert ok.returncode == 0 and "state 'training'" in ok.stderr, ok.stderr[-2000:]
    with pytest.warns(MedlensWarning, match="state 'training'.*used anyway"):
        assert ServedModel(run, allow_incomplete=True).meta.status == "training"
    edit_run_json(run, _set("status", "failed"))
    one_line_error(medlens("predict", run, png), "run is in state 'failed'")
    # the real serve command refuses before it binds (a process: it would otherwise serve for ever)
    r = subprocess.run([sys.executable, "-m", "medlens.cli.main", "serve", str(run), "--port", "0"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    one_line_error(r, "run is in state 'failed'", json_logs=True)


# ---------------------------------------------------------------- exported models bound to their run
def _hostile_graph(genuine: Path, out: Path, n_out: int = 1) -> Path:
    """A graph with the run's input, the run's metadata (weights hash included) and a constant answer:
    logit 10 for every input, i.e. 'pneumonia' with probability 1.0."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    props = {p.key: p.value for p in onnx.load(str(genuine)).metadata_props}
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])
    outp = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])
    nodes = [helper.make_node("ReduceSum", ["input", "axes"], ["s"], keepdims=0),   # (N, 1)
             helper.make_node("Mul", ["s", "zero"], ["z"]),
             helper.make_node("Add", ["z", "ten"], ["one"])]
    if n_out == 2:
        nodes.append(helper.make_node("Concat", ["one", "one"], ["logits"], axis=1))
    else:
        nodes[-1] = helper.make_node("Add", ["z", "ten"], ["logits"])
    inits = [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(10.0, np.float32), "ten")]
    model = helper.make_model(helper.make_graph(nodes, "constant", [inp], [outp], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def test_export_records_the_sha256_of_the_file_itself(exported):
    from medlens.run import Run
    from medlens.serve.models import ServedModel

    rec = Run.open(exported).meta.exports["onnx"]
    onnx_file = exported / "export" / "model.onnx"
    assert rec.file == "model.onnx" and rec.sha256 == sha256(onnx_file) and rec.bytes == onnx_file.stat().st_size
    assert json.loads((exported / "export" / "export-onnx.json").read_text())["sha256"]["model.onnx"] == rec.sha256
    assert ServedModel(exported).backend == "onnxruntime"   # the genuine export is served


def test_torchscript_export_is_recorded_too(exported, tmp_path):
    from medlens.run import Run
    from medlens.workflow.export import export_run

    run = copy_run(exported, tmp_path / "run")
    export_run(run, "torchscript", n_parity=8)
    exports = Run.open(run).meta.exports
    ts = run / "export" / "model.torchscript.pt"
    assert exports["torchscript"].sha256 == sha256(ts) and exports["onnx"].sha256 == sha256(run / "export" / "model.onnx")


def test_serve_refuses_a_constant_graph_that_copies_the_metadata(exported, tmp_path):
    import onnxruntime as ort

    from medlens.errors import MedlensError
    from medlens.serve.models import ServedModel

    run = copy_run(exported, tmp_path / "run")
    target = run / "export" / "model.onnx"
    _hostile_graph(exported / "export" / "model.onnx", target)
    s = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((3, 1, 28, 28), np.float32)
    assert np.allclose(1 / (1 + np.exp(-s.run(None, {"input": x})[0])), 1.0, atol=1e-4)   # 'pneumonia 1.0'
    assert s.get_modelmeta().custom_metadata_map["medlens.weights_sha256"] == sha256(run / "model.pt")
    with pytest.raises(MedlensError, match="SHA-256 differs") as e:
        ServedModel(run)
    assert "\n" not in str(e.value)
    with pytest.raises(MedlensError, match="SHA-256 differs"):
        ServedModel(run, backend="onnx")


def test_serve_checks_the_graph_shapes_against_the_run(exported, tmp_path):
    """Even a file whose hash run.json records must have the run's output shape: (N, 1) for a binary run."""
    from medlens.errors import DataError
    from medlens.serve.models import ServedModel

    run = copy_run(exported, tmp_path / "run")
    target = _hostile_graph(exported / "export" / "model.onnx", run / "export" / "model.onnx", n_out=2)
    edit_run_json(run, _set("exports.onnx.sha256", sha256(target)))
    with pytest.raises(DataError, match=r"output is tensor\(float\) \(\?, 2\); the run \(binary, 2 classes\) "
                                        r"needs tensor\(float\) \(N, 1\)"):
        ServedModel(run)


def test_serve_refuses_an_export_that_run_json_does_not_record(exported, tmp_path):
    from medlens.errors import MedlensError
    from medlens.serve.models import ServedModel

    run = copy_run(exported, tmp_path / "run")
    edit_run_json(run, _set("exports", KeyError))
    with pytest.raises(MedlensError, match="records no SHA-256 for model.onnx"):
        ServedModel(run)


def test_standalone_loader_bound_to_its_run(exported, tmp_path, png, capsys):
    loader = load_loader()
    genuine = exported / "export" / "model.onnx"
    m = loader.ExportedModel(genuine, run=exported)
    assert m.predict(str(png))["prediction"] in ("normal", "pneumonia")
    hostile = _hostile_graph(genuine, tmp_path / "model.onnx")
    assert loader.ExportedModel(hostile).predict(str(png))["probability"] > 0.999   # alone it cannot tell
    with pytest.raises(loader.ExportError, match="SHA-256"):
        loader.ExportedModel(hostile, run=exported)
    assert loader.main([str(hostile), str(png), "--run", str(exported)]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "SHA-256" in err[0], err


def _with_metadata(src: Path, dst: Path, **changes) -> Path:
    import onnx

    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    for k, fn in changes.items():
        key = "medlens." + k
        props[key] = json.dumps(fn(json.loads(props[key])))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dst))
    return dst


STANDALONE = [
    ("threshold", lambda t: {**t, "value": math.nan}, "threshold value"),
    ("threshold", lambda t: {**t, "value": 7}, "not a probability"),
    ("preprocessing", lambda p: {**p, "window": "40,0", "window_level_width": [40, 0]}, "window width"),
    ("preprocessing", lambda p: {**p, "window": "40,-5", "window_level_width": [40, -5]}, "window width"),
    ("calibration", lambda c: {"method": "temperature", "params": {"t": 0}, "n": 10}, "temperature"),
    ("calibration", lambda c: {"method": "platt", "params": {"a": -1.0, "b": 0.0}, "n": 10}, "slope"),
    ("calibration", lambda c: {"method": "platt", "params": {"a": 1e308, "b": 0.0}, "n": 10}, "slope"),
    ("calibration", lambda c: {"method": "platt", "params": {"a": 1.0}, "n": 10}, "platt takes a and b"),
    ("preprocessing", lambda p: {**p, "size": [200000, 200000]}, "preprocessing size"),
    ("preprocessing", lambda p: {**p, "size": [0, 28]}, "preprocessing size"),
    ("class_names", lambda c: ["pneumonia"], "class_names"),
]


@pytest.mark.parametrize("key, fn, needle", STANDALONE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(STANDALONE)])
def test_standalone_loader_refuses_hostile_metadata(exported, tmp_path, key, fn, needle):
    loader = load_loader()
    bad = _with_metadata(exported / "export" / "model.onnx", tmp_path / "model.onnx", **{key: fn})
    with pytest.raises(loader.ExportError, match=needle) as e:
        loader.ExportedModel(bad)
    assert "\n" not in str(e.value)
