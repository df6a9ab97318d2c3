"""What every export format shares: the ``Exporter`` interface, the export folder, and the metadata an
exported file carries.

The exported graph is the run's network *with* its normalisation (``ClassifierNet``): input (N, C, *spatial)
prepared by ``InputSpec`` (values in the model's scale), output logits; the batch axis is dynamic. U-Nets are
exported per window (the run's patch size) and run by the same sliding-window inference as PyTorch.

What the file carries (ONNX ``metadata_props``; TorchScript ``_extra_files['medlens.json']``), all JSON text:
``medlens.preprocessing`` (the run's ``InputPrep``, and the CT window as numbers), ``medlens.task``,
``medlens.class_names``, ``medlens.threshold`` (validation-chosen), ``medlens.calibration``,
``medlens.activation`` (how logits become probabilities), ``medlens.sliding_window`` (segmenters) and the
weights hash. ``medlens/serve/standalone_loader.py`` reads it with numpy + onnxruntime + Pillow only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

import torch

from medlens.io.windows import parse_window
from medlens.run.meta import RunMeta
from medlens.run.run import Run
from medlens.tasks import Task, get_task, task_of

EXPORT_DIR = "export"
PARITY_TOL = 1e-4


class Exporter:
    """One export format: its file, how a run is written in it, and how the file runs again as the run's network.

    A format is one module: a subclass with the class attributes set and ``write`` / ``load`` implemented,
    decorated with ``@register_exporter`` (``medlens.run.exporters.registry``). ``medlens export --format NAME``,
    the parity check and ``serve`` find it by name; nothing else names a format.
    """

    #: the ``--format`` value
    name: ClassVar[str] = ""
    #: how messages name the format ("ONNX")
    label: ClassVar[str] = ""
    #: the file written in ``RUN/export/``
    file_name: ClassVar[str] = ""
    #: the key of ``RunMeta.exports`` that records the file's SHA-256 (None: not recorded, so never served)
    record_key: ClassVar[str | None] = None
    #: quantisations this format offers (``--quantize KIND``): kind -> (file name, ``RunMeta.exports`` key)
    quantizations: ClassVar[dict[str, tuple[str, str]]] = {}
    #: ``serve`` may run the file (auto-picked when present), after ``open_exported_run`` has verified it
    servable: ClassVar[bool] = False
    #: the name ``serve`` reports for the backend (``/v1/models``: ``backend``)
    runtime: ClassVar[str] = ""
    #: small micro-batches are fast enough to run on the server's event loop (no thread hop)
    inline_batches: ClassVar[bool] = False
    #: the largest file ``open_exported_run`` reads (None: no bound of the format's own)
    max_bytes: ClassVar[int | None] = None

    def write(self, run: Run, path: Path) -> None:
        """Write the run's network (``run.model``) with ``export_metadata(run)`` to ``path`` (a temporary name)."""
        raise NotImplementedError

    def load(self, path: Path, run: Run, *, threads: int | None = None, data: bytes | None = None) -> torch.nn.Module:
        """The runtime backend: the file as an ``nn.Module`` whose forward gives logits, to attach with
        ``Run.use_model`` (then ``Predictor`` prepares, runs and decides exactly as for PyTorch). ``data``: the
        file's bytes, already hashed, when given (load those, so the file cannot change after the check)."""
        raise NotImplementedError

    def check(self, net: torch.nn.Module, run: Run, name: str) -> None:
        """The parity check hook: refuse a loaded backend that does not fit ``run`` (its graph's shapes, the
        weights it was made from). Called on the freshly written file before parity is measured, and on every
        file ``open_exported_run`` loads. Nothing by default."""

    def quantize(self, kind: str, src: Path, dst: Path, run: Run) -> None:
        """Write the ``kind`` quantisation of the file ``src`` to ``dst`` (one of ``quantizations``)."""
        raise NotImplementedError(f"{self.name} offers no quantisation")

    def files(self) -> dict[str, str | None]:
        """Every file this format writes -> its ``RunMeta.exports`` key."""
        return {self.file_name: self.record_key, **{f: k for f, k in self.quantizations.values()}}


def export_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EXPORT_DIR


def activation(task: Task | str) -> str:
    """How the exported logits become probabilities (the task's ``export_activation``: softmax, sigmoid for
    one logit, sigmoid_each for independent labels, segmentation per voxel)."""
    return get_task(task).export_activation


def export_metadata(run: Run) -> dict[str, str]:
    """The key/value text stored in the exported file: everything needed to prepare, run and decide."""
    m = run.meta
    cal = getattr(m, "calibration", None)   # validation-fitted probability calibration, when the run has one
    prep = m.preprocessing.model_dump(mode="json")
    if prep.get("window"):
        prep["window_level_width"] = list(parse_window(prep["window"]))
    out = {
        "medlens.format": "1",
        "medlens.run": run.name,
        "medlens.task": m.task,
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
    if m.label_thresholds is not None:   # issue 26: multi-label, each label's validation threshold
        out["medlens.label_thresholds"] = json.dumps(m.label_thresholds)
    if m.interval is not None:           # issue 26: regression, the validation-fitted prediction interval
        out["medlens.interval"] = json.dumps(m.interval.model_dump(mode="json"))
    if task_of(m).dense:
        s = run.config.segmentation
        out["medlens.sliding_window"] = json.dumps({"patch_size": list(m.input_size), "overlap": s.overlap,
                                                    "blend": s.blend, "tta": s.tta})
        out["medlens.label_values"] = json.dumps(m.label_values)
    return out


def example_input(run: Run) -> torch.Tensor:
    """A fixed random batch of two inputs of the run's shape: what tracing exporters trace with."""
    m = run.meta
    return torch.rand(2, m.in_channels, *m.input_size, generator=torch.Generator().manual_seed(0))


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
    return (meta.in_channels, *size), task_of(meta).output_shape(meta.n_outputs, size)
