"""``medlens export``: ONNX / TorchScript parity with PyTorch on real test images (2D and 3D, classifier and
U-Net), INT8 quantisation, and the ONNX file run without medlens by the standalone loader."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clirun import medlens
from servehelp import tiny_run

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
LOADER = REPO / "src" / "medlens" / "serve" / "standalone_loader.py"


def _torch_probs(run_dir: Path, x: torch.Tensor) -> np.ndarray:
    """The PyTorch reference, computed here from the weights (not through the exporter's code)."""
    from medlens.run import Run

    run = Run.open(run_dir)
    with torch.no_grad():
        z = run.model(x).double()
    return torch.sigmoid(z.reshape(-1)).numpy() if run.meta.n_outputs == 1 else torch.softmax(z, 1).numpy()


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_probs(path_or_session, x: np.ndarray) -> np.ndarray:
    s = path_or_session if hasattr(path_or_session, "run") else _session(path_or_session)
    z = s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0].astype(np.float64)
    return 1 / (1 + np.exp(-z.reshape(-1))) if z.shape[1] == 1 else np.exp(z) / np.exp(z).sum(1, keepdims=True)


def _test_images(run_dir: Path, n: int | None = 200) -> tuple[torch.Tensor, np.ndarray]:
    """n (None: all) real test images of the run's source, prepared as training prepares them, and labels."""
    from medlens.run import Run
    from medlens.transforms.preprocess import prepared_data

    cfg = Run.open(run_dir).config
    ds = prepared_data(cfg.data.model_copy(update={"max_samples": None}), seed=cfg.seed).test
    n = len(ds) if n is None else n
    assert len(ds) >= n
    x, _ = ds.batch(np.arange(n))
    return torch.as_tensor(x).float(), np.asarray(ds.labels)[:n]


def test_onnx_2d_classifier_parity_int8_and_metadata(trained_run, tmp_path):
    from sklearn.metrics import roc_auc_score

    from medlens.run.exporters import onnx_path, report_path
    from medlens.workflow.export import export_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    report = export_run(run, "onnx", quantize="int8")
    x, labels = _test_images(run)
    ref = _torch_probs(run, x)
    onnx_file = onnx_path(run)
    got = _ort_probs(onnx_file, x.numpy())          # all 200 in one batch
    one = _ort_probs(onnx_file, x[:1].numpy())       # and a batch of one: the batch axis is dynamic
    assert got.shape == ref.shape == (200,)
    assert np.abs(got - ref).max() < 1e-4 and np.abs(one - ref[:1]).max() < 1e-4
    assert report["max_abs_prob_diff"] < 1e-4 and json.loads(report_path(run).read_text())["file"] == "model.onnx"

    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    from medlens.run import Run

    m = Run.open(run).meta
    assert json.loads(meta["medlens.class_names"]) == ["normal", "pneumonia"]
    assert json.loads(meta["medlens.threshold"])["value"] == pytest.approx(m.threshold.value)
    assert json.loads(meta["medlens.preprocessing"])["size"] == [28, 28]
    assert meta["medlens.activation"] == "sigmoid"

    # INT8: the AUC change on the whole test split, recomputed here from the two files
    xt, yt = _test_images(run, None)
    y = yt.reshape(-1)
    auc32 = roc_auc_score(y, _torch_probs(run, xt))
    q8 = _session(onnx_path(run, int8=True))   # one image per call: dynamic quantisation scales each call's activations
    auc8 = roc_auc_score(y, np.concatenate([_ort_probs(q8, xt[i:i + 1].numpy()) for i in range(len(xt))]))
    q = report["int8"]
    assert q["n"] == len(y) == 624 and q["metric"] == "auc"   # the official PneumoniaMNIST test split
    # a binary run's calibration (Platt, a > 0) keeps the ranking, so raw and calibrated AUCs agree (up to
    # near-ties that float32 rounding may reorder)
    assert q["fp32"] == pytest.approx(auc32, abs=1e-4) and q["int8"] == pytest.approx(auc8, abs=1e-4)
    assert q["change"] == pytest.approx(q["int8"] - q["fp32"])
    assert onnx_path(run, int8=True).stat().st_size < onnx_file.stat().st_size


def test_standalone_loader_runs_without_medlens(trained_run, tmp_path, data_root):
    """The exported file + the loader script, in a fresh interpreter where ``import medlens`` fails, give the
    same probabilities and decisions as medlens's Predictor on real PneumoniaMNIST test PNGs."""
    from PIL import Image

    from medlens.run import Predictor, Run
    from medlens.run.exporters import onnx_path

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    # the README's command, run in this process (the fresh interpreter that matters is the loader's, below)
    r = medlens("export", run, "--format", "onnx", "--n", "16", cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "max |prob diff| vs PyTorch" in r.stdout and "model.onnx" in r.stdout
    d = np.load(data_root / "medmnist" / "pneumoniamnist.npz")
    files = []
    for i in range(20):
        f = tmp_path / "png" / f"test_{i}.png"
        f.parent.mkdir(exist_ok=True)
        Image.fromarray(d["test_images"][i]).save(f)
        files.append(f)
    portable = tmp_path / "portable"
    portable.mkdir()
    shutil.copy(LOADER, portable / "standalone_loader.py")
    shutil.copy(onnx_path(run), portable / "model.onnx")
    block = ("import sys\n"
             "class NoMedlens:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'medlens' or name.startswith('medlens.'):\n"
             "            raise ImportError('medlens is blocked in this test')\n"
             "sys.meta_path.insert(0, NoMedlens())\n"
             "try:\n    import medlens\n    raise SystemExit('medlens importable')\nexcept ImportError:\n    pass\n"
             "import runpy\n"
             "sys.argv = ['standalone_loader.py', 'model.onnx'] + sys.argv[1:]\n"
             "runpy.run_path('standalone_loader.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-I", "-c", block, *map(str, files)], cwd=portable, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    ref = Predictor(Run.open(run)).predict_files([str(f) for f in files])
    assert len(rows) == len(ref) == 20
    for a, b in zip(rows, ref):
        assert a["prediction"] == b.prediction
        assert abs(a["probabilities"]["pneumonia"] - b.probabilities["pneumonia"]) < 1e-4
        assert a["threshold"] == pytest.approx(b.threshold)


def test_onnx_and_torchscript_3d_classifier_parity(tmp_path_factory):
    from medlens.run.exporters import TORCHSCRIPT_FILE, export_dir, onnx_path
    from medlens.workflow.export import export_run

    run = tiny_run("a3d", tmp_path_factory)
    x, _ = _test_images(run)
    assert tuple(x.shape[1:]) == (1, 28, 28, 28)
    ref = _torch_probs(run, x)
    export_run(run, "onnx")
    assert np.abs(_ort_probs(onnx_path(run), x.numpy()) - ref).max() < 1e-4
    export_run(run, "torchscript")
    ts = torch.jit.load(str(export_dir(run) / TORCHSCRIPT_FILE))   # a file this test made
    with torch.no_grad():
        z = ts(x).double()
    assert np.abs(torch.sigmoid(z.reshape(-1)).numpy() - ref).max() < 1e-4


@pytest.mark.parametrize("kind", ["unet2d", "unet3d"])
def test_unet_sliding_window_parity(kind, tmp_path_factory):
    """U-Nets are exported per window; sliding-window inference over whole real test images with the ONNX
    model matches PyTorch, and INT8 reports its Dice change (3D)."""
    from monai.inferers import sliding_window_inference

    from medlens.engine.segmentation import to_probs
    from medlens.run import Run
    from medlens.run.exporters import OrtNet, onnx_path
    from medlens.transforms.preprocess import prepared_segmentation
    from medlens.workflow.export import export_run

    run_dir = tiny_run(kind, tmp_path_factory)
    report = export_run(run_dir, "onnx", quantize="int8" if kind == "unet3d" else None)
    run = Run.open(run_dir)
    cases = prepared_segmentation(run.config.data, run.config.segmentation, seed=run.config.seed).test
    assert cases
    ort_net = OrtNet(onnx_path(run_dir))
    patch = tuple(run.meta.input_size)
    worst = 0.0
    for c in cases:   # sliding windows written here with MONAI directly, both networks the same way
        x = torch.as_tensor(c.image)[None].float()
        with torch.no_grad():
            a = sliding_window_inference(x, patch, 4, lambda t: to_probs(run.model(t)), overlap=0.25, mode="gaussian")
            b = sliding_window_inference(x, patch, 4, lambda t: to_probs(ort_net(t)), overlap=0.25, mode="gaussian")
        assert a.shape[2:] == x.shape[2:]
        worst = max(worst, float((a - b).abs().max()))
    assert worst < 1e-4
    assert report["max_abs_prob_diff"] < 1e-4
    if kind == "unet3d":
        q = report["int8"]
        assert q["metric"] == "dice" and q["n"] == len(cases) and 0.0 <= q["int8"] <= 1.0
        assert q["change"] == pytest.approx(q["int8"] - q["fp32"])


def test_export_refuses_bad_options(trained_run, tmp_path):
    from medlens.errors import ConfigError
    from medlens.workflow.export import export_run

    with pytest.raises(ConfigError, match="--format"):
        export_run(trained_run, "tflite")
    with pytest.raises(ConfigError, match="ONNX"):
        export_run(trained_run, "torchscript", quantize="int8")
