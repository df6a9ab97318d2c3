"""TorchScript export (``--format torchscript``): the traced network with the metadata in ``medlens.json``.

Not served (``serve`` runs ONNX Runtime or PyTorch); its parity is checked like every format's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from medlens.run.exporters.base import Exporter, example_input, export_metadata
from medlens.run.exporters.registry import register_exporter
from medlens.run.run import Run

TORCHSCRIPT_FILE = "model.torchscript.pt"


class TorchScriptNet(torch.nn.Module):
    """A TorchScript file behind the ``nn.Module`` interface ``Predictor`` calls."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.ts = torch.jit.load(str(path), map_location="cpu")  # the file written just now, by this process

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ts(x)


@register_exporter
class TorchScriptExporter(Exporter):
    name = "torchscript"
    label = "TorchScript"
    file_name = TORCHSCRIPT_FILE
    record_key = "torchscript"
    runtime = "torchscript"

    def write(self, run: Run, path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = torch.jit.trace(run.network, example_input(run), check_trace=False)
            torch.jit.save(ts, str(path), _extra_files={"medlens.json": json.dumps(export_metadata(run))})

    def load(self, path: Path, run: Run, *, threads: int | None = None, data: bytes | None = None) -> TorchScriptNet:
        return TorchScriptNet(path)
