"""Issue 26: ``medlens view --window lung`` wrote an all-white coronal MIP of a chest CT.

Projected through the whole volume, every coronal ray of a chest CT meets the table, a rib or the spine, so
73% of the lung-window MIP of LIDC-IDRI-0001 was saturated. The MIP is now a thin slab (10 mm) centred on
the coronal slice, as the chest is read: lungs dark, vessels bright, little saturated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from tests.clirun import medlens


def _ct(data_root: Path) -> Path:
    return next((data_root / "luna16").glob("*.mhd"))  # LIDC-IDRI-0001 as MetaImage (HU)


def _mip(folder: Path) -> np.ndarray:
    with PILImage.open(folder / "mip_coronal.png") as im:
        return np.asarray(im)


def test_lung_window_mip_of_a_real_ct_is_not_saturated(data_root, tmp_path):
    r = medlens("view", _ct(data_root), tmp_path / "views", "--window", "lung")
    assert r.returncode == 0, r.stderr
    m = _mip(tmp_path / "views")
    saturated, black = float((m == 255).mean()), float((m == 0).mean())
    assert saturated < 0.3, saturated
    assert len(np.unique(m)) > 100 and black < 0.5
    # lung parenchyma (dark) and vessels (bright) both show: the middle half of the rows spans the grey scale
    mid = m[m.shape[0] // 4: 3 * m.shape[0] // 4]
    assert np.percentile(mid, 10) < 80 and np.percentile(mid, 90) > 200


def test_whole_volume_mip_on_request_and_a_slab_thinner_than_a_slice(data_root, tmp_path):
    medlens("view", _ct(data_root), tmp_path / "whole", "--window", "lung", "--mip-slab", "0", check=True)
    assert float((_mip(tmp_path / "whole") == 255).mean()) > 0.5  # what the old default wrote
    medlens("view", _ct(data_root), tmp_path / "thin", "--window", "lung", "--mip-slab", "0.1", check=True)
    with PILImage.open(tmp_path / "thin" / "coronal.png") as c:
        assert np.array_equal(_mip(tmp_path / "thin"), np.asarray(c))  # one slice: the coronal view itself
    r = medlens("view", _ct(data_root), tmp_path / "bad", "--mip-slab", "-5")
    assert r.returncode == 2 and "MIP slab" in r.stderr and not (tmp_path / "bad").exists()
