"""``medlens pretrain``: self-supervised pretraining of a backbone on pooled unlabelled images (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from medlens.cli.common import console, quiet_libraries, say


def pretrain(data: List[str] = typer.Argument(..., help="MedMNIST names, MedMNIST-layout .npz files or image "
                                              "folders; only their train splits are used, labels ignored"),
             method: str = typer.Option("simclr", "--method", help="simclr or mae"),
             model: str = typer.Option("small_cnn", "--model", help="registered classifier"),
             params: str = typer.Option("{}", "--params", help="model parameters as JSON"),
             size: int = typer.Option(28, "--size", help="image size (MedMNIST file size; others resized)"),
             channels: Optional[int] = typer.Option(None, "--channels",
                                                    help="1 or 3 (default: the first dataset's)"),
             epochs: int = typer.Option(10, "--epochs", min=1),
             batch_size: int = typer.Option(256, "--batch-size", min=2),
             lr: float = typer.Option(1e-3, "--lr"),
             temperature: float = typer.Option(0.2, "--temperature", help="SimCLR NT-Xent temperature"),
             mask_ratio: float = typer.Option(0.6, "--mask-ratio", help="MAE: share of patches masked"),
             patch: int = typer.Option(4, "--patch", help="MAE: mask patch side in pixels"),
             max_per_dataset: Optional[int] = typer.Option(None, "--max-per-dataset", min=1,
                                                           help="seeded sample of each dataset's train split"),
             precision: str = typer.Option("bf16", "--precision", help="bf16 (CPU autocast) or 32"),
             out: Path = typer.Option(Path("backbone.pt"), "--out", help="weights file; sidecar beside it "
                                      "(.json)"),
             seed: int = typer.Option(0, "--seed"),
             threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads")) -> None:
    """Pretrain a backbone without labels (SimCLR or masked image modelling) for `model.pretrained`."""
    from medlens.errors import ConfigError

    quiet_libraries()
    try:
        model_params = json.loads(params)
    except ValueError as e:
        raise ConfigError(f"--params is not JSON ({e})") from e
    if not isinstance(model_params, dict):
        raise ConfigError("--params must be a JSON object, e.g. '{\"widths\": [32, 64, 128]}'")
    if threads:
        import torch

        torch.set_num_threads(threads)
    from medlens.workflow.pretrain import pretrain as run_pretrain, sidecar_path

    meta = run_pretrain(list(data), method=method, model=model, params=model_params, size=size,
                        channels=channels, epochs=epochs, batch_size=batch_size, lr=lr,
                        temperature=temperature, mask_ratio=mask_ratio, patch=patch, seed=seed,
                        max_per_dataset=max_per_dataset, precision=precision, out=out,
                        log=say)
    per = ", ".join(f"{d['name']} {d['n_images']}" for d in meta["datasets"])
    console.print(f"images: {meta['n_images']} from the train splits only ({per}); labels not used; "
                  "validation and test splits not read", highlight=False, markup=False)
    console.print(f"wrote {out} ({meta['n_tensors']} tensors of {model} without its head "
                  f"'{meta['model']['head_excluded']}', sha256 {meta['sha256'][:12]}) and "
                  f"{sidecar_path(out)} in {meta['seconds']:.1f} s", highlight=False, markup=False)
    console.print(f"use it: model: {{name: {model}, pretrained: {out}, freeze: []}} (or freeze: [backbone])",
                  highlight=False, markup=False)
