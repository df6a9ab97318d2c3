"""``medlens export``: a trained run as an ONNX (or TorchScript) file that runs without medlens.

The exported graph is the run's network *with* its normalisation (``ClassifierNet``): input (N, C, *spatial)
prepared by ``InputSpec`` (values in the model's scale), output logits; the batch axis is dynamic. U-Nets are
exported per window (the run's patch size) and run by the same sliding-window inference as PyTorch.

What the file carries (ONNX ``metadata_props``; TorchScript ``_extra_files['medlens.json']``), all JSON text:
``medlens.preprocessing`` (the run's ``InputPrep``, and the CT window as numbers), ``medlens.task``,
``medlens.class_names``, ``medlens.threshold`` (validation-chosen), ``medlens.calibration``,
``medlens.activation`` (how logits become probabilities), ``medlens.sliding_window`` (segmenters) and the
weights hash. ``medlens/serve/standalone_loader.py`` reads it with numpy + onnxruntime + Pillow only.

Parity is checked before anything is written: the exported model and PyTorch, both run through ``Predictor``
(the one preparation path; the ONNX session is attached as the run's model), on up to 200 real test images
(classifiers) or every test case by sliding windows (segmenters); the largest |probability difference| must
stay under 1e-4. INT8 dynamic quantisation (ONNX Runtime) is reported as the change of AUC on the whole test
split (classifiers) or of mean Dice over the test cases (segmenters).
Files appear in ``RUN/export/`` atomically, with ``export-<format>.json`` recording parity and quantisation.

Each exported file is bound to its run (issue 25): ``run.json`` records the SHA-256 of the file's own bytes
(``RunMeta.exports``), and whoever loads it (``open_onnx_run`` for ``serve``, the standalone loader given the
run) checks that hash and the graph's input and output shapes against the run's channels, size, task and
classes before running it. A graph that merely copies the metadata (the weights hash included) is refused.
Only finished runs (``status: complete``) are exported unless ``allow_incomplete``. Temporary files of an
export killed half-way (``.model.onnx.<random>.tmp.onnx``) are removed by the next export of that run.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from medlens.errors import ConfigError, DataError, MedlensError
from medlens.run import Predictor, Run, run_lock
from medlens.run.meta import ExportRecord, RunMeta
from medlens.tasks import TaskType
from medlens.utils import atomic_path, write_json_atomic

EXPORT_DIR = "export"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
PARITY_TOL = 1e-4
FORMATS = ("onnx", "torchscript")
OPSET = 17
#: ``RunMeta.exports`` key of each exported file
RECORD_KEYS = {ONNX_FILE: "onnx", INT8_FILE: "onnx-int8", TORCHSCRIPT_FILE: "torchscript"}
MAX_ONNX_BYTES = 2 * 1024 ** 3   # protobuf's own limit for one ONNX file


def report_path(run_dir: str | Path, fmt: str = "onnx") -> Path:
    """``export-onnx.json`` / ``export-torchscript.json``: parity, quantisation and the metadata written."""
    return export_dir(run_dir) / f"export-{fmt}.json"


def export_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EXPORT_DIR


def onnx_path(run_dir: str | Path, int8: bool = False) -> Path:
    return export_dir(run_dir) / (INT8_FILE if int8 else ONNX_FILE)


def activation(task: TaskType | str) -> str:
    """How the exported logits become probabilities (what ``outputs_to_probs`` / ``to_probs`` do)."""
    if task == TaskType.BINARY:
        return "sigmoid"          # (N, 1) -> P(class 1)
    if task == TaskType.MULTILABEL:
        return "sigmoid_each"     # (N, K) independent
    if task == TaskType.SEGMENTATION:
        return "segmentation"     # one channel: sigmoid -> [1 - p, p]; more: softmax over channels
    return "softmax"


def export_metadata(run: Run) -> dict[str, str]:
    """The key/value text stored in the exported file: everything needed to prepare, run and decide."""
    from medlens.io.windows import parse_window

    m = run.meta
    cal = getattr(m, "calibration", None)   # validation-fitted probability calibration, when the run has one
    prep = m.preprocessing.model_dump(mode="json")
    if prep.get("window"):
        prep["window_level_width"] = list(parse_window(prep["window"]))
    out = {
        "medlens.format": "1",
        "medlens.run": run.name,
        "medlens.task": str(m.task.value if hasattr(m.task, "value") else m.task),
        "medlens.class_names": json.dumps(m.class_names),
        "medlens.preprocessing": json.dumps(prep),
        "medlens.input_size": json.dumps(m.input_size),
        "medlens.in_channels": str(m.in_channels),
        "medlens.threshold": json.dumps(m.threshold.model_dump(mode="json") if m.threshold else None),
        "medlens.calibration": json.dumps(cal.model_dump(mode="json") if cal is not None else None),
        "medlens.activation": activation(m.task),
        "medlens.output": "logits",
        "medlens.weights_sha256": run.weights_sha256,
        "medlens.medlens_version": m.medlens_version,
    }
    if m.task == TaskType.SEGMENTATION:
        s = run.config.segmentation
        out["medlens.sliding_window"] = json.dumps({"patch_size": list(m.input_size), "overlap": s.overlap,
                                                    "blend": s.blend, "tta": s.tta})
        out["medlens.label_values"] = json.dumps(m.label_values)
    return out


# ---------------------------------------------------------------- ONNX Runtime as the run's network
class OrtNet(torch.nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` interface ``Predictor`` calls: logits out.

    Attached with ``Run.use_model``, it lets the exported model go through ``Predictor`` exactly like the
    PyTorch one (same preparation, same sliding windows, same decision). No gradients: heatmaps need PyTorch.
    """

    def __init__(self, path: str | Path, threads: int | None = None, data: bytes | None = None,
                 output_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: a server's event loop and request parsing need the cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            # from the bytes that were hashed, when given: the file cannot change between the check and the load
            self.session = ort.InferenceSession(data if data is not None else str(path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for corrupt or foreign files
            raise DataError(f"cannot load ONNX model ({type(e).__name__}: {' '.join(str(e).split())[:160]})",
                            path) from None
        self.path = Path(path)
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.output_shape = output_shape   # (per input, without the batch axis) the run expects; checked per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        out = self.session.run(None, {self.input_name: a})[0]
        if self.output_shape is not None and (out.shape[0] != a.shape[0] or tuple(out.shape[1:]) != self.output_shape):
            raise DataError(f"the ONNX model answered shape {tuple(out.shape)} for {a.shape[0]} input(s); the run "
                            f"expects (N, {', '.join(map(str, self.output_shape))})", self.path.name)
        return torch.from_numpy(out)


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expected_io(meta: RunMeta) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input shape, output shape) of one item, without the batch axis, that the run's exported graph must have:
    (C, *size) in; (n_outputs,) out for classifiers, (n_outputs, *patch) for segmenters."""
    size = tuple(meta.input_size)
    out = (meta.n_outputs, *size) if meta.task == TaskType.SEGMENTATION else (meta.n_outputs,)
    return (meta.in_channels, *size), out


def check_graph(session, meta: RunMeta, name: str) -> None:
    """Refuse a graph whose single float input and output do not have the run's shapes (batch axis free)."""
    want_in, want_out = expected_io(meta)
    ins, outs = session.get_inputs(), session.get_outputs()
    if len(ins) != 1 or len(outs) != 1:
        raise DataError(f"the ONNX graph has {len(ins)} input(s) and {len(outs)} output(s); a medlens export has "
                        "one of each", name)
    for what, arg, want in (("input", ins[0], want_in), ("output", outs[0], want_out)):
        shape = list(arg.shape)
        got = tuple(shape[1:])
        if arg.type != "tensor(float)" or len(shape) != len(want) + 1 or got != want:
            shown = ", ".join(str(d) if isinstance(d, int) else "?" for d in shape)
            raise DataError(f"the ONNX graph's {what} is {arg.type} ({shown}); the run ({meta.task}, "
                            f"{len(meta.class_names)} classes) needs tensor(float) (N, {', '.join(map(str, want))})",
                            name)


def open_onnx_run(run_dir: str | Path, path: str | Path | None = None, threads: int | None = None) -> Run:
    """The run with its exported ONNX model attached (``Predictor(run)`` then runs ONNX Runtime).

    The file must be the one ``medlens export`` wrote for this run: its SHA-256 is the one run.json records,
    its graph's input and output shapes fit the run, and it was made from the run's current weights."""
    run = Run.open(run_dir)
    p = Path(path) if path else onnx_path(run_dir)
    if not p.is_file():
        raise MedlensError(f"no exported model {p.name}; run `medlens export {run_dir} --format onnx` first", p.parent)
    key = RECORD_KEYS.get(p.name)
    record = (run.meta.exports or {}).get(key) if key else None
    if record is None or key == "torchscript":
        raise MedlensError(f"run.json records no SHA-256 for {p.name} (exported by an older medlens, or not by "
                           f"medlens); run `medlens export {run_dir} --format onnx` again", p)
    if p.stat().st_size > MAX_ONNX_BYTES:
        raise DataError(f"{p.stat().st_size:,} bytes, over the {MAX_ONNX_BYTES:,} an ONNX file can hold", p)
    data = p.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise MedlensError("the exported model is not the file `medlens export` wrote for this run (its SHA-256 "
                           "differs from the one run.json records); export again", p)
    if record.weights_sha256 != run.weights_sha256:
        raise MedlensError("the exported model was made from other weights than this run's model.pt; export again",
                           p)
    net = OrtNet(p, threads, data=data, output_shape=expected_io(run.meta)[1])
    check_graph(net.session, run.meta, str(p))
    if net.metadata.get("medlens.weights_sha256") != run.weights_sha256:
        raise MedlensError("the exported model was made from other weights than this run's model.pt; export again",
                           p)
    return run.use_model(net)


def _temp_pattern(name: str) -> re.Pattern:
    """The hidden temporary name ``utils.atomic_path`` gives ``name`` (``.model.onnx.<random>.tmp.onnx``)."""
    suffixes = "".join(Path(name).suffixes)
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp{re.escape(suffixes)}")


def clean_stale_temps(out_dir: Path) -> list[str]:
    """Remove what an export killed half-way left in ``out_dir``: only medlens's own temporary names of the
    export files, only there (call it holding the run's lock, so no export is writing them)."""
    names = (ONNX_FILE, INT8_FILE, TORCHSCRIPT_FILE, report_path(out_dir.parent, "onnx").name,
             report_path(out_dir.parent, "torchscript").name)
    patterns = [_temp_pattern(n) for n in names]
    removed = []
    for f in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        if any(pt.fullmatch(f.name) for pt in patterns) and (f.is_symlink() or f.is_file()):
            f.unlink()
            removed.append(f.name)
    return removed


def _record(run: Run, files: dict[str, Path]) -> None:
    """Write the SHA-256 of each exported file into run.json (atomically; under the run's lock)."""
    meta = RunMeta.load(run.dir)
    exports = dict(meta.exports or {})
    for name, path in files.items():
        exports[RECORD_KEYS[name]] = ExportRecord(file=name, sha256=sha256_of(path), bytes=path.stat().st_size,
                                                  weights_sha256=run.weights_sha256)
    meta.exports = exports
    meta.save(run.dir)
    run.meta.exports = exports


# ---------------------------------------------------------------- writing the files
def _example(run: Run) -> torch.Tensor:
    m = run.meta
    return torch.rand(2, m.in_channels, *m.input_size, generator=torch.Generator().manual_seed(0))


def _write_onnx(run: Run, path: Path) -> None:
    import onnx

    net = run.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (_example(run),), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, export_metadata(run))
    model.doc_string = f"medlens run {run.name}: logits of {run.meta.model} ({run.meta.task})"
    onnx.save(model, str(path))


def _quantize(src: Path, dst: Path, meta: dict[str, str]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # onnxruntime's quantiser logs advice on the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    model = onnx.load(str(dst))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {**meta, "medlens.quantization": "int8-dynamic (onnxruntime)"})
    onnx.save(model, str(dst))


def _write_torchscript(run: Run, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.trace(run.model, _example(run), check_trace=False)
        torch.jit.save(ts, str(path), _extra_files={"medlens.json": json.dumps(export_metadata(run))})


class _TorchScriptNet(torch.nn.Module):
    def __init__(self, path: Path) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.ts = torch.jit.load(str(path), map_location="cpu")  # the file written just now, by this process

    def forward(self, x):
        return self.ts(x)


# ---------------------------------------------------------------- the test data and the comparisons
def _test_inputs(run: Run, n: int):
    """Real test data as prepared model inputs: (x (N, C, ...), labels) for classifiers, cases for segmenters.

    The run's data source with ``max_samples`` lifted, so a run trained on a capped subset still gets
    ``n`` test images (parity compares two encodings of one model; any real image serves)."""
    cfg = run.config
    data_cfg = cfg.data.model_copy(update={"max_samples": None}) if hasattr(cfg.data, "max_samples") else cfg.data
    if run.task == TaskType.SEGMENTATION:
        from medlens.transforms.preprocess import prepared_segmentation

        return prepared_segmentation(data_cfg, cfg.segmentation, seed=cfg.seed).test[:n]
    from medlens.transforms.preprocess import prepared_data

    ds = prepared_data(data_cfg, seed=cfg.seed).test
    idx = np.arange(min(n, len(ds)))
    x, _ = ds.batch(idx)
    return torch.as_tensor(x).float(), ds


def _classifier_probs(predictor: Predictor, x) -> np.ndarray:
    return np.asarray(predictor.predict_arrays(x), np.float64)


def _segment_all(predictor: Predictor, cases) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [predictor.segment_probs(c.image, str(getattr(c, "name", "case"))) for c in cases]


def _score(run: Run, task, probs, labels) -> tuple[str, float]:
    """The headline test score: AUC (classifiers) or mean foreground Dice at the validation threshold."""
    if task == TaskType.SEGMENTATION:
        from medlens.engine.segmentation import foreground_dice

        pred = Predictor(run)
        return "dice", float(np.mean([foreground_dice(pred.labels(p), c.mask, p.shape[0]) for p, c in zip(probs, labels)]))
    from medlens.evaluation.metrics import binary_metrics, multiclass_metrics, multilabel_metrics

    if task == TaskType.BINARY:
        return "auc", binary_metrics(labels, probs, 0.5)["auc"]
    if task == TaskType.MULTILABEL:
        return "auc", multilabel_metrics(labels, probs)["auc"]
    return "auc", multiclass_metrics(labels, probs, ordinal=task == TaskType.ORDINAL)["auc"]


def export_run(run_dir: str | Path, fmt: str = "onnx", quantize: str | None = None, n_parity: int = 200,
               tol: float = PARITY_TOL, log: Callable[[str], None] = lambda s: None,
               allow_incomplete: bool = False) -> dict:
    """Export a run, check parity against PyTorch on real test data, optionally quantise; return the report.

    Writes ``RUN/export/model.onnx`` (or ``model.torchscript.pt``), ``model.int8.onnx`` with
    ``quantize="int8"`` and ``export-<format>.json``, and records each file's SHA-256 in run.json. Refuses
    (and writes nothing) when parity fails, or when the run is not complete (unless ``allow_incomplete``).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'")
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize takes int8, not '{quantize}'")
    if quantize and fmt != "onnx":
        raise ConfigError("INT8 quantisation is for ONNX exports (--format onnx)")
    run = Run.open(run_dir)
    if run.is_classical:
        raise MedlensError("a classical (hand-made features) run has no network to export", run.dir)
    run.require_complete(allow_incomplete)
    run.require_weights()
    with run_lock(run.dir):
        removed = clean_stale_temps(export_dir(run.dir))
        if removed:
            log(f"removed {len(removed)} temporary file(s) left by an interrupted export")
        return _export_locked(run, fmt, quantize, n_parity, tol, log)


def _export_locked(run: Run, fmt: str, quantize: str | None, n_parity: int, tol: float,
                   log: Callable[[str], None]) -> dict:
    torch_pred = Predictor(run)
    task, seg = run.task, run.task == TaskType.SEGMENTATION
    t0 = time.perf_counter()
    data = _test_inputs(run, n_parity)
    if seg:
        cases = data
        if not cases:
            raise DataError("the run's data has no test case to check parity on", run.dir)
        ref = _segment_all(torch_pred, cases)
        what = f"{len(cases)} test case(s), sliding windows {run.meta.input_size}"
    else:
        x, test_ds = data
        ref = _classifier_probs(torch_pred, x)
        what = f"{len(x)} test image(s)"
    log(f"reference: PyTorch on {what} ({time.perf_counter() - t0:.1f} s)")

    out_dir = export_dir(run.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = ONNX_FILE if fmt == "onnx" else TORCHSCRIPT_FILE
    report: dict = {"run": run.name, "format": fmt, "file": name, "task": str(task), "parity_data": what,
                    "tolerance": tol, "weights_sha256": run.weights_sha256, "metadata": export_metadata(run)}

    def compare(net) -> tuple[float, list]:
        other = Predictor(Run.open(run.dir).use_model(net))
        if seg:
            got = _segment_all(other, cases)
            return float(max(np.abs(a - b).max() for a, b in zip(got, ref))), got
        got = _classifier_probs(other, x)
        return float(np.abs(got - ref).max()), got

    with atomic_path(out_dir / name) as tmp:
        (_write_onnx if fmt == "onnx" else _write_torchscript)(run, tmp)
        net = OrtNet(tmp) if fmt == "onnx" else _TorchScriptNet(tmp)
        diff, _ = compare(net)
        report["max_abs_prob_diff"] = diff
        log(f"parity {fmt} vs PyTorch: max |prob diff| = {diff:.2e} (tolerance {tol:g})")
        if not diff < tol:
            raise MedlensError(f"exported model differs from PyTorch by {diff:.2e} in probability (> {tol:g}); "
                               "nothing written", run.dir)
        if quantize:
            with atomic_path(out_dir / INT8_FILE) as qtmp:
                _quantize(tmp, qtmp, export_metadata(run))
                qnet = OrtNet(qtmp)
                qdiff, qprobs = compare(qnet)
                if seg:   # every test case was segmented above
                    n_test, (metric, base), (_, qscore) = (len(cases), _score(run, task, ref, cases),
                                                           _score(run, task, qprobs, cases))
                else:     # the whole test split, both models
                    full = lambda p: p.predict_dataset(test_ds)  # noqa: E731
                    n_test, labels = len(test_ds), np.asarray(test_ds.labels)
                    metric, base = _score(run, task, full(torch_pred), labels)
                    # dynamic quantisation scales activations per call, so a batch changes each image's
                    # answer: score one image per call, as an unbatched server would run it
                    _, qscore = _score(run, task, full(Predictor(Run.open(run.dir).use_model(qnet), batch_size=1)),
                                       labels)
                report["int8"] = {"file": INT8_FILE, "metric": metric, "fp32": base, "int8": qscore,
                                  "change": qscore - base, "max_abs_prob_diff": qdiff, "n": n_test,
                                  "bytes_fp32": tmp.stat().st_size, "bytes_int8": qtmp.stat().st_size}
                log(f"int8: test {metric} {base:.4f} -> {qscore:.4f} (change {qscore - base:+.4f}); "
                    f"max |prob diff| {qdiff:.2e}; {tmp.stat().st_size} -> {qtmp.stat().st_size} bytes")
    written = {name: out_dir / name, **({INT8_FILE: out_dir / INT8_FILE} if quantize else {})}
    _record(run, written)
    report["sha256"] = {n: run.meta.exports[RECORD_KEYS[n]].sha256 for n in written}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(report_path(run.dir, fmt), report)
    return report
