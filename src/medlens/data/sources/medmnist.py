"""``data.source: medmnist``: a MedMNIST catalogue dataset (``data.name``, ``data.size``) or a MedMNIST-format
``.npz`` (``data.path``), official splits, colour mode applied to the stored arrays."""

from __future__ import annotations

import numpy as np

from medlens.data.base import SplitData
from medlens.data.catalog import MEDMNIST_MODALITY, get_info
from medlens.data.medmnist import load_medmnist, medmnist_path, read_npz
from medlens.data.sources.registry import DataSource, register_source


@register_source
class MedMNISTSource(DataSource):
    name = "medmnist"
    summary = "MedMNIST catalogue dataset (data.name, data.size) or a MedMNIST-format .npz (data.path)"
    needs_path = False
    plan_suffixes = (".npz",)

    def check(self, cfg, task) -> None:
        if not cfg.name and not cfg.path:
            raise ValueError("data.name (e.g. pneumoniamnist) or data.path (a MedMNIST-format .npz) is required "
                             "for source 'medmnist'")

    def load(self, cfg, *, seed, prepare, progress):
        data = load_medmnist(cfg.name, cfg.size, check_md5=cfg.check_md5, path=cfg.resolved_path())
        wanted = 3 if cfg.color == "rgb" else 1
        return data if data.train.in_channels == wanted else recolor(data, cfg.color)

    def plan_section(self, path: str) -> dict:
        return {"source": self.name, "path": path, "check_md5": False}  # a file outside the catalogue

    def stored_file(self, cfg):
        if cfg.path:
            return cfg.resolved_path()
        return medmnist_path(cfg.name, cfg.size)

    def for_plan(self, cfg):
        """A 3-channel MedMNIST-format file is read in colour."""
        if cfg.color != "gray":
            return cfg
        p = self.stored_file(cfg)
        if p is not None and p.exists():
            shape = read_npz(p)["train_images"].shape
            if len(shape) == 4 and shape[-1] == 3 and shape[1] > 3:   # (n, h, w, 3): colour images
                return cfg.model_copy(update={"color": "rgb"})
        return cfg

    def profile_hints(self, train, cfg):
        if not cfg.name:  # a MedMNIST-format file outside the catalogue: colour as loaded, modality unknown
            return None, train.in_channels == 3
        info = get_info(cfg.name)
        return MEDMNIST_MODALITY.get(info.name), info.n_channels == 3


def recolor(data, color: str):
    """Apply the colour mode to MedMNIST RGB data (e.g. green channel for fundus)."""
    def conv(ds):
        x = ds.images
        if x.shape[1] == 3 and color == "green":
            x = x[:, 1:2]
        elif x.shape[1] == 3 and color == "gray":
            x = np.round(np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), x.astype(np.float32),
                                      axes=(0, 1))[:, None]).astype(np.uint8)
        elif x.shape[1] == 1 and color == "rgb":
            x = np.repeat(x, 3, axis=1)
        out = ds.subset(np.arange(len(ds)))
        out.images = np.ascontiguousarray(x)
        return out

    return SplitData(conv(data.train), conv(data.val), conv(data.test), data.split_method)
