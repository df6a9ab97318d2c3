"""Export formats: a run as a file that runs without PyTorch's training stack, and that file loaded back.

Importing the package imports every built-in format module (ONNX, TorchScript), whose ``@register_exporter``
decorators fill the registry (the registry itself imports none of them: no cycle). A new format is one module
with an ``Exporter`` subclass (``base.py`` says what it provides) registered the same way.
``medlens.workflow.export.export_run`` writes a format and checks its parity; ``medlens.serve`` loads a
servable one with ``open_exported_run``.
"""

from medlens.run.exporters import onnx_exporter, torchscript_exporter  # noqa: F401  (registers the formats)
from medlens.run.exporters.base import (EXPORT_DIR, PARITY_TOL, Exporter, activation, example_input, expected_io,
                                        export_dir, export_metadata, sha256_of)
from medlens.run.exporters.onnx_exporter import INT8_FILE, ONNX_FILE, OrtNet, check_graph, onnx_path, open_onnx_run
from medlens.run.exporters.registry import (clean_stale_temps, get_exporter, list_exporters, open_exported_run,
                                            quantization_kinds, record_exports, register_exporter, report_path,
                                            unregister_exporter)
from medlens.run.exporters.torchscript_exporter import TORCHSCRIPT_FILE, TorchScriptNet

__all__ = ["EXPORT_DIR", "INT8_FILE", "ONNX_FILE", "PARITY_TOL", "TORCHSCRIPT_FILE", "Exporter", "OrtNet",
           "TorchScriptNet", "activation", "check_graph", "clean_stale_temps", "example_input", "expected_io",
           "export_dir", "export_metadata", "get_exporter", "list_exporters", "onnx_path", "open_exported_run",
           "open_onnx_run", "quantization_kinds", "record_exports", "register_exporter", "report_path",
           "sha256_of", "unregister_exporter"]
