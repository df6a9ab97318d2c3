"""Issue 15: 2-process data-parallel training (gloo on CPU) on real PneumoniaMNIST: it completes, matches the
single-process run with the same effective batch, and a run killed mid-epoch resumes to the same result."""

import json
import os
import signal

import lightning.pytorch.callbacks as cb
import pandas as pd
import pytest

from conftest import tiny_config
from medlens.run import Run
from medlens.workflow.train import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cfg(tmp, name, **train):
    # no augmentation or dropout: the two layouts then compute the same gradients (up to rounding)
    return tiny_config(tmp, name, model={"name": "small_cnn", "params": {"widths": [8, 16, 32], "dropout": 0.0}},
                       train={"epochs": 2, "lr": 0.003, "precision": "32", "num_threads": 2, **train})


def _auc(run):
    return json.loads((run / "metrics.json").read_text())["test"]["metrics"]["auc"]["value"]


class _KillRank1MidEpoch(cb.Callback):
    """SIGKILL of the second process in the middle of its second epoch (a node lost mid-epoch)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.current_epoch == 1 and batch_idx == 2:
            os.kill(os.getpid(), signal.SIGKILL)


def test_ddp_two_processes_match_single_and_resume_after_kill(tmp_path, data_root):
    single = train(_cfg(tmp_path, "single", batch_size=64), progress_bar=False)
    ddp = train(_cfg(tmp_path, "ddp", batch_size=32, devices=2, strategy="ddp"), progress_bar=False)
    meta = Run.open(ddp).meta
    assert meta.environment["distributed"]["world_size"] == 2
    assert meta.environment["distributed"]["backend"] == "gloo"
    assert list(pd.read_csv(ddp / "history.csv")["epoch"]) == [0, 1]
    assert abs(_auc(ddp) - _auc(single)) <= 0.01

    cfg = _cfg(tmp_path, "killed", batch_size=32, devices=2, strategy="ddp")
    with pytest.raises(Exception):
        train(cfg, callbacks=[_KillRank1MidEpoch()], progress_bar=False)
    assert (tmp_path / "killed" / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "killed" / "model.pt").exists()
    resumed = train(cfg, resume=True, progress_bar=False)
    assert json.loads((resumed / "metrics.json").read_text())["test"] == \
        json.loads((ddp / "metrics.json").read_text())["test"]
