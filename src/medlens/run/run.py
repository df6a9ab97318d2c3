"""``Run``: one trained run folder, opened once and typed."""

from __future__ import annotations

import hashlib
import itertools
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from medlens.config import ExperimentConfig, load_config
from medlens.engine.classical import ClassicalModel, load_model
from medlens.engine.network import ClassifierNet
from medlens.errors import DataError, MedlensError, MedlensWarning
from medlens.models import create_model
from medlens.run.folder import RunFolder
from medlens.run.meta import META_FILE, RunMeta, Threshold
from medlens.tasks import Task, get_task


@dataclass
class Run:
    """A run folder: ``config.yaml`` + ``run.json`` + weights (``model.pt``, or ``model.skops`` for classical runs)."""

    dir: Path
    meta: RunMeta
    config: ExperimentConfig
    _net: torch.nn.Module | ClassicalModel | None = field(default=None, repr=False)

    @classmethod
    def open(cls, run_dir: str | Path, expect: str | None = None) -> "Run":
        """Open a run folder; ``expect`` ("classification" or "segmentation") refuses the other kind."""
        run = Path(run_dir)
        meta = RunMeta.load(run)
        if not (run / "config.yaml").is_file():
            raise MedlensError("run folder has run.json but no config.yaml", run)
        cfg = load_config(run / "config.yaml")
        is_seg = get_task(meta.task).dense
        if expect == "segmentation" and not is_seg:
            raise MedlensError(f"not a segmentation run (its task is {meta.task}); use `medlens predict`", run)
        if expect == "classification" and is_seg:
            raise MedlensError("a segmentation run; use `medlens segment` (explanations and predict are for "
                               "classifiers)", run)
        return cls(run, meta, cfg)

    # what everything above reads
    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def task(self) -> str:
        return self.meta.task

    @property
    def task_type(self) -> Task:
        """The registered task of this run: activation, decisions, metrics family..."""
        return get_task(self.meta.task)

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    @property
    def threshold(self) -> Threshold | None:
        return self.meta.threshold

    @property
    def is_classical(self) -> bool:
        return self.meta.kind == "classical"

    @property
    def weights_path(self) -> Path:
        return self.dir / ("model.skops" if self.is_classical else "model.pt")

    def require_complete(self, allow_incomplete: bool = False) -> "Run":
        """Refuse a run whose training did not finish (``status`` other than ``complete``): predict, serve
        and export use finished runs only; ``allow_incomplete`` (``--allow-incomplete``) warns instead."""
        status = self.meta.status
        if status != "complete":
            what = {"training": "training did not finish", "failed": "training failed"}.get(status, "not finished")
            if not allow_incomplete:
                raise MedlensError(f"run is in state '{status}', not 'complete' ({what}); pass --allow-incomplete "
                                   "to use it anyway", self.dir)
            warnings.warn(f"{self.dir}: run is in state '{status}' ({what}); used anyway (--allow-incomplete)",
                          MedlensWarning, stacklevel=2)
        return self

    def require_weights(self) -> Path:
        p = self.weights_path
        if not p.is_file():
            start = "from its last checkpoint" if RunFolder(self.dir).has_checkpoint() else "from epoch 0 (no checkpoint yet)"
            raise MedlensError(f"run has no {p.name}: training did not finish; continue it with `medlens train "
                               f"{self.dir / 'config.yaml'} --resume` (it restarts {start})", self.dir)
        return p

    @cached_property
    def weights_sha256(self) -> str:
        """Hash of the weights file: identifies the exact model in exported results."""
        h = hashlib.sha256()
        with open(self.require_weights(), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def build_network(self) -> ClassifierNet:
        """The untrained network of this run (normalisation + architecture)."""
        m, prep = self.meta, self.meta.preprocessing
        net = create_model(m.model, m.in_channels, m.n_outputs, prep.spatial_dims, tuple(m.input_size),
                           **m.model_params)
        return ClassifierNet(net, prep.mean, prep.std, m.target_scale)

    @property
    def model(self) -> torch.nn.Module | ClassicalModel:
        """The trained torch network (weights only, eval mode), loaded once; classical runs: the estimator."""
        if self._net is None:
            self._net = self._load_classical() if self.is_classical else self._load_torch()
        return self._net

    @property
    def network(self) -> torch.nn.Module:
        """``model`` of a deep-learning run (its torch network, or an export's runtime attached with
        ``use_model``); a one-line error for a classical run."""
        net = self.model
        if not isinstance(net, torch.nn.Module):
            raise MedlensError(f"a classical run ({self.meta.model}) has no neural network; this needs a deep-learning "
                               "run", self.dir)
        return net

    @property
    def estimator(self) -> ClassicalModel:
        """``model`` of a classical run (random forest / SVM); a one-line error for a deep-learning run."""
        est = self.model
        if isinstance(est, torch.nn.Module):
            raise MedlensError(f"not a classical run ({self.meta.model} is a neural network)", self.dir)
        return est

    def use_model(self, net: torch.nn.Module | ClassicalModel) -> "Run":
        """Attach an in-memory trained network (right after training) instead of reading the weights."""
        self._net = net.eval() if isinstance(net, torch.nn.Module) else net
        return self

    def _check_network_size(self, weights: Path) -> None:
        """Refuse a ``model``/``model_params`` in run.json that describe a network far larger than the weights
        file (a width of 65,536 would allocate terabytes before ``load_state_dict`` could object). The network
        is built on PyTorch's ``meta`` device, which allocates nothing, to count its bytes."""
        try:
            with torch.device("meta"):
                probe = self.build_network()
        except MedlensError:
            raise
        except Exception:  # noqa: BLE001  an architecture that cannot be built on the meta device: the real build reports
            return
        need = sum(t.numel() * t.element_size() for t in itertools.chain(probe.parameters(), probe.buffers()))
        have = weights.stat().st_size
        if need > 2 * have + (64 << 20):
            raise DataError(f"run.json describes a network of {need:,} bytes of weights ({self.meta.model}, "
                            f"model_params), but {weights.name} holds {have:,} bytes: run.json does not match "
                            "the weights", self.dir / META_FILE)

    def _load_torch(self) -> ClassifierNet:
        weights = self.require_weights()
        self._check_network_size(weights)
        try:
            net = self.build_network()
        except MedlensError:
            raise
        except Exception as e:  # noqa: BLE001  architectures raise many types for parameters that do not fit
            raise DataError(f"cannot build the network that run.json describes ({self.meta.model}: "
                            f"{type(e).__name__}: {' '.join(str(e).split())[:160]})", self.dir / META_FILE) from None
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as e:  # torch raises many types for foreign or corrupt files; all mean "unusable"
            raise DataError(f"cannot load weights ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                            weights) from None
        return net.eval()

    def _load_classical(self) -> ClassicalModel:
        return load_model(self.require_weights())

    def save_meta(self) -> Path:
        return self.meta.save(self.dir)
