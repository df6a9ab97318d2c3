"""Tiny trained runs and a real server process, shared by the export and serve tests (one of each per
pytest process: trained on first use)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_RUNS: dict[str, Path] = {}


def _config(kind: str, out: Path):
    from medlens.config import config_from_dict

    common = {"seed": 0, "output_dir": str(out), "evaluation": {"bootstrap": 10}}
    if kind == "a3d":   # AdrenalMNIST3D, 28^3 CT: a 3D classifier
        d = {"name": "a3d", "data": {"source": "medmnist", "name": "adrenalmnist3d", "size": 28, "max_samples": 32},
             "model": {"name": "fast_cnn3d", "params": {"widths": [4, 8, 16, 32]}},
             "train": {"epochs": 1, "batch_size": 16, "precision": "32"},
             # the report's explanation: one named method on a few test images, not the search over every
             # method on validation images (a minute of 3D attributions; tests/integration/test_explain_runs.py
             # covers the methods and the choice)
             "explain": {"method": "gradcam", "score_images": 4}}
    elif kind == "unet2d":   # CHASE_DB1 fundus vessels (4 children, both eyes): a 2D U-Net
        d = {"name": "unet2d", "task": "segmentation",
             "data": {"source": "folder", "path": str(chase_subset(out / "chase")), "mask_suffix": "_1stHO.png",
                      "patient_pattern": "Image_(\\d+)[LR]", "color": "green", "val_fraction": 0.25,
                      "test_fraction": 0.25},
             "model": {"name": "unet", "params": {"channels": [4, 8], "num_res_units": 0}},
             "segmentation": {"patch_size": [128, 128], "patches_per_epoch": 8, "sw_batch_size": 16, "overlap": 0.25},
             "train": {"epochs": 1, "batch_size": 4, "precision": "32"}}
    elif kind == "unet3d":   # MRI lesion volumes: a 3D U-Net
        d = {"name": "unet3d", "task": "segmentation",
             "data": {"source": "folder", "path": "$MEDLENS_DATA/mri-seg", "image_suffix": "_image",
                      "mask_suffix": "_label.nrrd", "intensity": "zscore", "val_fraction": 0.34,
                      "test_fraction": 0.34},
             "model": {"name": "unet", "params": {"channels": [4, 8]}},
             "segmentation": {"patch_size": [16, 64, 64], "patches_per_epoch": 4, "sw_batch_size": 4},
             "train": {"epochs": 1, "batch_size": 2, "precision": "32"}}
    else:
        raise ValueError(kind)
    return config_from_dict({**common, **d})


def chase_subset(folder: Path, children=("01", "02", "03", "04"), masks=("_1stHO.png",)) -> Path:
    """The real CHASE_DB1 images and observer masks of a few children, copied (the full set is slow)."""
    import shutil

    from medlens.utils import data_dir

    src = data_dir() / "chasedb1" / "CHASEDB1"
    folder.mkdir(parents=True, exist_ok=True)
    for c in children:
        for eye in "LR":
            for name in (f"Image_{c}{eye}.jpg", *(f"Image_{c}{eye}{m}" for m in masks)):
                shutil.copy(src / name, folder / name)
    return folder


def tiny_run(kind: str, tmp_path_factory) -> Path:
    """A tiny trained run of ``kind`` (a3d, unet2d, unet3d), trained once per pytest process."""
    if kind not in _RUNS:
        from medlens.workflow.train import train

        _RUNS[kind] = train(_config(kind, tmp_path_factory.mktemp(f"serve-{kind}")), progress_bar=False)
    return _RUNS[kind]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``medlens serve`` as a real separate process (uvicorn) on a free port, stopped by its PID."""

    def __init__(self, runs, log_path: Path, *args: str, env: dict | None = None, timeout: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "medlens.cli.main", "serve", *map(str, runs), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     cwd=REPO)
        self.pid = self.proc.pid
        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout} s: {log_path.read_text()[-2000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
