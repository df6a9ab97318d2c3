"""ONNX export (``--format onnx``), run by ONNX Runtime: the format ``serve`` prefers when a run has it.

``OrtNet`` is an ONNX Runtime session behind the ``nn.Module`` interface ``Predictor`` calls, so the exported
model goes through the same preparation, sliding windows and decision as PyTorch. The ``check`` hook refuses a
graph whose single float input and output do not have the run's shapes, or whose metadata names other weights
(issue 25: a graph that merely copies the metadata is refused by its SHA-256 before that). ``--quantize int8``
writes ``model.int8.onnx`` by ONNX Runtime's dynamic quantisation.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from medlens.errors import DataError, MedlensError
from medlens.run.exporters.base import Exporter, example_input, expected_io, export_dir, export_metadata
from medlens.run.exporters.registry import open_exported_run, register_exporter
from medlens.run.meta import RunMeta
from medlens.run.run import Run

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OPSET = 17
MAX_ONNX_BYTES = 2 * 1024 ** 3   # protobuf's own limit for one ONNX file


class OrtNet(torch.nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` interface ``Predictor`` calls: logits out.

    Attached with ``Run.use_model``, it lets the exported model go through ``Predictor`` exactly like the
    PyTorch one (same preparation, same sliding windows, same decision). No gradients: heatmaps need PyTorch.
    """

    def __init__(self, path: str | Path, threads: int | None = None, data: bytes | None = None,
                 output_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
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
        out = np.asarray(self.session.run(None, {self.input_name: a})[0])
        if self.output_shape is not None and (out.shape[0] != a.shape[0] or tuple(out.shape[1:]) != self.output_shape):
            raise DataError(f"the ONNX model answered shape {tuple(out.shape)} for {a.shape[0]} input(s); the run "
                            f"expects (N, {', '.join(map(str, self.output_shape))})", self.path.name)
        return torch.from_numpy(out)


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


@register_exporter
class OnnxExporter(Exporter):
    name = "onnx"
    label = "ONNX"
    file_name = ONNX_FILE
    record_key = "onnx"
    quantizations: ClassVar[dict[str, tuple[str, str]]] = {"int8": (INT8_FILE, "onnx-int8")}
    servable = True
    runtime = "onnxruntime"
    inline_batches = True     # a small batch takes well under a millisecond in ONNX Runtime
    max_bytes = MAX_ONNX_BYTES

    def write(self, run: Run, path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(run.network, (example_input(run),), str(path), input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        model = onnx.load(str(path))
        onnx.helper.set_model_props(model, export_metadata(run))
        model.doc_string = f"medlens run {run.name}: logits of {run.meta.model} ({run.meta.task})"
        onnx.save(model, str(path))

    def load(self, path: Path, run: Run, *, threads: int | None = None, data: bytes | None = None) -> OrtNet:
        return OrtNet(path, threads, data=data, output_shape=expected_io(run.meta)[1])

    def check(self, net: torch.nn.Module, run: Run, name: str) -> None:
        assert isinstance(net, OrtNet)
        check_graph(net.session, run.meta, name)
        if net.metadata.get("medlens.weights_sha256") != run.weights_sha256:
            raise MedlensError("the exported model was made from other weights than this run's model.pt; export "
                               "again", name)

    def quantize(self, kind: str, src: Path, dst: Path, run: Run) -> None:
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
        onnx.helper.set_model_props(model, {**export_metadata(run), "medlens.quantization": "int8-dynamic (onnxruntime)"})
        onnx.save(model, str(dst))


def onnx_path(run_dir: str | Path, int8: bool = False) -> Path:
    return export_dir(run_dir) / (INT8_FILE if int8 else ONNX_FILE)


def open_onnx_run(run_dir: str | Path, path: str | Path | None = None, threads: int | None = None) -> Run:
    """The run with its exported ONNX model attached, verified (``open_exported_run`` for ``onnx``)."""
    return open_exported_run(run_dir, "onnx", path, threads)
