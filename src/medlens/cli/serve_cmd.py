"""``medlens export`` and ``medlens serve``: a trained run as a portable file, and as a service."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from medlens.cli.common import console, progress_step, quiet_libraries, say


def export(run_dir: Path = typer.Argument(..., help="a trained run folder"),
           format: str = typer.Option("onnx", "--format", help="onnx or torchscript"),
           quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: also write an INT8 "
                                                  "dynamically quantised ONNX model and report its test AUC/Dice"),
           n: int = typer.Option(200, "--n", help="test images for the parity check"),
           allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="export a run whose "
                                                 "training did not finish (status not 'complete')")) -> None:
    """Export a run (ONNX / TorchScript) with its preprocessing, threshold and class names; check parity."""
    from medlens.run.exporters import export_dir
    from medlens.workflow.export import export_run

    quiet_libraries()
    with progress_step("exporting") as report:
        r = export_run(run_dir, format, quantize, n_parity=n, progress=report,
                       log=say,
                       allow_incomplete=allow_incomplete)
    t = Table(title=f"export of {r['run']} ({r['format']})")
    for col in ("file", "parity data", "max |prob diff| vs PyTorch", "test score"):
        t.add_column(col)
    t.add_row(r["file"], r["parity_data"], f"{r['max_abs_prob_diff']:.2e}", "")
    if "int8" in r:
        q = r["int8"]
        t.add_row(q["file"], r["parity_data"], f"{q['max_abs_prob_diff']:.2e}",
                  f"{q['metric']} {q['fp32']:.4f} -> {q['int8']:.4f} ({q['change']:+.4f}, n={q['n']})")
    console.print(t)
    console.print(f"written to {export_dir(run_dir)} (export-{format}.json has the details)", markup=False,
                  highlight=False)


def serve(runs: List[Path] = typer.Argument(..., help="one or more trained run folders"),
          host: str = typer.Option("127.0.0.1", "--host", help="bind address; anything but localhost needs "
                                   "API keys"),
          port: int = typer.Option(8000, "--port"),
          api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="file with one API key per "
                                                      "line (or set MEDLENS_API_KEYS=key1,key2)"),
          backend: str = typer.Option("auto", "--backend", help="auto (ONNX Runtime when the run has an "
                                      "export, else PyTorch), onnx or torch"),
          max_batch: int = typer.Option(32, "--max-batch", help="largest micro-batch (1: no batching)"),
          max_wait_ms: float = typer.Option(2.0, "--max-wait-ms", help="how long a batch waits to fill"),
          max_queue: int = typer.Option(64, "--max-queue", help="requests in progress per model before 503"),
          max_upload_mb: float = typer.Option(256.0, "--max-upload-mb", help="request size limit (413)"),
          timeout: float = typer.Option(120.0, "--timeout", help="per-request timeout in seconds (504)"),
          threads: Optional[int] = typer.Option(None, "--threads", help="torch / ONNX Runtime threads"),
          read_timeout: float = typer.Option(60.0, "--read-timeout", help="seconds a client may take to send "
                                             "its request headers, and its whole body (408 / closed)"),
          allowed_host: List[str] = typer.Option([], "--allowed-host", help="a Host header name to answer "
                                                 "besides localhost and the bind address (repeatable; '*': any)"),
          tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate: serve HTTPS"),
          tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert"),
          allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="serve a run whose "
                                                "training did not finish (status not 'complete')"),
          allow_out_of_profile: bool = typer.Option(False, "--allow-out-of-profile", help="answer inputs outside "
                                                    "a run's training data (with the reasons in the answer) "
                                                    "instead of refusing them (422)")
          ) -> None:
    """Serve runs over HTTP(S): REST API, viewer at /, /openapi.json, /healthz, /readyz, /metrics."""
    from medlens.errors import ConfigError
    from medlens.serve import ServeSettings, load_api_keys, serve as run_server

    if backend not in ("auto", "onnx", "torch"):
        raise ConfigError(f"--backend must be auto, onnx or torch, not '{backend}'")
    quiet_libraries()
    if threads:
        import torch

        torch.set_num_threads(threads)
    settings = ServeSettings(host=host, port=port, api_keys=load_api_keys(api_key_file),
                             max_upload_bytes=int(max_upload_mb * 1024 * 1024), timeout_s=timeout,
                             max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, threads=threads,
                             backend=backend, read_timeout_s=read_timeout, allowed_hosts=tuple(allowed_host),
                             tls_cert=str(tls_cert) if tls_cert else None,
                             tls_key=str(tls_key) if tls_key else None, allow_incomplete=allow_incomplete,
                             allow_out_of_profile=allow_out_of_profile)
    run_server([str(r) for r in runs], settings)
