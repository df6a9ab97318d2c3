"""Nodule patch benchmark: extraction speed and patch-store read throughput.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/nodules.py [--n 2000]

Table 1: patches/s extracting 2D (50x50 axial) and 3D (32^3 at 1 mm, resampled) patches around
random lung points of the LUNA16 scan (the scan already loaded; loading is timed separately).
Table 2: reading the same patches for training, in shuffled batches of 64: from the HDF5 store on
disk (chunked per patch, lzf, lung window applied on read) against slicing an in-memory NumPy array
holding the same patches (plus the same windowing), as a ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    import h5py
    import numpy as np

    from medlens.data.nodules import PatchStoreDataset, extract_patch_2d, extract_patch_3d, sample_negatives
    from medlens.io import load
    from medlens.io.windows import apply_window
    from medlens.utils import data_dir

    t0 = time.perf_counter()
    img = load(next((data_dir() / "luna16").glob("*.mhd")))
    t_load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    pts = sample_negatives(img, np.zeros((0, 3)), args.n, 0.0, rng)
    t_neg = time.perf_counter() - t0
    rows = [f"| step (LUNA16 scan 133x512x512, {len(pts)} points) | patches/s | total s |", "|---|---|---|",
            f"| load .mhd scan | - | {t_load:.2f} |", f"| lung mask + sample {len(pts)} negative points | - | {t_neg:.2f} |"]
    out = {}
    for name, fn in (("2D 50x50 axial", lambda w: extract_patch_2d(img, w, 50)),
                     ("3D 32^3 @ 1 mm (resampled)", lambda w: extract_patch_3d(img, w, 32, 1.0))):
        t0 = time.perf_counter()
        patches = [fn(w) for w in pts]
        dt = time.perf_counter() - t0
        out[name] = np.stack([p for p in patches if p is not None])[:, None]
        rows.append(f"| extract {name} | {len(pts) / dt:,.0f} | {dt:.2f} |")
    print("\n".join(rows) + "\n")
    rows = ["| read path (shuffled batches of 64, lung window applied) | patches/s | ratio to in-memory |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, arr in out.items():
            path = Path(tmp) / "store.h5"
            with h5py.File(path, "w") as f:
                f.create_dataset("patches", data=arr, chunks=(1,) + arr.shape[1:], compression="lzf")
                f.create_dataset("labels", data=np.zeros(len(arr), np.int64))
                f.create_dataset("world_mm", data=np.zeros((len(arr), 3)))
                f.create_dataset("seriesuid", data=np.array(["s"] * len(arr), object), dtype=h5py.string_dtype())
                f.create_dataset("patient_id", data=np.array(["p"] * len(arr), object), dtype=h5py.string_dtype())
            ds = PatchStoreDataset(path)
            order = rng.permutation(len(arr))
            batches = [order[i:i + 64] for i in range(0, len(order), 64)]
            ds.batch(batches[0])  # warm-up: the first call imports torch, which is not a read cost
            t0 = time.perf_counter()
            for b in batches:
                ds.batch(b)
            t_store = time.perf_counter() - t0
            t0 = time.perf_counter()
            for b in batches:
                apply_window(arr[b], "lung")
            t_mem = time.perf_counter() - t0
            rows.append(f"| HDF5 store, {name} | {len(arr) / t_store:,.0f} | {t_mem / t_store:.2f}x |")
            rows.append(f"| in-memory NumPy, {name} | {len(arr) / t_mem:,.0f} | 1.00x |")
            ds._f.close()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
