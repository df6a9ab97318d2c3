"""Issue 27: the prepared store (medlens.data.store) on small PNG folders written from real PneumoniaMNIST X-rays:
each source read once across train + evaluate + export, rebuilt only where a source or the preparation changed,
a killed `medlens data prepare` resumed with nothing corrupt, and memory that does not grow with the images."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlens.config import DataConfig
from medlens.data.folder import list_images, load_image_folder
from medlens.data import store as store_module
from medlens.data.store import Store, prepare_store
from medlens.errors import DataError
from medlens.transforms.preprocess import InputSpec, Preparer, prepared_data


def _write_folder(root: Path, n: int, size: int = 28, noise: int = 0) -> Path:
    """``n`` real PneumoniaMNIST training X-rays as PNGs in class folders (resized to ``size``, with optional
    noise so that larger files do not compress to nothing)."""
    z = np.load(Path(os.environ.get("MEDLENS_DATA", "")) / "medmnist" / "pneumoniamnist.npz")
    images, labels = z["train_images"], z["train_labels"][:, 0]
    rng = np.random.default_rng(0)
    for i in range(n):
        k = i % len(images)
        cls = root / ("normal", "pneumonia")[int(labels[k])]
        cls.mkdir(parents=True, exist_ok=True)
        a = np.asarray(Image.fromarray(images[k]).resize((size, size)), np.int16)
        if noise:
            a = a + rng.integers(-noise, noise + 1, a.shape)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(cls / f"img{i:05d}.png")
    return root


def _prep(size: int, cache: Path, workers: int = 1) -> Preparer:
    return Preparer(InputSpec(2, (size, size), "gray"), store_root=str(cache), workers=workers)


def _arrays(data) -> dict[str, np.ndarray]:
    return {str(s): np.asarray(d.images[i]) for d in (data.train, data.val, data.test) for i, s in enumerate(d.sources)}


def test_no_source_file_is_opened_twice_across_train_evaluate_export(tmp_path, data_root):
    """train + evaluate + export in one process, counting every open() of the image files (an audit hook):
    each file is opened once, by the store's build during train."""
    root = _write_folder(tmp_path / "png", 40)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({
        "name": "opens", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"source": "folder", "path": str(root), "size": 16, "workers": 1, "store": str(tmp_path / "cache")},
        "model": {"name": "small_cnn", "params": {"widths": [4, 8]}},
        "train": {"epochs": 1, "batch_size": 16, "precision": "32"},
        "evaluation": {"bootstrap": 20}, "explain": {"method": "gradcam", "score_images": 2}}))
    script = textwrap.dedent(f"""
        import json, sys
        from collections import Counter
        root = {str(root)!r}
        opens = Counter()
        def hook(event, args):
            if event == "open" and isinstance(args[0], str) and args[0].startswith(root) and args[0].endswith(".png"):
                opens[args[0]] += 1
        sys.addaudithook(hook)
        from medlens.config import load_config
        from medlens.evaluation.evaluate import evaluate_run
        from medlens.workflow.export import export_run
        from medlens.workflow.train import train
        run = train(load_config({str(cfg)!r}), progress_bar=False, log=lambda s: None)
        after_train = dict(opens)
        evaluate_run(run)
        export_run(run, n_parity=10)
        after_all = dict(opens)
        from medlens.io import load
        one = sorted(after_all)[0]
        load(one)  # the opens of one read of one file by the one loader (the PNG reader checks, then decodes)
        print(json.dumps({{"train": after_train, "all": after_all, "one_read": opens[one] - after_all[one]}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MEDLENS_SMOKE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    files = {str(p) for p in root.rglob("*.png")}
    assert counts["one_read"] >= 1
    assert counts["train"] == {f: counts["one_read"] for f in files}  # train read every file (no cap) once ...
    assert counts["all"] == counts["train"]  # ... and evaluate and export read none


def test_a_changed_source_or_preparation_rebuilds_only_that(tmp_path, data_root):
    root = _write_folder(tmp_path / "png", 24)
    cache = tmp_path / "cache"
    prep = _prep(16, cache)
    first = _arrays(load_image_folder(root, prep, seed=0))
    assert [(r.built, r.reused) for r in prep.store_log] == [(24, 0)]  # the folder, prepared as it loads
    again = _prep(16, cache)
    assert _arrays(load_image_folder(root, again, seed=0)).keys() == first.keys()
    assert sum(r.built for r in again.store_log) == 0 and sum(r.reused for r in again.store_log) == 24

    data = load_image_folder(root, _prep(16, cache), seed=0)
    data.train.batch(np.arange(3))  # chunk files opened: a copy in another process (DDP, federated sites) reads too
    moved = pickle.loads(pickle.dumps(data.train))
    assert np.array_equal(moved.batch(np.arange(len(moved)))[0].numpy(), data.train.batch(np.arange(len(moved)))[0].numpy())

    changed = sorted(root.rglob("*.png"))[5]
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(changed)  # new content (and size, mtime)
    later = _prep(16, cache)
    after = _arrays(load_image_folder(root, later, seed=0))
    assert sum(r.built for r in later.store_log) == 1 and sum(r.reused for r in later.store_log) == 23
    assert np.all(after[str(changed)] == 200) and not np.array_equal(after[str(changed)], first[str(changed)])
    assert all(np.array_equal(after[k], v) for k, v in first.items() if k != str(changed))

    bigger = _prep(20, cache)  # another data.size: another store folder, everything prepared
    resized = _arrays(load_image_folder(root, bigger, seed=0))
    assert sum(r.built for r in bigger.store_log) == 24 and next(iter(resized.values())).shape == (1, 20, 20)
    assert len({r.folder for r in bigger.store_log} | {r.folder for r in prep.store_log}) == 2


def test_max_samples_and_label_fraction_select_before_decoding(tmp_path, data_root, monkeypatch):
    """Only the files that the capped splits keep are prepared, and they are the files chosen without the store
    (every image decoded first, as before issue 27): the same seed gives the same subset."""
    root = _write_folder(tmp_path / "png", 60)
    cfg = DataConfig(source="folder", path=str(root), size=16, max_samples=8, label_fraction=0.5,
                     store=str(tmp_path / "cache"), workers=1)
    decoded: list[str] = []
    original = Preparer.__call__

    def counting(self, image, name=None):
        decoded.append(str(name))
        return original(self, image, name)

    monkeypatch.setattr(Preparer, "__call__", counting)
    data = prepared_data(cfg, seed=3)
    kept = {str(s) for d in (data.train, data.val, data.test) for s in d.sources}
    assert sorted(decoded) == sorted(kept) and len(kept) < 8 * 3  # the cap (8 a split, half the training labels)
    assert len(data.train.meta["raw_inputs"]) == len(data.train)  # the input profile from the store's records

    decoded.clear()
    monkeypatch.setattr(Preparer, "store_key", property(lambda self: None))  # the store bypassed: decode all first
    before = prepared_data(cfg, seed=3)
    assert len(decoded) == 60
    for split in ("train", "val", "test"):
        a, b = data.get(split), before.get(split)
        assert list(a.sources) == list(b.sources) and np.array_equal(a.labels, b.labels)
        assert np.array_equal(np.asarray(a.images), b.images)  # type: ignore[attr-defined]


def test_two_builders_of_one_store_share_the_work(tmp_path, data_root):
    """Two builders at once (each its own open file, as two processes have): the folder lock makes the second
    wait and then reuse; every file is prepared once."""
    root = _write_folder(tmp_path / "png", 40)
    paths = list_images(root / "normal") + list_images(root / "pneumonia")
    results = []

    def build():
        results.append(prepare_store(paths, Preparer(InputSpec(2, (16, 16), "gray")), workers=1,
                                     root=tmp_path / "cache"))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.built for r in results) == [0, 40]
    assert results[0].entries == results[1].entries and len(Store(results[0].folder).refresh()) == 40


def test_a_damaged_chunk_is_not_read_as_valid(tmp_path, data_root):
    root = _write_folder(tmp_path / "png", 12)
    cache = tmp_path / "cache"
    prep = _prep(16, cache)
    clean = _arrays(load_image_folder(root, prep, seed=0))
    store = Store(prep.store_log[0].folder)
    chunk = sorted(store.chunks.glob("*.b2nd"))[0]
    chunk.write_bytes(chunk.read_bytes()[:-100])  # truncated behind the store's back
    assert len(store.refresh()) < 12  # its entries are no longer committed
    redo = _prep(16, cache)
    assert _arrays(load_image_folder(root, redo, seed=0)).keys() == clean.keys()
    assert 0 < sum(r.built for r in redo.store_log) < 12
    assert all(np.array_equal(a, clean[k]) for k, a in _arrays(load_image_folder(root, redo, seed=0)).items())


def test_a_parallel_build_equals_the_serial_one_and_names_the_first_bad_file(tmp_path, data_root, monkeypatch):
    """Two workers (this process and one pool process, the pool forced for a small folder): the rows are those of
    a one-worker build; with two unreadable files the error names the first in the order given (as a serial build
    does), and every file before it stays committed."""
    monkeypatch.setattr(store_module, "MIN_PARALLEL", 1)
    root = _write_folder(tmp_path / "png", 48)
    paths = sorted(root.rglob("*.png"))
    serial = prepare_store(paths, Preparer(InputSpec(2, (16, 16), "gray")), workers=1, root=tmp_path / "one")
    parallel = prepare_store(paths, Preparer(InputSpec(2, (16, 16), "gray")), workers=2, root=tmp_path / "two")
    assert parallel.built == serial.built == 48
    rows = Store(parallel.folder).read(parallel.entries)
    assert all(np.array_equal(a, b) for a, b in zip(rows, Store(serial.folder).read(serial.entries)))

    for k in (30, 40):
        paths[k].write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        prepare_store(paths, Preparer(InputSpec(2, (16, 16), "gray")), workers=2, root=tmp_path / "bad")
    assert str(paths[30]) in str(err.value) and str(paths[40]) not in str(err.value)
    committed = Store(next((tmp_path / "bad").iterdir())).refresh()
    assert 30 <= len(committed) < 48  # at least every file before the first bad one


def test_killed_prepare_resumes_with_nothing_corrupt(tmp_path, data_root):
    """SIGKILL `medlens data prepare` once its first chunk is committed: every committed entry reads back, the re-run
    prepares only the rest, and the arrays equal those of a clean build."""
    root = _write_folder(tmp_path / "png", 480, size=128, noise=20)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"name": "k", "data": {"source": "folder", "path": str(root), "size": 64}}))
    env = {**os.environ, "MEDLENS_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "medlens.cli.main", "data", "prepare", str(cfg), "--workers", "1"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    index = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        found = list((tmp_path / "cache").glob("*/index/[0-9a-f]*.json"))
        if found:
            index = found[0].parent
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert index is not None and p.returncode == -signal.SIGKILL
    store = Store(index.parent)
    committed = store.refresh()
    assert 0 < len(committed) < 480  # killed part way
    rows = store.read(list(committed.values()))  # every committed entry reads whole
    assert len(rows) == len(committed) and all(r.shape == (1, 64, 64) and r.dtype == np.uint8 for r in rows)

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    words = " ".join(rerun.stdout.split())
    assert f"{480 - len(committed)} image(s) prepared, {len(committed)} reused" in words
    resumed = _arrays(load_image_folder(root, _prep(64, tmp_path / "cache"), seed=0))
    clean = _arrays(load_image_folder(root, _prep(64, tmp_path / "clean"), seed=0))
    assert resumed.keys() == clean.keys() and all(np.array_equal(resumed[k], v) for k, v in clean.items())


SIZE = 256
_ITERATE = """
import resource, sys
import numpy as np
from medlens.data.folder import load_image_folder
from medlens.transforms.preprocess import InputSpec, Preparer
size = int(sys.argv[3])
data = load_image_folder(sys.argv[1], Preparer(InputSpec(2, (size, size), "gray"), store_root=sys.argv[2]), seed=0)
total = 0.0
for ds in (data.train, data.val, data.test):
    for epoch in range(2):
        order = np.random.default_rng(epoch).permutation(len(ds))
        for i in range(0, len(ds), 64):
            x, _ = ds.batch(order[i:i + 64])
            total += float(x.sum())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, total)
"""


def test_memory_does_not_grow_with_the_number_of_images(tmp_path, data_root):
    """Two epochs over every split of N and 4N images (prepared 256 px: 39 MB and 157 MB as uint8 arrays):
    peak RSS of the reading process grows by less than 15% (held in memory, as before the store, it grew by 20%: 851 -> 1021 MB)."""
    cache = tmp_path / "cache"
    small = _write_folder(tmp_path / "small", 600, size=32)
    large = _write_folder(tmp_path / "large", 2400, size=32)
    for root in (small, large):  # the store built first (in parallel), so the reading processes only read
        load_image_folder(root, _prep(SIZE, cache, workers=2), seed=0)
    peaks = []
    for root in (small, large):
        out = subprocess.run([sys.executable, "-c", _ITERATE, str(root), str(cache), str(SIZE)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks.append(int(out.stdout.split()[0]))
    assert peaks[1] < 1.15 * peaks[0], peaks
