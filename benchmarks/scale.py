"""Scale benchmark of issue 27 (deliver 5): the prepared store, streaming training, batch predict and Ray, on
synthetic corpora that this script writes itself and removes at the end.

    nice -n 5 .venv/bin/python benchmarks/scale.py                 # full size (tens of minutes on 2 cores)
    .venv/bin/python benchmarks/scale.py --quick                   # smoke run: small N, figures mean nothing
    .venv/bin/python benchmarks/scale.py --work /big/disk --rss-n 2000,10000,40000 --predict-n 20000

Corpora (``--work``, else a temporary folder; removed unless ``--keep``): synthetic radiographs (smooth anatomy-like
shapes + noise, two classes) as 8-bit PNG and as 12-bit DICOM DX at 512 px; 8-bit PNGs at 256 px for training,
memory and predict; CT-like volumes (int16 HU, NIfTI). Every figure of the table is measured in this run, printed
as a rate and as a ratio to the line it is compared with; the load average of the machine is printed beside it
(other processes on the cores lower every rate; ``--repeat`` tries of the store-preparation lines and of the two
2,000-file predict commands, alternated, print the best of each). Lines:

* store preparation (``medlens.data.store.prepare_store``) with 1 and 2 workers, each into an empty store, per
  corpus; against MONAI ``PersistentDataset``'s first epoch (the same PNGs, the same resize, a 2-worker DataLoader);
* training throughput (one small CNN, the same loop, batch 64, 2 epochs) from the store, from the in-memory array
  (the path before issue 27), from MONAI ``CacheDataset`` + a 2-worker DataLoader, and from WebDataset shards of the
  same prepared arrays (LitData was not chosen because installing it replaces this venv's CPU torch with a CUDA
  build and pulls torchvision); each with its first-to-second epoch ratio;
* ``medlens train`` peak RSS (child rusage) at ``--rss-n`` images of 256 px (CSV manifests), one subprocess each;
* ``medlens predict`` files/s: the batch path (``--out results.csv``) against the previous command path (the files
  as arguments, all held, ``Predictor.predict_files``) and a plain DataLoader loop (2 workers, cv2 decode, the
  run's model; no profile check, no results file); over ``--predict-n`` PNGs: RSS sampled through the run (flat?),
  and ``kill -9`` at about half way then ``--resume``: rows, distinct inputs, duplicates;
* Ray: ``--engine ray --workers 2`` (local instance) against one process (``--workers 0``).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import _common  # noqa: F401  (the import path)
from _common import quick_banner

import cv2
import nibabel as nib
import numpy as np
import pydicom
import torch
import webdataset as wds
from monai.data import CacheDataset, PersistentDataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized, ScaleIntensityd
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from medlens.data.base import ArrayDataset
from medlens.data.store import StoreImages, prepare_store, stored_images
from medlens.engine.sampling import make_loader
from medlens.models import create_model
from medlens.run import Predictor, Run
from medlens.transforms.preprocess import InputSpec, Preparer

MEDLENS = str(Path(sys.executable).with_name("medlens"))
PROCESS_START = [0.0]   # seconds a predict process takes to start (predict_section measures it)
CLASSES = ("normal", "abnormal")


# ------------------------------------------------------------------------------------------------ corpora
_BANK: dict[int, list[np.ndarray]] = {}


def _base(k: int, size: int) -> np.ndarray:
    """One of 32 smooth chest-radiograph-like images (body, lung fields; an opacity when ``k`` is odd), float32 in
    [0, 4095] values."""
    rng = np.random.default_rng(k)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = 0.5 + rng.normal(0, 0.03), 0.5 + rng.normal(0, 0.03)
    body = np.exp(-(((xx - cx) / 0.42) ** 4 + ((yy - cy) / 0.48) ** 4))
    lungs = sum(np.exp(-(((xx - cx - s * 0.17) / 0.12) ** 2 + ((yy - cy + 0.03) / 0.27) ** 2)) for s in (-1, 1))
    img = 900 + 2200 * body - 1400 * lungs
    if k % 2:
        ox, oy = cx + rng.choice((-0.17, 0.17)), cy + rng.uniform(-0.15, 0.2)
        img += 900 * np.exp(-(((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * rng.uniform(0.03, 0.06) ** 2)))
    return img.astype(np.float32)


def radiograph(i: int, size: int) -> tuple[np.ndarray, int]:
    """A radiograph-like uint16 image in [0, 4095] and its label (``i`` odd: the opacity class): one of 32 base
    images, shifted by a few pixels, with noise; deterministic in ``i``."""
    bank = _BANK.setdefault(size, [])
    if not bank:
        bank.extend(_base(k, size) for k in range(32))
    rng = np.random.default_rng(i)
    base = bank[i % 32]   # the parity of i: the class
    shifted = np.roll(base, (int(rng.integers(-8, 9)), int(rng.integers(-8, 9))), axis=(0, 1))
    noise = rng.integers(-96, 97, size=(size, size), dtype=np.int16)
    return np.clip(shifted + noise, 0, 4095).astype(np.uint16), i % 2


def _png(args: tuple[int, int, str]) -> None:
    i, size, path = args
    a, _ = radiograph(i, size)
    cv2.imwrite(path, (a >> 4).astype(np.uint8))


def _dicom(args: tuple[int, int, str]) -> None:
    i, size, path = args
    a, _ = radiograph(i, size)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")   # DX for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.BodyPartExamined = f"SYN{i:06d}", "DX", "CHEST"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.35, 0.35]
    ds.PixelData = a.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _volume(args: tuple[int, tuple[int, int, int], str]) -> None:
    i, shape, path = args
    rng = np.random.default_rng(10_000 + i)
    z, y, x = np.ogrid[-1:1:complex(shape[0]), -1:1:complex(shape[1]), -1:1:complex(shape[2])]
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    lung = ((y / 0.55) ** 2 + ((np.abs(x) - 0.4) / 0.3) ** 2 < 1) & (np.abs(z) < 0.9)
    vol = np.where(body, 40, -1000) + np.where(lung, -850, 0) + rng.normal(0, 20, shape)
    nib.save(nib.Nifti1Image(vol.astype(np.int16).transpose(2, 1, 0), np.diag([0.7, 0.7, 1.25, 1.0])), path)


def write_corpus(root: Path, kind: str, n: int, size, start: int = 0, desc: str = "") -> list[Path]:
    """``n`` files of ``kind`` (png, dcm, nii) under ``root/<class>/``, written by 2 processes; their paths."""
    ext = {"png": ".png", "dcm": ".dcm", "nii": ".nii.gz"}[kind]
    jobs, paths = [], []
    for i in range(start, start + n):
        p = root / CLASSES[i % 2] / f"img{i:06d}{ext}"
        paths.append(p)
        if not p.exists():
            jobs.append((i, size, str(p)))
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    fn = {"png": _png, "dcm": _dicom, "nii": _volume}[kind]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        for _ in tqdm(pool.imap_unordered(fn, jobs, chunksize=16), total=len(jobs), desc=desc or f"writing {kind}",
                      leave=False, file=sys.stderr):
            pass
    return paths


def labels_of(paths: list[Path]) -> np.ndarray:
    return np.array([CLASSES.index(p.parent.name) for p in paths])


# ------------------------------------------------------------------------------------------------ helpers
class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, what: str, figure: str, ratio: str = "", note: str = "") -> None:
        load = f"{os.getloadavg()[0]:.2f}"
        self.rows.append((what, figure, ratio, f"{note} (load {load})".strip()))
        tqdm.write(f"  {what}: {figure} {ratio}", file=sys.stderr)

    def print(self) -> None:
        print("| measure | figure | ratio | note (1-min load average when measured) |")
        print("|---|---|---|---|")
        for r in self.rows:
            print("| " + " | ".join(r) + " |")


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def timed(fn, *args, **kw) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def run_child(cmd: list[str], env: dict | None = None, sample_rss: bool = False, kill_after: int | None = None,
              rows_file: Path | None = None) -> dict:
    """Run ``cmd``; its wall time, exit status, peak RSS (the child's rusage, MB) and, with ``sample_rss``, its
    RSS every 0.5 s. ``kill_after``: SIGKILL once ``rows_file`` has that many lines."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    samples: list[float] = []
    killed = False
    while p.poll() is None:
        if sample_rss:
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
                samples += [int(ln.split()[1]) / 1024 for ln in status.splitlines() if ln.startswith("VmRSS:")]
            except OSError:
                pass
        if kill_after and rows_file is not None and rows_file.exists() and not killed:
            with open(rows_file, "rb") as f:
                if sum(1 for _ in f) - 1 >= kill_after:
                    os.killpg(p.pid, signal.SIGKILL)
                    killed = True
        time.sleep(0.5 if sample_rss else 0.1)
    _, status, ru = os.wait4(p.pid, 0) if p.returncode is None else (0, 0, None)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    seconds = time.perf_counter() - t0
    rc = p.returncode if p.returncode is not None else os.waitstatus_to_exitcode(status)
    peak = ru.ru_maxrss / 1024 if ru is not None else (max(samples) if samples else float("nan"))
    return {"seconds": seconds, "rc": rc, "peak_mb": peak, "samples": samples, "stderr": err, "killed": killed}


def child_peak(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` under a tiny Python wrapper that reports the peak RSS of the child process (ru_maxrss of
    RUSAGE_CHILDREN: the largest of the process and the children it waited for) and the CPU seconds of all of
    them (user + system: a figure that other processes on the cores change less than wall time)."""
    wrapper = ("import json,resource,subprocess,sys,time;t=time.perf_counter();"
               "r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.PIPE);"
               "print(json.dumps({'rc':r.returncode,'seconds':time.perf_counter()-t,"
               "'peak_mb':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024,"
               "'cpu_s':resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime"
               "+resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime,"
               "'stderr':r.stderr.decode(errors='replace')[-2000:]}))")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(result: dict, what: str) -> dict:
    if result["rc"] != 0:
        raise SystemExit(f"{what} failed (exit {result['rc']}): {result['stderr'][-1500:]}")
    return result


# ------------------------------------------------------------------------------------------------ sections
def prep_section(t: Table, work: Path, corpora: dict[str, tuple[list[Path], InputSpec]], quick: bool,
                 repeat: int = 1) -> None:
    for name, (paths, spec) in corpora.items():
        rates: dict[int, float] = {1: 0.0, 2: 0.0}
        for _ in range(repeat):   # 1 and 2 workers alternated, the best of each: a burst of load hits one try
            for w in (1, 2):
                root = work / f"store-{name}-{w}"
                sec, res = timed(prepare_store, paths, Preparer(spec, store_root=str(root), workers=w), w,
                                 root=root)
                assert res.built == len(paths), (res.built, len(paths))
                rates[w] = max(rates[w], rate(len(paths), sec))
                shutil.rmtree(root)
        unit = "img/s" if spec.spatial_dims == 2 else "volumes/s"
        best = f", best of {repeat}" if repeat > 1 else ""
        t.add(f"store preparation, {name}, 1 worker", f"{rates[1]:.1f} {unit}", "1.00x",
              f"{len(paths)} files{best}")
        t.add(f"store preparation, {name}, 2 workers", f"{rates[2]:.1f} {unit}", f"{rates[2] / rates[1]:.2f}x of 1 "
              "worker", f"target >= 1.8x{best}")
        if name.startswith("PNG"):
            monai = monai_persistent_first_epoch(paths, spec, work / "monai-persistent")
            t.add(f"MONAI PersistentDataset first epoch, {name}, 2-worker DataLoader", f"{monai:.1f} img/s",
                  f"store 2 workers = {rates[2] / monai:.2f}x")


def _monai_transforms(size: tuple[int, ...]):
    return Compose([LoadImaged(keys="image", reader="PILReader", image_only=True),
                    EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
                    Resized(keys="image", spatial_size=size, mode="area"), ScaleIntensityd(keys="image")])


def _collate_first(items):
    return items


def monai_persistent_first_epoch(paths: list[Path], spec: InputSpec, cache: Path) -> float:
    items = [{"image": str(p), "label": int(y)} for p, y in zip(paths, labels_of(paths))]
    assert spec.size is not None
    ds = PersistentDataset(items, transform=_monai_transforms(spec.size), cache_dir=str(cache))
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=2, collate_fn=_collate_first)
    sec, _ = timed(lambda: sum(len(b) for b in loader))
    shutil.rmtree(cache, ignore_errors=True)
    return rate(len(paths), sec)


def train_epochs(batches_of_epoch, n: int, in_ch: int, epochs: int = 2, threads: int = 2) -> list[float]:
    """img/s of each epoch of one small CNN trained on what ``batches_of_epoch(epoch)`` yields: (x float [0,1],
    y) batches."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = create_model("small_cnn", in_ch, 1, 2, widths=(8, 16, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(3):   # warm-up on random data (oneDNN's first calls): epoch 1 then measures the data, not this
        opt.zero_grad()
        loss_fn(model(torch.rand(64, in_ch, 64, 64)).reshape(-1), torch.zeros(64)).backward()
    out = []
    for e in range(epochs):
        t0, seen = time.perf_counter(), 0
        for x, y in batches_of_epoch(e):
            opt.zero_grad()
            loss = loss_fn(model(x).reshape(-1), y.float().reshape(-1))
            loss.backward()
            opt.step()
            seen += len(x)
        assert seen == n, (seen, n)
        out.append(rate(seen, time.perf_counter() - t0))
    return out


def train_section(t: Table, work: Path, paths: list[Path], size: int) -> None:
    spec = InputSpec(2, (size, size), "gray")
    labels = labels_of(paths)
    root = work / "store-train"
    prepare_store(paths, Preparer(spec, store_root=str(root), workers=2), 2, root=root)
    n = len(paths)

    def from_dataset(make_ds):
        state: dict = {}

        def epochs(e):
            if e == 0:   # a new dataset (and store handles) at epoch 1, as in a new train process
                state["loader"] = make_loader(make_ds(), 64, "shuffle", seed=0)
            cast(Any, state["loader"].sampler).set_epoch(e)
            return iter(state["loader"])
        return epochs

    def store_ds():
        view: StoreImages = stored_images(paths, Preparer(spec, store_root=str(root), workers=2))
        return ArrayDataset(view, labels, "binary", list(CLASSES))  # type: ignore[arg-type]

    in_memory = np.asarray(stored_images(paths, Preparer(spec, store_root=str(root), workers=2)))
    mem = train_epochs(from_dataset(lambda: ArrayDataset(in_memory, labels, "binary", list(CLASSES))), n, 1)
    sto = train_epochs(from_dataset(store_ds), n, 1)
    t.add("training, in-memory array (before issue 27), epoch 1 / 2", f"{mem[0]:.0f} / {mem[1]:.0f} img/s",
          "1.00x", f"{n} images, {size} px")
    t.add("training from the store, epoch 1 / 2", f"{sto[0]:.0f} / {sto[1]:.0f} img/s",
          f"{sto[1] / mem[1]:.2f}x of in-memory (epoch 2)", "target >= 0.90x")
    t.add("training from the store, epoch 1 / epoch 2", f"{sto[0] / sto[1]:.2f}", "", "target >= 0.90")

    items = [{"image": str(p), "label": int(y)} for p, y in zip(paths, labels)]
    cache_s, cds = timed(CacheDataset, items, transform=_monai_transforms((size, size)), cache_rate=1.0,
                         num_workers=2, progress=False)

    def monai_epochs(e):
        g = torch.Generator().manual_seed(e)
        dl = torch.utils.data.DataLoader(cds, batch_size=64, shuffle=True, num_workers=2, generator=g,
                                         persistent_workers=False)
        return ((b["image"].as_tensor() if hasattr(b["image"], "as_tensor") else b["image"], b["label"]) for b in dl)

    mon = train_epochs(monai_epochs, n, 1)
    t.add("training, MONAI CacheDataset + 2-worker DataLoader, epoch 1 / 2", f"{mon[0]:.0f} / {mon[1]:.0f} img/s",
          f"store = {sto[1] / mon[1]:.2f}x (epoch 2)", f"cache fill {rate(n, cache_s):.0f} img/s before epoch 1")

    shards = work / "wds"
    shards.mkdir()
    per = 1000
    ws, _ = timed(_write_shards, shards, in_memory, labels, per)
    urls = [str(p) for p in sorted(shards.glob("*.tar"))]

    def wds_epochs(e):
        ds = (cast(Any, wds).WebDataset(urls, shardshuffle=len(urls), seed=e, empty_check=False)
              .shuffle(1000, seed=e).decode().to_tuple("npy", "cls").batched(64, partial=True))
        dl = cast(Any, wds).WebLoader(ds, batch_size=None, num_workers=2)
        return ((torch.from_numpy(np.asarray(x)).float() / 255.0, torch.as_tensor(np.asarray(y))) for x, y in dl)

    wd = train_epochs(wds_epochs, n, 1)
    t.add("training, WebDataset shards + 2-worker WebLoader, epoch 1 / 2", f"{wd[0]:.0f} / {wd[1]:.0f} img/s",
          f"store = {sto[1] / wd[1]:.2f}x (epoch 2)", f"shards written at {rate(n, ws):.0f} img/s from the arrays")
    shutil.rmtree(shards)
    shutil.rmtree(root)


def _write_shards(folder: Path, arrays: np.ndarray, labels: np.ndarray, per: int) -> None:
    with cast(Any, wds).ShardWriter(str(folder / "shard-%05d.tar"), maxcount=per, verbose=0) as sink:
        for i, (a, y) in enumerate(zip(arrays, labels)):
            sink.write({"__key__": f"{i:08d}", "npy": np.ascontiguousarray(a), "cls": int(y)})


def manifest(path: Path, files: list[Path]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id"])
        for i, p in enumerate(files):
            w.writerow([str(p), CLASSES[i % 2] if p.parent.name not in CLASSES else p.parent.name, f"p{i}"])
    return path


def train_config(work: Path, name: str, csv_path: Path, size: int, store: Path, epochs: int = 1) -> Path:
    cfg = work / f"{name}.yaml"
    cfg.write_text(json.dumps({
        "name": name, "seed": 0, "output_dir": str(work / "runs"),
        "data": {"source": "csv", "path": str(csv_path), "image_root": "/", "size": size,
                 "store": str(store), "workers": 2},
        "model": {"name": "small_cnn", "params": {"widths": [8, 16, 32]}},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.003, "precision": "32"},
        "evaluation": {"bootstrap": 20}, "explain": {"method": "gradcam", "score_images": 2, "select_images": 2}}))
    return cfg


def rss_section(t: Table, work: Path, files: list[Path], ns: list[int], size: int) -> None:
    """``medlens train`` (one epoch) at each N, each in its own process and store."""
    peaks = {}
    for n in ns:
        cfg = train_config(work, f"rss{n}", manifest(work / f"rss{n}.csv", files[:n]), size, work / f"store-rss{n}")
        r = check(child_peak([MEDLENS, "train", str(cfg)]), f"medlens train at N={n}")
        peaks[n] = r["peak_mb"]
        arrays_mb = n * size * size / 2**20
        ratio = "" if len(peaks) == 1 else f"{r['peak_mb'] / peaks[ns[0]]:.2f}x of N={ns[0]}"
        t.add(f"`medlens train` peak RSS, N = {n}, data.size {size}", f"{r['peak_mb']:.0f} MB", ratio,
              f"the uint8 arrays: {arrays_mb:.0f} MB; {r['seconds']:.0f} s with the store build")
        shutil.rmtree(work / "runs" / f"rss{n}", ignore_errors=True)
        shutil.rmtree(work / f"store-rss{n}", ignore_errors=True)
    big = ns[-2:]
    if len(big) == 2:
        t.add(f"`medlens train` peak RSS growth N = {big[0]} -> {big[1]}",
              f"{(peaks[big[1]] / peaks[big[0]] - 1) * 100:+.1f}%", f"{peaks[big[1]] / peaks[big[0]]:.2f}x",
              "target < +15%")


def predict_run(work: Path, files: list[Path], size: int) -> Path:
    cfg = train_config(work, "predictrun", manifest(work / "predictrun.csv", files), size, work / "store-predictrun")
    check(child_peak([MEDLENS, "train", str(cfg)]), "medlens train (the run predict uses)")
    return work / "runs" / "predictrun"


class _Files(torch.utils.data.Dataset):
    def __init__(self, files: list[str], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        a = cv2.imread(self.files[i], cv2.IMREAD_GRAYSCALE)
        assert a is not None, self.files[i]
        return cv2.resize(a, (self.size, self.size), interpolation=cv2.INTER_AREA)[None]


def _plain_loop(run_dir: Path, files: list[str], size: int) -> float:
    """Files/s of a plain DataLoader loop: 2 workers decode and resize with cv2, the run's network predicts."""
    pred = Predictor(Run.open(run_dir))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dl = torch.utils.data.DataLoader(_Files(files, size), batch_size=64, num_workers=2)
    n = 0
    for x in dl:
        n += len(pred.predict_arrays(x.float() / 255.0))
    return rate(n, time.perf_counter() - t0)


def predict_section(t: Table, work: Path, run_dir: Path, files: list[Path], ratio_n: int, size: int,
                    resume_n: int, repeat: int = 1) -> None:
    sub = [str(p) for p in files[:ratio_n]]
    listing = work / "predict.txt"
    listing.write_text("\n".join(sub) + "\n")
    # the start of a predict process (imports, the run opened), measured on one file, is taken off both commands
    starts = [check(child_peak([MEDLENS, "predict", str(run_dir), sub[0]]), "medlens predict (1 file)")
              for _ in range(2)]
    start, start_cpu = min(r["seconds"] for r in starts), min(r["cpu_s"] for r in starts)
    olds, news = [], []
    for k in range(repeat):   # the two commands alternated, the fastest of each: a burst of load hits one try
        olds.append(check(child_peak([MEDLENS, "predict", str(run_dir), *sub]), "medlens predict (previous path)"))
        news.append(check(child_peak([MEDLENS, "predict", str(run_dir), f"@{listing}", "--out",
                                      str(work / f"p{k}.csv")]), "medlens predict --out"))
    old, new = min(olds, key=lambda r: r["seconds"]), min(news, key=lambda r: r["seconds"])
    plain = _plain_loop(run_dir, sub, size)
    old_rate, new_rate = rate(ratio_n, old["seconds"] - start), rate(ratio_n, new["seconds"] - start)
    t.add(f"`medlens predict` previous path (files as arguments), {ratio_n} PNGs",
          f"{old_rate:.0f} files/s ({rate(ratio_n, old['seconds']):.0f} with the start)", "1.00x",
          f"peak RSS {old['peak_mb']:.0f} MB; process start {start:.1f} s taken off")
    t.add(f"`medlens predict --out results.csv`, {ratio_n} PNGs",
          f"{new_rate:.0f} files/s ({rate(ratio_n, new['seconds']):.0f} with the start)",
          f"{new_rate / old_rate:.2f}x of previous ({old['seconds'] / new['seconds']:.2f}x with the start)",
          f"peak RSS {new['peak_mb']:.0f} MB; target >= 2x" + (f"; each the best of {repeat}" if repeat > 1 else ""))
    PROCESS_START[0] = start
    old_cpu, new_cpu = (old["cpu_s"] - start_cpu) / ratio_n * 1000, (new["cpu_s"] - start_cpu) / ratio_n * 1000
    t.add(f"CPU time a file, previous path vs `--out results.csv`, {ratio_n} PNGs",
          f"{old_cpu:.1f} / {new_cpu:.1f} ms", f"{old_cpu / new_cpu:.2f}x less CPU a file",
          "user + system of every process, the start's taken off")
    t.add(f"plain DataLoader loop (2 workers, cv2), {ratio_n} PNGs", f"{plain:.0f} files/s",
          f"batch predict = {new_rate / plain:.2f}x of it", "no profile check, no results table, run already open")

    # the 20,000-file run: RSS sampled through it
    big = [str(p) for p in files[:resume_n]]
    listing.write_text("\n".join(big) + "\n")
    out = work / "big.csv"
    r = check(run_child([MEDLENS, "predict", str(run_dir), f"@{listing}", "--out", str(out)], sample_rss=True),
              "medlens predict (big)")
    s = r["samples"] or [float("nan")]
    q = [s[min(len(s) - 1, int(len(s) * f))] for f in (0.25, 0.5, 0.75)]
    big_rate = rate(resume_n, r["seconds"] - start)
    t.add(f"`medlens predict --out`, {resume_n} PNGs", f"{big_rate:.0f} files/s",
          f"{big_rate / old_rate:.2f}x of previous ({ratio_n} files; start taken off both)",
          f"RSS at 25/50/75% {q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f} MB, peak {r['peak_mb']:.0f} MB; target flat < 1.2 GB")
    # kill -9 at about half way, then --resume
    out2 = work / "killed.csv"
    k = run_child([MEDLENS, "predict", str(run_dir), f"@{listing}", "--out", str(out2)], kill_after=resume_n // 2,
                  rows_file=out2)
    before = max(0, sum(1 for _ in open(out2)) - 1) if out2.exists() else 0
    check(run_child([MEDLENS, "predict", str(run_dir), f"@{listing}", "--out", str(out2), "--resume"]),
          "medlens predict --resume")
    with open(out2, newline="") as f:
        keys = [row["file"] for row in csv.DictReader(f)]
    errs = work / "killed.errors.csv"
    n_err = max(0, sum(1 for _ in open(errs)) - 1) if errs.exists() else 0
    t.add(f"kill -9 at {before} rows ({'killed' if k['killed'] else 'NOT killed: ended first'}), then --resume",
          f"{len(keys)} rows, {len(set(keys))} distinct", f"{len(keys) - len(set(keys))} duplicates, "
          f"{len(set(big) - set(keys))} missing", f"{n_err} error rows; target exactly {resume_n}")


def ray_section(t: Table, work: Path, run_dir: Path, files: list[Path]) -> None:
    listing = work / "ray.txt"
    listing.write_text("\n".join(str(p) for p in files) + "\n")
    ray_start = check(run_child([MEDLENS, "predict", str(run_dir), str(files[0]), "--out", str(work / "ray1.csv"),
                                 "--engine", "ray", "--workers", "2"]), "predict --engine ray (1 file)")["seconds"]
    one = check(run_child([MEDLENS, "predict", str(run_dir), f"@{listing}", "--out", str(work / "one.csv"),
                           "--workers", "0"]), "predict --workers 0")
    ray = check(run_child([MEDLENS, "predict", str(run_dir), f"@{listing}", "--out", str(work / "ray.csv"),
                           "--engine", "ray", "--workers", "2"]), "predict --engine ray")
    if not PROCESS_START[0]:   # predict_section did not run: the start of a predict process, on one file
        PROCESS_START[0] = min(check(child_peak([MEDLENS, "predict", str(run_dir), str(files[0])]),
                                     "medlens predict (1 file)")["seconds"] for _ in range(2))
    n, start = len(files), PROCESS_START[0]
    t.add(f"`medlens predict`, one process (--workers 0), {n} PNGs",
          f"{rate(n, one['seconds'] - start):.0f} files/s ({rate(n, one['seconds']):.0f} with the start)", "1.00x",
          f"process start {start:.1f} s taken off")
    t.add(f"`medlens predict --engine ray --workers 2` (local Ray), {n} PNGs",
          f"{rate(n, ray['seconds'] - ray_start):.0f} files/s ({rate(n, ray['seconds']):.0f} with the start)",
          f"{(one['seconds'] - start) / (ray['seconds'] - ray_start):.2f}x of one process "
          f"({one['seconds'] / ray['seconds']:.2f}x with the starts)",
          f"start with Ray's (1 file) {ray_start:.1f} s taken off")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small N; the figures only show that it works")
    ap.add_argument("--repeat", type=int, default=2, help="tries of each store-preparation line and of the two "
                    "2,000-file predict commands, alternated; the best of each is printed (other processes on "
                    "the cores slow one try, rarely all)")
    ap.add_argument("--work", type=Path, help="folder for the corpora and stores (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--sections", default="prep,train,rss,predict,ray",
                    help="which lines to measure (comma-separated, default all): %(default)s")
    ap.add_argument("--prep-n", type=int, default=10000, help="512 px PNGs for store preparation")
    ap.add_argument("--dicom-n", type=int, default=6000, help="512 px DICOM files for store preparation")
    ap.add_argument("--volumes", type=int, default=40, help="CT-like volumes (128 x 256 x 256) for store preparation")
    ap.add_argument("--train-n", type=int, default=3000, help="256 px PNGs for the training-throughput lines")
    ap.add_argument("--rss-n", default="2000,10000,40000", help="N of the `medlens train` peak-RSS lines")
    ap.add_argument("--predict-n", type=int, default=20000, help="PNGs of the long predict run and of kill/resume")
    ap.add_argument("--ratio-n", type=int, default=2000, help="PNGs of the predict comparison with the previous path")
    ap.add_argument("--ray-n", type=int, default=2000, help="PNGs of the Ray line")
    ap.add_argument("--train-size", type=int, default=64, help="data.size (resize target) of the training-throughput "
                    "and peak-RSS lines")
    ap.add_argument("--predict-size", type=int, default=128, help="data.size of the run that predict and Ray use "
                    "(trained here on 2,000 of the PNGs)")
    a = ap.parse_args()
    if a.quick:
        a.prep_n, a.dicom_n, a.volumes, a.train_n, a.rss_n = 300, 120, 3, 600, "200,400,800"
        a.predict_n, a.ratio_n, a.ray_n, a.train_size, a.predict_size = 600, 300, 300, 32, 32
    quick_banner(a.quick, "small N")
    rss_n = sorted(int(v) for v in a.rss_n.split(","))
    sections = {v.strip() for v in a.sections.split(",") if v.strip()}
    unknown = sections - {"prep", "train", "rss", "predict", "ray"}
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}")
    work = a.work or Path(tempfile.mkdtemp(prefix="medlens-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MEDLENS_CACHE", str(work / "cache"))
    t = Table()
    started = time.perf_counter()
    try:
        with tqdm(total=len(sections), desc="scale benchmark", file=sys.stderr) as bar:
            if "prep" in sections:
                vol_shape = (40, 96, 96) if a.quick else (128, 256, 256)
                corpora = {
                    "PNG 512 px": (write_corpus(work / "png512", "png", a.prep_n, 512),
                                   InputSpec(2, (256, 256), "gray")),
                    "DICOM 512 px": (write_corpus(work / "dcm512", "dcm", a.dicom_n, 512),
                                     InputSpec(2, (256, 256), "gray")),
                    "CT volumes": (write_corpus(work / "ct", "nii", a.volumes, vol_shape),
                                   InputSpec(3, (64, 128, 128), "gray", window="lung")),
                }
                bar.set_postfix_str("store preparation")
                prep_section(t, work, corpora, a.quick, max(1, a.repeat))
                for paths, _ in corpora.values():
                    shutil.rmtree(paths[0].parent.parent)
                bar.update()
            need = max([a.train_n if "train" in sections else 0, rss_n[-1] if "rss" in sections else 0,
                        max(a.predict_n, a.ratio_n) if "predict" in sections else 0,
                        a.ray_n if "ray" in sections else 0, 2000 if {"predict", "ray"} & sections else 0])
            png256 = write_corpus(work / "png256", "png", need, 256) if need else []
            if "train" in sections:
                bar.set_postfix_str("training throughput")
                train_section(t, work, png256[:a.train_n], a.train_size)
                bar.update()
            if "rss" in sections:
                bar.set_postfix_str("train peak RSS")
                rss_section(t, work, png256, rss_n, a.train_size)
                bar.update()
            if {"predict", "ray"} & sections:
                run_dir = predict_run(work, png256[:2000], a.predict_size)
                if "predict" in sections:
                    bar.set_postfix_str("predict")
                    predict_section(t, work, run_dir, png256, a.ratio_n, a.predict_size, a.predict_n,
                                    max(1, a.repeat))
                    bar.update()
                if "ray" in sections:
                    bar.set_postfix_str("ray")
                    ray_section(t, work, run_dir, png256[:a.ray_n])
                    bar.update()
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nmedlens scale benchmark, {time.perf_counter() - started:.0f} s, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB\n")
    t.print()


if __name__ == "__main__":
    main()
