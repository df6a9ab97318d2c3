"""The served-model registry: each served run's ``Predictor`` (ONNX Runtime when the run has an export,
PyTorch otherwise), a worker thread that owns all model work, and a micro-batcher that groups concurrent
classifier requests into one call. ``load_models`` builds the registry (name -> ``ServedModel``) the routes use.

The backend is looked up in the export registry (``medlens.run.exporters``): ``auto`` takes the first servable
format whose file the run has, a format's name takes that one, ``torch`` takes PyTorch; the exported file is
opened with ``open_exported_run`` (its SHA-256, weights and graph checked against the run).

Every input goes through ``Predictor.prepare`` (the one preparation path) and every classifier answer through
``Predictor.predict_arrays`` and ``Predictor.decide`` (validation threshold, calibration). Heatmaps are Grad-CAM
on the PyTorch network (ONNX Runtime has no gradients); masks come from ``Predictor.segment_probs`` (sliding
windows) and ``Predictor.labels`` (validation threshold, post-processing).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medlens.errors import ConfigError, MedlensError
from medlens.explain import explain
from medlens.report.dicom_sr import Algorithm, classification_sr
from medlens.run import Prediction, Predictor, Run
from medlens.run.exporters import Exporter, export_dir, get_exporter, list_exporters, open_exported_run
from medlens.run.operating import operating_point
from medlens.tasks import task_of


#: batches up to this many input values run on the event loop (ONNX Runtime, e.g. 32 images of 28 x 28 px)
INLINE_ELEMENTS = 32 * 28 * 28


class QueueFull(Exception):
    """The model's bounded request queue is full (HTTP 503 with Retry-After)."""


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0


def served_format(run_dir: str | Path, backend: str, classical: bool = False) -> Exporter | None:
    """The export format ``serve --backend`` picks for a run, or None for PyTorch: ``torch`` -> None; ``auto`` ->
    the first servable registered format whose file the run has (none for a classical run); a format's name ->
    that format (its file must then exist and verify)."""
    if backend == "torch":
        return None
    if backend == "auto":
        if classical:
            return None
        return next((e for e in list_exporters() if e.servable and (export_dir(run_dir) / e.file_name).is_file()),
                    None)
    servable = [e.name for e in list_exporters() if e.servable]
    if backend not in servable:
        raise ConfigError(f"--backend must be one of {', '.join(['auto', *servable, 'torch'])}, not '{backend}'")
    return get_exporter(backend)


class ServedModel:
    """One run behind the server."""

    def __init__(self, run_dir: str | Path, name: str | None = None, backend: str = "auto",
                 max_batch: int = 32, max_wait_ms: float = 2.0, max_queue: int = 64, threads: int | None = None,
                 metrics=None, allow_incomplete: bool = False) -> None:
        self.torch_run = Run.open(run_dir)
        # a run whose training did not finish is not served (issue 25), unless --allow-incomplete
        self.torch_run.require_complete(allow_incomplete)
        self.torch_run.require_weights()
        self.name = name or self.torch_run.name
        exporter = served_format(run_dir, backend, self.torch_run.is_classical)
        self.inline = False
        if exporter is not None:
            # the exported file must be the one export wrote for this run: SHA-256 in run.json, shapes of the run
            self.backend = exporter.runtime
            self.inline = exporter.inline_batches
            self.predictor = Predictor(open_exported_run(run_dir, exporter.name, threads=threads))
        else:
            self.backend = "pytorch" if not self.torch_run.is_classical else "classical"
            self.predictor = Predictor(self.torch_run)
        self.torch_predictor = Predictor(self.torch_run)
        self.meta = self.torch_run.meta
        self.task = task_of(self.meta)
        self.is_segmentation = self.task.dense
        self.max_batch, self.max_wait = max(1, int(max_batch)), max_wait_ms / 1000.0
        self.max_queue = max(1, int(max_queue))
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{self.name}")
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.pending = 0
        self.stats = BatchStats()
        self.metrics = metrics

    # ---------------------------------------------------------------- description
    def info(self) -> dict:
        m, th = self.meta, self.meta.threshold
        prep = m.preprocessing.model_dump(mode="json")
        cal = getattr(m, "calibration", None)
        return {"name": self.name, "task": str(m.task), "classes": list(m.class_names), "model": m.model,
                "backend": self.backend, "spatial_dims": m.spatial_dims, "in_channels": m.in_channels,
                "input_size": list(m.input_size), "input_spec": prep,
                "operating_point": ({"threshold": th.value, "rule": th.rule, "chosen_on": th.chosen_on,
                                     "val_score": th.val_score} if th else None),
                "calibration": cal.method if cal is not None else None,
                "endpoints": ["segment"] if self.is_segmentation else ["predict"]}

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self.worker = asyncio.create_task(self._batch_loop())
        await self.run_in_worker(self._warm_up)

    async def stop(self) -> None:
        if self.worker:
            self.worker.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _warm_up(self) -> None:
        m = self.meta
        x = np.zeros((1, m.in_channels, *m.input_size), np.float32)
        if self.is_segmentation:
            self.predictor.segment_probs(x[0], "warm-up")
        else:
            self.predictor.predict_arrays(x)
            if self.backend != "classical":   # the first Grad-CAM imports captum: pay for it before serving
                self.heatmap(x[0])

    async def run_in_worker(self, fn, *args):
        """Run model work on this model's single worker thread (torch modules and hooks are not shared)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def admit(self) -> None:
        """Count one request in; ``QueueFull`` when the bound is reached."""
        if self.pending >= self.max_queue:
            if self.metrics:
                self.metrics.rejected.labels(self.name).inc()
            raise QueueFull(self.name)
        self.pending += 1

    def release(self) -> None:
        self.pending = max(0, self.pending - 1)

    # ---------------------------------------------------------------- classifier: micro-batching
    async def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Probabilities of one prepared input (C, *spatial), computed in a batch with concurrent requests."""
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue().put_nowait((x, fut))
        except asyncio.QueueFull:
            raise QueueFull(self.name) from None
        return await fut

    def _queue(self) -> asyncio.Queue:
        if self.queue is None:
            raise RuntimeError(f"model '{self.name}' is not started (ServedModel.start)")
        return self.queue

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue()
        while True:
            items = [await queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                try:
                    items.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
            items = [(x, f) for x, f in items if not f.cancelled()]
            if not items:
                continue
            xs = np.stack([x for x, _ in items])
            try:
                if xs.size <= INLINE_ELEMENTS and self.inline:
                    probs = self.predictor.predict_arrays(xs)   # well under a millisecond: no thread hop
                else:
                    probs = await self.run_in_worker(self.predictor.predict_arrays, xs)
            except Exception as e:  # every waiter gets the error; the loop keeps serving
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.stats.batches += 1
            self.stats.items += len(items)
            if self.metrics:
                self.metrics.batch_size.labels(self.name).observe(len(items))
            for (_, f), p in zip(items, probs):
                if not f.done():
                    f.set_result(p)

    def answer(self, p: np.ndarray) -> dict:
        """Probabilities and the decision at the validation threshold(s), or a numeric target's value with its
        prediction interval, as ``Predictor.predict_files`` gives them."""
        pred = self.prediction(p)
        out = {"prediction": pred.prediction, **pred.answer_fields()}
        if pred.value is None:
            out["calibrated"] = pred.calibrated
        if self.task.has_threshold:
            th = self.meta.threshold
            out["threshold"] = th.value if th else 0.5
            out["decision_rule"] = th.rule if th else "0.5 (no validation threshold recorded)"
        return out

    def prediction(self, p: np.ndarray) -> Prediction:
        pr = self.predictor
        cls, prob = pr.decide(np.asarray(p)[None])[0]
        return pr.prediction("upload", np.asarray(p), cls, prob)

    def result_sr(self, sources: list, p: np.ndarray, outside: list[str] | None = None):
        """The TID 1500 DICOM SR of one answer (``medlens.report.dicom_sr``) on its DICOM source instances;
        ``outside``: why the input was outside the training data (answered only when the server allows it)."""
        pred = self.prediction(p)
        th = self.predictor.thresholds()
        return classification_sr(sources, pred, list(self.meta.class_names), Algorithm.of_run(self.torch_run), th,
                                 operating_point(self.torch_run), outside, coding=self.task.coding)

    # ---------------------------------------------------------------- heatmap and masks
    def heatmap(self, x: np.ndarray, target: int | None = None) -> tuple[np.ndarray, dict]:
        """Grad-CAM (PyTorch network) of one prepared input for the predicted (or given) class; (*spatial) in [0, 1]."""
        net = self.torch_run.model
        if not isinstance(net, torch.nn.Module):
            raise MedlensError(f"'{self.name}' is a classical model: it has no Grad-CAM")
        maps, info = explain(net, torch.from_numpy(x[None]), "gradcam", target)
        m = maps[0]
        hi = float(m.max())
        return (m / hi if hi > 0 else m).astype(np.float32), info

    def segment(self, x: np.ndarray, name: str = "upload") -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (K, *spatial), post-processed label map) by sliding windows."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probs = self.predictor.segment_probs(x, name)
        return probs, self.predictor.labels(probs)


def load_models(runs, settings, metrics=None) -> dict[str, ServedModel]:
    """The served-model registry: each run folder of ``runs`` loaded with ``settings`` (a ``ServeSettings``),
    by name; two runs of one name, or none at all, are a ``ConfigError``."""
    models: dict[str, ServedModel] = {}
    for r in runs:
        m = ServedModel(r, settings.names.get(str(r)), settings.backend, settings.max_batch, settings.max_wait_ms,
                        settings.max_queue, settings.threads, metrics, allow_incomplete=settings.allow_incomplete)
        if m.name in models:
            raise ConfigError(f"two runs are named '{m.name}'; give distinct run folders")
        models[m.name] = m
    if not models:
        raise ConfigError("no run to serve")
    return models


def elapsed_ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 2)
