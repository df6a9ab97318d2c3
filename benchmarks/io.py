"""I/O benchmark: loading the LIDC-IDRI-0001 series, and fuzzing the readers.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/io.py [--repeat 5] [--fuzz 1000]
    .venv/bin/python benchmarks/io.py --quick        # smoke run: 1 round, 20 fuzz cases per reader

Table 1 times three ways of loading the same CT series (LIDC-IDRI-0001; the table header gives the
shape of the volume loaded) into a HU volume, in one run,
interleaved, best and median of ``--repeat`` rounds: medlens (``read_dicom_series``: groups by
series, sorts along the slice normal, checks spacing, applies rescale), SimpleITK's
``ImageSeriesReader`` (GDCM, C++), and a naive pydicom loop (sort by InstanceNumber,
``pixel_array``, rescale). All three must give the same array.

Table 2 mutates real files (pydicom's CT_small.dcm, a NIfTI written from a real MRI volume) with
random byte edits and truncations and counts any exception other than medlens' own
``MedlensError`` as a crash.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from _common import quick_banner

warnings.filterwarnings("ignore")

NIFTI1_HEADER = 352   # bytes: the 348-byte NIfTI-1 header + the 4-byte extension flag; mutations stay inside it


def load_medlens(folder):
    from medlens.io.dicom import read_dicom_series

    return read_dicom_series(folder).array


def load_sitk(folder):
    import SimpleITK as sitk

    r = sitk.ImageSeriesReader()
    sub = next(p.parent for p in Path(folder).rglob("*.dcm"))
    uid = r.GetGDCMSeriesIDs(str(sub))[0]
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(sub), uid))
    return sitk.GetArrayFromImage(r.Execute())


def load_naive(folder):
    import numpy as np
    import pydicom

    dss = [pydicom.dcmread(f) for f in Path(folder).rglob("*.dcm")]
    dss.sort(key=lambda d: int(d.InstanceNumber))
    vol = np.stack([d.pixel_array.astype(np.int16) * int(d.RescaleSlope) + int(d.RescaleIntercept) for d in dss])
    return vol[::-1] if float(dss[0].ImagePositionPatient[2]) > float(dss[-1].ImagePositionPatient[2]) else vol


def timing(folder: Path, repeat: int) -> list[str]:
    import numpy as np

    fns = {"medlens read_dicom_series": load_medlens, "SimpleITK ImageSeriesReader (GDCM)": load_sitk,
           "naive pydicom loop": load_naive}
    ref = None
    for name, fn in fns.items():  # warm-up (file cache) and agreement check
        a = fn(folder)
        ref = a if ref is None else ref
        if not np.array_equal(a, ref):
            raise SystemExit(f"{name} gives a different volume ({a.shape}) from the others ({ref.shape})")
    n_files = sum(1 for _ in Path(folder).rglob("*.dcm"))
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(folder)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["SimpleITK ImageSeriesReader (GDCM)"])
    shape = " x ".join(map(str, ref.shape))
    lines = [f"| loader ({Path(folder).name}: {n_files} files -> {shape} {ref.dtype}, {repeat} rounds) | best s "
             "| median s | ratio to SimpleITK |",
             "|---|---|---|---|"]
    for name, ts in times.items():
        lines.append(f"| {name} | {min(ts):.3f} | {statistics.median(ts):.3f} | {statistics.median(ts) / base:.2f}x |")
    return lines


def fuzz(n: int, seed: int = 0) -> list[str]:
    import nibabel as nib
    import numpy as np
    import pydicom

    from medlens.errors import MedlensError
    from medlens.io import load
    from medlens.utils import data_dir

    ct = (Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm").read_bytes()
    brain = load(data_dir() / "mri-seg" / "breast1_image.nrrd")
    with tempfile.TemporaryDirectory() as tmp:
        nii_path = Path(tmp) / "src.nii"
        nib.save(nib.Nifti1Image(brain.array.transpose(2, 1, 0).astype(np.int16), np.eye(4)), nii_path)
        nii = nii_path.read_bytes()
        rng = random.Random(seed)
        lines = ["| reader | cases | loaded | refused (MedlensError) | crashes (other exceptions) |", "|---|---|---|---|---|"]
        crashes_all = []
        for name, data, suffix, header in (("DICOM (CT_small.dcm)", ct, ".dcm", len(ct)),
                                           (f"NIfTI (breast1 MRI volume {' x '.join(map(str, brain.array.shape))})",
                                            nii, ".nii", NIFTI1_HEADER)):
            ok = refused = 0
            crashes = []
            for i in range(n):
                b = bytearray(data)
                for _ in range(rng.randint(1, 12)):
                    b[rng.randrange(header)] = rng.randrange(256)
                if rng.random() < 0.3:
                    b = b[: rng.randint(1, len(b))]
                p = Path(tmp) / f"case{suffix}"
                p.write_bytes(bytes(b))
                try:
                    load(p)
                    ok += 1
                except MedlensError:
                    refused += 1
                except Exception as e:  # noqa: BLE001 - counting crashes is the point
                    crashes.append(f"{name} case {i}: {type(e).__name__}: {e}")
            lines.append(f"| {name} | {n} | {ok} | {refused} | {len(crashes)} |")
            crashes_all += crashes
    for c in crashes_all[:10]:
        lines.append(f"crash: {c}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--fuzz", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 20 fuzz cases per reader")
    args = ap.parse_args()
    quick_banner(args.quick, "1 timing round, 20 fuzz cases per reader")
    from medlens.utils import data_dir

    repeat, n_fuzz = (1, 20) if args.quick else (args.repeat, args.fuzz)
    folder = data_dir() / "lidc-idri-0001"
    print("\n".join(timing(folder, repeat)))
    print()
    print("\n".join(fuzz(n_fuzz)))
    print(f"\n(cpus: {os.cpu_count()})")


if __name__ == "__main__":
    main()
