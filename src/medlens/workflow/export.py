"""``medlens export``: a trained run as an ONNX (or TorchScript, or any registered format) file that runs
without medlens, checked for parity before anything is written.

This module is the orchestration only. The formats are ``medlens.run.exporters`` (a registry: each format
says its file name, how to write it, how to load it back as the run's network and what to check on it; what
the exported file carries is in ``medlens.run.exporters.base``); ``export_run`` looks ``--format`` up there.

Parity is checked before anything is written: the exported model and PyTorch, both run through ``Predictor``
(the one preparation path; the ONNX session is attached as the run's model), on up to 200 real test images
(classifiers) or every test case by sliding windows (segmenters); the largest |probability difference| must
stay under 1e-4. INT8 dynamic quantisation (ONNX Runtime) is reported as the change of AUC on the whole test
split (classifiers) or of mean Dice over the test cases (segmenters).
Files appear in ``RUN/export/`` atomically, with ``export-<format>.json`` recording parity and quantisation.

Each exported file is bound to its run (issue 25): ``run.json`` records the SHA-256 of the file's own bytes
(``RunMeta.exports``), and whoever loads it (``open_exported_run`` for ``serve``, the standalone loader given the
run) checks that hash and the graph's input and output shapes against the run's channels, size, task and
classes before running it. A graph that merely copies the metadata (the weights hash included) is refused.
Only finished runs (``status: complete``) are exported unless ``allow_incomplete``. Temporary files of an
export killed half-way (``.model.onnx.<random>.tmp.onnx``) are removed by the next export of that run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlens.data.base import Dataset
from medlens.data.segmentation import SegCase
from medlens.engine.segmentation import foreground_dice
from medlens.errors import ConfigError, DataError, MedlensError
from medlens.evaluation.metrics import METRIC_FAMILIES
from medlens.run import Predictor, Run, run_lock
from medlens.run.meta import ExportRecord
from medlens.run.exporters import (PARITY_TOL, Exporter, clean_stale_temps, export_dir, export_metadata,
                                   get_exporter, list_exporters, quantization_kinds, record_exports,
                                   report_path, sha256_of)
from medlens.tasks import Task, task_of
from medlens.transforms.preprocess import prepared_data, prepared_segmentation
from medlens.utils import atomic_path, write_json_atomic


# ---------------------------------------------------------------- the test data and the comparisons
def _test_data_config(run: Run):
    """The run's data source with ``max_samples`` lifted, so a run trained on a capped subset still gets
    ``n`` test images (parity compares two encodings of one model; any real image serves)."""
    cfg = run.config
    return cfg.data.model_copy(update={"max_samples": None}) if hasattr(cfg.data, "max_samples") else cfg.data


def _test_cases(run: Run, n: int) -> list[SegCase]:
    """A segmenter's first ``n`` real test cases, prepared as model inputs."""
    return prepared_segmentation(_test_data_config(run), run.config.segmentation, seed=run.config.seed).test[:n]


def _test_images(run: Run, n: int) -> tuple[torch.Tensor, Dataset]:
    """A classifier's first ``n`` real test images as prepared model inputs (N, C, ...), and its test split."""
    ds = prepared_data(_test_data_config(run), seed=run.config.seed).test
    idx = np.arange(min(n, len(ds)))
    x, _ = ds.batch(idx)
    return torch.as_tensor(x).float(), ds


def _classifier_probs(predictor: Predictor, x) -> np.ndarray:
    return np.asarray(predictor.predict_arrays(x), np.float64)


def _segment_all(predictor: Predictor, cases, on_case: Callable[[], None] = lambda: None) -> list[np.ndarray]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in cases:
            out.append(predictor.segment_probs(c.image, str(getattr(c, "name", "case"))))
            on_case()
    return out


def _score(run: Run, task: Task, probs, labels) -> tuple[str, float]:
    """The headline test score: AUC (classifiers, by the task's metric family) or mean foreground Dice at the
    validation threshold (dense tasks)."""
    if task.dense:
        pred = Predictor(run)
        return "dice", float(np.mean([foreground_dice(pred.labels(p), c.mask, p.shape[0]) for p, c in zip(probs, labels)]))
    labels, probs = np.asarray(labels), np.asarray(probs, float)
    case_metrics, _ = METRIC_FAMILIES[task.metrics](task, labels, probs, 0.5, None)
    scores = case_metrics(np.arange(len(labels)))
    key = "auc" if "auc" in scores else next(iter(scores))   # a regression's first metric (mae)
    return key, scores[key]


def export_run(run_dir: str | Path, fmt: str = "onnx", quantize: str | None = None, n_parity: int = 200,
               tol: float = PARITY_TOL, log: Callable[[str], None] = lambda s: None,
               allow_incomplete: bool = False, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Export a run, check parity against PyTorch on real test data, optionally quantise; return the report.

    ``fmt`` is a registered format (``medlens.run.exporters``). Writes ``RUN/export/<its file>`` (e.g.
    ``model.onnx``), the quantised file with ``quantize`` (``int8``: ``model.int8.onnx``) and
    ``export-<format>.json``, and records each file's SHA-256 in run.json. Refuses (and writes nothing) when
    parity fails, or when the run is not complete (unless ``allow_incomplete``). ``progress(done, total, what)``
    counts the passes over the parity data (a segmenter's: case by case): the PyTorch reference, the written
    file, the quantised file and, for a quantised classifier, the two scorings of the test split.
    """
    exporter = get_exporter(fmt)
    if quantize is not None and quantize not in quantization_kinds():
        raise ConfigError(f"--quantize takes {', '.join(quantization_kinds())}, not '{quantize}'")
    if quantize and quantize not in exporter.quantizations:
        offered = [e for e in list_exporters() if quantize in e.quantizations]
        raise ConfigError(f"{quantize.upper()} quantisation is for {'/'.join(e.label or e.name for e in offered)} "
                          f"exports (--format {'/'.join(e.name for e in offered)})")
    run = Run.open(run_dir)
    if run.is_classical:
        raise MedlensError("a classical (hand-made features) run has no network to export", run.dir)
    run.require_complete(allow_incomplete)
    run.require_weights()
    with run_lock(run.dir):
        removed = clean_stale_temps(export_dir(run.dir))
        if removed:
            log(f"removed {len(removed)} temporary file(s) left by an interrupted export")
        return _export_locked(run, exporter, quantize, n_parity, tol, log, progress)


def _export_locked(run: Run, exporter: Exporter, quantize: str | None, n_parity: int, tol: float,
                   log: Callable[[str], None], progress: Callable[[int, int, str], None] | None = None) -> dict:
    torch_pred = Predictor(run)
    task = task_of(run)
    seg = task.dense
    fmt = exporter.name
    t0 = time.perf_counter()
    cases: list[SegCase] = []
    test_ds: Dataset | None = None
    if seg:
        cases = _test_cases(run, n_parity)
    else:
        x, test_ds = _test_images(run, n_parity)
    per_pass = len(cases) if seg else 1
    done = [0, 3 * per_pass if quantize else 2 * per_pass]
    if quantize and not seg:
        done[1] += 2

    def step(what: str) -> None:
        done[0] += 1
        if progress:
            progress(done[0], done[1], what)

    if progress:
        progress(0, done[1], "reference")
    if seg:
        if not cases:
            raise DataError("the run's data has no test case to check parity on", run.dir)
        ref = _segment_all(torch_pred, cases, lambda: step("reference"))
        what = f"{len(cases)} test case(s), sliding windows {run.meta.input_size}"
    else:
        ref = _classifier_probs(torch_pred, x)
        step("reference")
        what = f"{len(x)} test image(s)"
    log(f"reference: PyTorch on {what} ({time.perf_counter() - t0:.1f} s)")

    out_dir = export_dir(run.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = exporter.file_name
    report: dict = {"run": run.name, "format": fmt, "file": name, "task": str(task), "parity_data": what,
                    "tolerance": tol, "weights_sha256": run.weights_sha256, "metadata": export_metadata(run)}

    def load(path: Path, final_name: str) -> torch.nn.Module:
        """The written file as the run's network, accepted by the format's check hook."""
        net = exporter.load(path, run)
        exporter.check(net, run, final_name)
        return net

    def compare(net, what: str) -> tuple[float, list[np.ndarray] | np.ndarray]:
        other = Predictor(Run.open(run.dir).use_model(net))
        if seg:
            got = _segment_all(other, cases, lambda: step(what))
            return float(max(np.abs(a - b).max() for a, b in zip(got, ref))), got
        got = _classifier_probs(other, x)
        step(what)
        return float(np.abs(got - ref).max()), got

    written = {name: (out_dir / name, exporter.record_key)}
    with atomic_path(out_dir / name) as tmp:
        exporter.write(run, tmp)
        diff, _ = compare(load(tmp, name), f"{fmt} parity")
        report["max_abs_prob_diff"] = diff
        log(f"parity {fmt} vs PyTorch: max |prob diff| = {diff:.2e} (tolerance {tol:g})")
        if not diff < tol:
            raise MedlensError(f"exported model differs from PyTorch by {diff:.2e} in probability (> {tol:g}); "
                               "nothing written", run.dir)
        if quantize:
            qname, qkey = exporter.quantizations[quantize]
            written[qname] = (out_dir / qname, qkey)
            with atomic_path(out_dir / qname) as qtmp:
                exporter.quantize(quantize, tmp, qtmp, run)
                qnet = load(qtmp, qname)
                qdiff, qprobs = compare(qnet, f"{quantize} parity")
                if seg:   # every test case was segmented above
                    n_test, (metric, base), (_, qscore) = (len(cases), _score(run, task, ref, cases),
                                                           _score(run, task, qprobs, cases))
                else:     # the whole test split, both models
                    assert test_ds is not None   # a classifier's, loaded above
                    full = lambda p: p.predict_dataset(test_ds)  # noqa: E731
                    n_test, labels = len(test_ds), np.asarray(test_ds.labels)
                    metric, base = _score(run, task, full(torch_pred), labels)
                    step("scoring the test split")
                    # dynamic quantisation scales activations per call, so a batch changes each image's
                    # answer: score one image per call, as an unbatched server would run it
                    _, qscore = _score(run, task, full(Predictor(Run.open(run.dir).use_model(qnet), batch_size=1)),
                                       labels)
                    step(f"scoring the test split ({quantize})")
                report[quantize] = {"file": qname, "metric": metric, "fp32": base, quantize: qscore,
                                    "change": qscore - base, "max_abs_prob_diff": qdiff, "n": n_test,
                                    "bytes_fp32": tmp.stat().st_size, f"bytes_{quantize}": qtmp.stat().st_size}
                log(f"{quantize}: test {metric} {base:.4f} -> {qscore:.4f} (change {qscore - base:+.4f}); "
                    f"max |prob diff| {qdiff:.2e}; {tmp.stat().st_size} -> {qtmp.stat().st_size} bytes")
    record_exports(run, written)
    report["sha256"] = _recorded(run, written)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(report_path(run.dir, fmt), report)
    return report


def _recorded(run: Run, written: dict[str, tuple[Path, str | None]]) -> dict[str, str]:
    """The SHA-256 run.json now records for each written file (a format without a record key: of the file)."""
    exports: dict[Any, ExportRecord] = dict(run.meta.exports or {})
    return {n: exports[key].sha256 if key is not None else sha256_of(path) for n, (path, key) in written.items()}
