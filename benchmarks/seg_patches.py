"""Peak RSS of one epoch of 3D segmentation patch sampling (issue 27 item 3): the cases in memory (the path before the
volume store) against the cases in the volume store (``PatchSampler`` reading only the chunks of each patch).

    MEDLENS_DATA=/work/shared/data flock /tmp/bench.lock .venv/bin/python benchmarks/seg_patches.py
    MEDLENS_DATA=/work/shared/data flock /tmp/bench.lock .venv/bin/python benchmarks/seg_patches.py --copies 20

The cases are the real MRI volumes of ``$MEDLENS_DATA/mri-seg`` (brain1, brain2, breast1: NRRD image + label) prepared
as ``configs/mriseg_unet3d.yaml`` prepares them; ``--copies K`` copies the three pairs K times into a temporary
folder (K x 3 distinct cases on disk, each prepared and stored on its own) to show how memory grows with the number of
cases. Every case of every split feeds one sampler; one epoch is ``--patches`` patches of the config's patch size
(default: 64 per case). Each measurement is its own process (``ru_maxrss`` is a process's peak):

* ``prepare``: ``prepared_segmentation`` into an empty store (the one-time preparation);
* ``store``: the same call with the store built (it opens the stored cases), then the epoch;
* ``memory``: ``load_segmentation`` with the same preparation but no ``volume_key`` (every case held in memory, as
  before the store), then the epoch.

Printed per line: RSS after the imports, peak RSS after loading the cases, peak RSS after the epoch (the process's
high-water mark: what the OS had to give it), seconds to load and to sample, and the patches' checksum (the same in
both modes: the same patches).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _common import REPO  # noqa: F401 - puts src/ on the import path


def _rss_mb(field: str = "VmRSS") -> float:
    """The process's resident memory now (``VmRSS``; ``RssAnon``: its own heap, ``RssFile``: mapped file pages)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, folder: str, store: str, patches: int) -> dict:
    """One measurement in this process: load the cases (``mode``), then one epoch of patches."""
    import numpy as np

    from medlens.config import load_config
    from medlens.data.segmentation import PatchSampler, load_segmentation
    from medlens.data.sources import get_source
    from medlens.transforms.preprocess import Preparer, prepared_segmentation, segmentation_spec

    base, base_anon, base_file = _rss_mb(), _rss_mb("RssAnon"), _rss_mb("RssFile")
    cfg = load_config(REPO / "configs" / "mriseg_unet3d.yaml")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": folder, "store": store})})
    t0 = time.perf_counter()
    if mode == "memory":  # the same preparation of a volume, without a volume_key: every case held in memory
        rows = get_source(cfg.data.source).pair_rows(cfg.data)
        data = load_segmentation(cfg.data, cfg.segmentation, Preparer(segmentation_spec(cfg.data, 3), scale=True),
                                 rows, seed=cfg.seed)
    else:
        data = prepared_segmentation(cfg.data, cfg.segmentation, seed=cfg.seed)
    cases = data.train + data.val + data.test
    loaded, t_load = _peak_mb(), time.perf_counter() - t0
    if mode == "prepare":
        return {"mode": mode, "cases": len(cases), "base_mb": base, "load_peak_mb": loaded, "load_s": t_load}
    n = patches or 64 * len(cases)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # breast1 is smaller than the patch in x: padded, as in training
        sampler = PatchSampler(cases, cfg.segmentation.patch_size, n, cfg.segmentation.foreground_ratio, cfg.seed)
    t0 = time.perf_counter()
    check, anon, mapped = 0.0, _rss_mb("RssAnon"), _rss_mb("RssFile")
    for i in range(n):
        x, y = sampler[i]
        check += float(x.double().sum()) + 7.0 * float(y.sum())
        if i % 32 == 31:
            anon, mapped = max(anon, _rss_mb("RssAnon")), max(mapped, _rss_mb("RssFile"))
    return {"mode": mode, "cases": len(cases), "stored": sum(c.stored is not None for c in cases), "patches": n,
            "base_mb": base, "load_peak_mb": loaded, "epoch_peak_mb": _peak_mb(), "load_s": t_load,
            "epoch_anon_mb": anon, "epoch_file_mb": mapped, "base_anon_mb": base_anon, "base_file_mb": base_file,
            "epoch_s": time.perf_counter() - t0, "checksum": round(check, 3),
            "python": sys.version.split()[0], "numpy": np.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=1, help="copies of the three MRI pairs (default 1: the files as "
                    "they are on disk)")
    ap.add_argument("--patches", type=int, default=0, help="patches in the epoch (default: 64 per case)")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "FOLDER", "STORE", "PATCHES"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.child[2], int(a.child[3]))))
        return
    src = Path(os.environ.get("MEDLENS_DATA", REPO.parent / "shared" / "data")) / "mri-seg"
    if not src.is_dir():
        sys.exit(f"{src}: the mri-seg volumes are not there (set MEDLENS_DATA)")
    work = Path(tempfile.mkdtemp(prefix="seg-patches-"))
    try:
        folder = src
        if a.copies > 1:
            folder = work / "data"
            folder.mkdir()
            for k in range(a.copies):
                for f in sorted(src.glob("*.nrrd")):
                    stem, kind = f.name.rsplit("_", 1)  # brain1_image.nrrd -> brain1, image.nrrd
                    shutil.copy(f, folder / f"{stem}c{k:03d}_{kind}")
        rows = []
        for mode in ("prepare", "store", "memory"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(folder), str(work / "store"),
                                  str(a.patches)], capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"{mode}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        size = sum(p.stat().st_size for p in (work / "store").rglob("*.b2nd")) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"mri-seg x {a.copies}: {rows[0]['cases']} cases; store {size:.1f} MB on disk; load average "
          f"{os.getloadavg()[0]:.2f}")
    nan = float("nan")
    print(f"{'mode':8} {'base MB':>8} {'load peak':>10} {'epoch peak':>11} {'anon+':>6} {'file+':>6} {'load s':>7} "
          f"{'epoch s':>8} {'patches':>8}  checksum")
    for r in rows:
        print(f"{r['mode']:8} {r['base_mb']:8.0f} {r['load_peak_mb']:10.0f} {r.get('epoch_peak_mb', nan):11.0f} "
              f"{r.get('epoch_anon_mb', nan) - r['base_anon_mb'] if 'base_anon_mb' in r else nan:6.0f} "
              f"{r.get('epoch_file_mb', nan) - r['base_file_mb'] if 'base_file_mb' in r else nan:6.0f} "
              f"{r['load_s']:7.2f} {r.get('epoch_s', nan):8.2f} {r.get('patches', ''):>8}  {r.get('checksum', '')}")
    st, mem = rows[1], rows[2]
    print(f"epoch peak above the imports: store {st['epoch_peak_mb'] - st['base_mb']:.0f} MB, memory "
          f"{mem['epoch_peak_mb'] - mem['base_mb']:.0f} MB; same patches: {st['checksum'] == mem['checksum']}")
    print("anon+ / file+: the most heap (RssAnon) and mapped file pages (RssFile, the store's memory-mapped chunks: "
          "clean pages the kernel can drop) above the imports, sampled every 32 patches; times depend on the load")


if __name__ == "__main__":
    main()
