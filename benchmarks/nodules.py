"""Nodule patch benchmark: extraction speed and patch-store read throughput.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/nodules.py [--n 2000]
    .venv/bin/python benchmarks/nodules.py --quick        # smoke run: 64 points

Table 1: patches/s extracting 2D (50x50 axial) and 3D (32^3 at 1 mm, resampled) patches around
random lung points of the LUNA16 scan (the scan already loaded; loading is timed separately).
Table 2: reading the same patches for training, in shuffled batches of 64: from the HDF5 store on
disk (chunked per patch, lzf, lung window applied on read) against slicing an in-memory NumPy array
holding the same patches (plus the same windowing), as a ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from _common import quick_banner

warnings.filterwarnings("ignore")

PATCH_2D = 50        # px, axial
PATCH_3D = 32        # voxels per side
SPACING_3D = 1.0     # mm
BATCH = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 points")
    args = ap.parse_args()
    quick_banner(args.quick, "64 points")
    n_points = 64 if args.quick else args.n
    import h5py
    import numpy as np

    from medlens.data.nodules import PatchStoreDataset, extract_patch_2d, extract_patch_3d
    from medlens.io import load
    from medlens.io.windows import apply_window
    from medlens.utils import data_dir
    from medlens.workflow.nodules import sample_negatives

    t0 = time.perf_counter()
    img = load(next((data_dir() / "luna16").glob("*.mhd")))
    t_load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    pts = sample_negatives(img, np.zeros((0, 3)), n_points, 0.0, rng)
    t_neg = time.perf_counter() - t0
    shape = "x".join(map(str, img.array.shape))
    rows = [f"| step (LUNA16 scan {shape}, {len(pts)} points) | patches/s | patches | total s |", "|---|---|---|---|",
            f"| load .mhd scan | - | - | {t_load:.2f} |",
            f"| lung mask + sample {len(pts)} negative points | - | - | {t_neg:.2f} |"]
    out = {}
    for name, fn in ((f"2D {PATCH_2D}x{PATCH_2D} axial", lambda w: extract_patch_2d(img, w, PATCH_2D)),
                     (f"3D {PATCH_3D}^3 @ {SPACING_3D:g} mm (resampled)",
                      lambda w: extract_patch_3d(img, w, PATCH_3D, SPACING_3D))):
        t0 = time.perf_counter()
        patches = [fn(w) for w in pts]
        dt = time.perf_counter() - t0
        kept = [p for p in patches if p is not None]
        out[name] = np.stack(kept)[:, None]
        rows.append(f"| extract {name} | {len(pts) / dt:,.0f} | {len(kept)} of {len(pts)} | {dt:.2f} |")
    print("\n".join(rows) + "\n")
    rows = [f"| read path (shuffled batches of {BATCH}, lung window applied) | patches | patches/s | ratio to in-memory |",
            "|---|---|---|---|"]
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
            batches = [order[i:i + BATCH] for i in range(0, len(order), BATCH)]
            ds.batch(batches[0])  # warm-up: the first call imports torch, which is not a read cost
            t0 = time.perf_counter()
            for b in batches:
                ds.batch(b)
            t_store = time.perf_counter() - t0
            t0 = time.perf_counter()
            for b in batches:
                apply_window(arr[b], "lung")
            t_mem = time.perf_counter() - t0
            rows.append(f"| HDF5 store, {name} | {len(arr)} | {len(arr) / t_store:,.0f} | {t_mem / t_store:.2f}x |")
            rows.append(f"| in-memory NumPy, {name} | {len(arr)} | {len(arr) / t_mem:,.0f} | 1.00x |")
            ds._f.close()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
