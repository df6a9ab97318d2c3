"""Distributed data-parallel settings: ``train.devices`` x ``train.num_nodes`` processes through Lightning's
DDP strategy (gloo on CPU, NCCL on GPUs).

Two ways the processes come to exist:
- **started by medlens** (``medlens train CFG --devices N --strategy ddp`` on one machine): the command's
  process starts N workers through Lightning's multiprocessing launcher and stays outside them; it alone writes
  the run folder, evaluates and reports after they join. CPU workers come from a fork server that imported the
  training code once (``WORKER_PRELOAD``): with ``spawn`` every worker imported torch, Lightning and medlens again
  (a tiny 2-process run: 17.8 s of CPU, 8.7 s from the fork server, 3.5 s for each later run of the same
  process); GPU workers are spawned (``SPAWN``). Never a plain fork: the caller's OpenMP pool is not fork-safe.
  What a worker must share with the caller, the random states and torch's determinism flags, travels with the
  job (``engine.train``'s ``CallerState``), not through the fork server's inheritance (it started with the
  first run).
- **started by a launcher** (``torchrun``, ``srun``): Lightning's cluster environments read the launcher's
  variables (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, ``SLURM_PROCID``/``SLURM_NTASKS``...); every process runs
  the same command, and only global rank 0 writes the run folder; the others fit and exit.

Nothing here is a second engine: it turns the config into Lightning ``Trainer`` arguments.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy

from medlens.errors import ConfigError


#: the launchers medlens itself uses on one machine (recorded in run.json): CPU workers come from a fork server;
#: GPU workers are spawned (Lightning refuses to fork, even from a server, once the caller has touched CUDA)
FORK_SERVER, SPAWN = "medlens (fork server)", "medlens (spawn)"

#: what the fork server imports before the first job: everything a training worker unpickles
WORKER_PRELOAD = ["medlens.engine.train"]


def launcher_environment():
    """Lightning's cluster environment when a launcher (torchrun, SLURM's srun) started this process, else None."""
    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect():
        return SLURMEnvironment()
    return None


def global_rank() -> int:
    """This process's global rank under a launcher; 0 when no launcher started it."""
    env = launcher_environment()
    return int(env.global_rank()) if env is not None else 0


def machine_devices(accelerator: str) -> int:
    """How many devices of this kind the machine has (GPUs, or CPU cores for CPU processes)."""
    return torch.cuda.device_count() if accelerator == "gpu" else (os.cpu_count() or 1)


@dataclass(frozen=True)
class DistributedPlan:
    strategy: str        # "single" or "ddp"
    accelerator: str     # "cpu" or "gpu"
    devices: int         # processes per node
    num_nodes: int
    backend: str | None  # "gloo" (CPU) or "nccl" (GPU); None for one process
    launcher: str        # "none", FORK_SERVER, SPAWN, "torchrun", "slurm"
    rank: int

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def started_by_medlens(self) -> bool:
        """Whether this process starts the workers (and stays outside them)."""
        return self.launcher in (FORK_SERVER, SPAWN)

    @property
    def distributed(self) -> bool:
        return self.strategy == "ddp"

    def summary(self) -> dict:
        return {"strategy": self.strategy, "world_size": self.world_size, "devices": self.devices,
                "num_nodes": self.num_nodes, "accelerator": self.accelerator, "backend": self.backend,
                "launcher": self.launcher}


def plan(train_cfg) -> DistributedPlan:
    """The distributed layout of ``train`` (``devices``, ``num_nodes``, ``strategy``) on this machine; a
    layout the machine cannot hold is a one-line ``ConfigError``."""
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    devices, nodes, strategy = train_cfg.devices, train_cfg.num_nodes, train_cfg.strategy
    if strategy == "auto":
        strategy = "ddp" if devices * nodes > 1 else "single"
    if strategy == "single" and devices * nodes > 1:
        raise ConfigError(f"train.strategy single runs one process, but devices x num_nodes = {devices * nodes}")
    have = machine_devices(accelerator)
    if devices > have:
        unit = "GPU(s)" if accelerator == "gpu" else "CPU core(s)"
        raise ConfigError(f"train.devices {devices} is more than this machine has ({have} {unit})")
    env = launcher_environment()
    launcher = "none"
    if env is not None:
        launcher = "torchrun" if type(env).__name__ == "TorchElasticEnvironment" else "slurm"
        if strategy == "ddp" and int(env.world_size()) != devices * nodes:
            raise ConfigError(f"the launcher started {env.world_size()} processes, but train.devices x "
                              f"train.num_nodes = {devices} x {nodes}")
    elif strategy == "ddp":
        if nodes > 1:
            raise ConfigError(f"train.num_nodes {nodes} needs a launcher on each node (torchrun or srun; see "
                              "docs/distributed.md)")
        launcher = FORK_SERVER if accelerator == "cpu" else SPAWN
    backend = ("nccl" if accelerator == "gpu" else "gloo") if strategy == "ddp" else None
    return DistributedPlan(strategy, accelerator, devices, nodes, backend, launcher,
                           int(env.global_rank()) if env is not None else 0)


def trainer_arguments(p: DistributedPlan) -> dict:
    """``L.Trainer`` keyword arguments of a plan."""
    if not p.distributed:
        return {"accelerator": "cpu" if p.accelerator == "cpu" else "auto", "devices": 1}
    start: Literal["forkserver", "spawn", "popen"] = \
        "forkserver" if p.launcher == FORK_SERVER else "spawn" if p.launcher == SPAWN else "popen"
    if start == "forkserver":
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # a worker re-importing the caller's script, which trains at import: it would start workers again
            raise ConfigError("data-parallel training started while a worker imported the calling script: put "
                              "the script's training under `if __name__ == \"__main__\":`")
        multiprocessing.set_forkserver_preload(WORKER_PRELOAD)  # no effect once the server runs
    if p.started_by_medlens:
        os.environ.pop("MASTER_PORT", None)  # a fresh free port for each launch (a previous one may linger)
        # the module goes to the workers pickled; torch's default fd sharing fails on its empty buffers here
        torch.multiprocessing.set_sharing_strategy("file_system")
    # BatchNorm statistics synchronised across processes where torch can (SyncBatchNorm is GPU-only); on CPU each
    # process normalises its own slice of the global batch
    return {"accelerator": p.accelerator, "devices": p.devices, "num_nodes": p.num_nodes,
            "sync_batchnorm": p.accelerator == "gpu",
            "strategy": DDPStrategy(process_group_backend=p.backend, start_method=start)}
