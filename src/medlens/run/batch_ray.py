"""The Ray engine of batch prediction (``medlens predict ... --out results.csv --engine ray [--address ADDR]``).

The same ``Predictor`` mapped over the inputs with Ray Data: ``ray.data.from_items(files).map_batches(...)`` with a
callable class that opens the run once per actor and runs ``batch.decode`` and ``batch.answer`` (the one
preparation path, the same rows). The driver writes what comes back through ``batch.predict_archive``'s writers,
so the output, the errors file and ``--resume`` are those of the local engine.

Only the CLI imports this module, and only when ``--engine ray`` is asked: it imports Ray at its top.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch

from medlens.run.batch import Batch, Row, answer, decode, inference_network
from medlens.run.predictor import Predictor
from medlens.run.run import Run

# what Ray prints on its own: the usage-stats notice, the dashboard, log deduplication notes, Ray Data's progress
# bars and execution plan lines; set before ``ray.init`` (a worker inherits the driver's environment)
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
             "RAY_LOG_TO_STDERR": "0"}
QUIET_LOGGERS = ("ray", "ray.data", "ray._private", "ray.util", "ray.train")


class PredictorActor:
    """One Ray actor: the run opened once; each batch of file names decoded, prepared and predicted."""

    def __init__(self, run_dir: str, tta: bool | None = None) -> None:
        torch.set_num_threads(1)          # one CPU per actor: Ray schedules the parallelism
        warnings.filterwarnings("ignore")  # the rows carry what matters (out-of-profile reasons, errors)
        self.predictor = Predictor(Run.open(run_dir, expect="classification"), tta=tta)
        self._layout = ExitStack()   # the inference copy of the network for the actor's life, as the local engine
        self._layout.enter_context(inference_network(self.predictor))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, errors = answer(self.predictor, [decode(self.predictor, str(f)) for f in batch["file"]])
        out = [json.dumps({"row": r}) for r in rows] + [json.dumps({"error": e}) for e in errors]
        return {"result": np.array(out, dtype=object)}


def _split(results: np.ndarray) -> Batch:
    rows: list[Row] = []
    errors: list[Row] = []
    for text in results:
        d = json.loads(str(text))
        (rows if "row" in d else errors).append(d.get("row") or d["error"])
    return rows, errors


def ray_batches(run_dir: str | Path, files: list[str], batch_size: int = 64, workers: int = 2,
                tta: bool | None = None) -> Iterator[Batch]:
    """(rows, errors) per block of results, in the order Ray finishes them, from ``workers`` actors of
    ``PredictorActor`` (one CPU each) over ``files``. Needs a Ray instance (``ray_session``)."""
    if not files:
        return
    ds = ray.data.from_items([{"file": f} for f in files])
    ds = ds.map_batches(PredictorActor, fn_constructor_kwargs={"run_dir": str(run_dir), "tta": tta},
                        batch_size=batch_size, concurrency=workers, num_cpus=1, batch_format="numpy",
                        # no actor restarts: a restarted actor would need its constructor arguments back from the
                        # object store, which the C++ core worker warns about on the console; a failed actor
                        # fails the run, and --resume continues it
                        max_restarts=0)
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1):
        yield _split(np.asarray(b["result"]))


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """A quiet Ray instance for the block: joins ``address`` (a running cluster) or starts a local one with
    ``num_cpus``, and shuts it down after. An instance this process already started is used as it is."""
    if ray.is_initialized():
        yield
        return
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    for name in QUIET_LOGGERS:   # a failure reaches the caller as an exception, not as Ray's stack trace lines
        logging.getLogger(name).setLevel(logging.CRITICAL)
    ray.init(address=address, num_cpus=None if address else num_cpus, log_to_driver=False,
             include_dashboard=False, logging_level=logging.ERROR, configure_logging=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        yield
    finally:
        ray.shutdown()
