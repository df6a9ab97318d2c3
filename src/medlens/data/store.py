"""The prepared store: every source image read and prepared once, by N worker processes, into compressed chunks.

Layout (one folder per preparation; ``cache_root``: ``data.store``, else ``$MEDLENS_CACHE``, else
``~/.cache/medlens/store``)::

    <root>/<spec hash>/spec.txt            the preparation the folder holds (``Preparer.store_key``)
    <root>/<spec hash>/chunks/<id>.b2nd    a Blosc2 NDArray (n, C, *spatial), ZSTD level 1, one image per chunk
    <root>/<spec hash>/index/<id>.json     written last: the chunk's size and, per row, the source key and what
                                           the preparer saw of the source (``Preparer.seen``)

A source is keyed by its resolved path, size and mtime (ns): a changed file gets a new key and only it is prepared
again; a changed preparation is another folder. A chunk is written to a temporary name, synced and renamed; its index
is written the same way after it, so an entry exists only once its chunk is complete, and an index whose chunk is
missing or of another size is ignored (the entries are prepared again). A builder holds an exclusive ``flock`` on the
folder while it works, so two processes building the same store share the work instead of doubling it; ``kill -9``
releases it, and the temporaries of a killed builder (named with its PID) are removed by the next one.

Images are read back one record at a time (no memory map: resident memory stays the batch's, whatever the store's
size). ``StoreImages`` is the array-like view that datasets hold: indexing it with indices gives another view (no
image read), ``np.asarray`` reads the rows. Views are resolved lazily, so splits, ``data.max_samples`` and
``data.label_fraction`` select before anything is decoded; ``realize`` prepares what a set of datasets needs in one
parallel pass.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import uuid
import warnings
from contextvars import ContextVar
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, cast

import blosc2
import numpy as np

from medlens.data.base import Preparer
from medlens.errors import DataError, MedlensError
from medlens.io import load
from medlens.utils import remove_pid_named, write_json_atomic

CACHE_ENV = "MEDLENS_CACHE"
FORMAT = 1                      # the layout above; part of the folder's hash
MAX_CHUNK = 64                  # rows per chunk file (smaller when there are few images per worker)
# less work than this is prepared in this process alone: the fork server's first start imports medlens and torch
# (~3-8 s of CPU here), which a pool only wins back over a few thousand small files (~700 PNGs a second a core) or
# a few hundred MB of sources (512 px radiographs, volumes)
MIN_PARALLEL = 2000
MIN_PARALLEL_BYTES = 256 * 2**20
_TMP = re.compile(r"^\.tmp-(\d+)-")
_CPARAMS = {"codec": blosc2.Codec.ZSTD, "clevel": 1, "nthreads": 1}
_DPARAMS = {"nthreads": 1}
_DEFER: ContextVar[bool] = ContextVar("medlens_store_defer", default=False)


def cache_root(override: str | Path | None = None) -> Path:
    """Where stores live: ``override`` (``data.store``), else ``$MEDLENS_CACHE``, else ``~/.cache/medlens/store``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medlens" / "store"


def default_workers() -> int:
    """Worker processes of a build when the config names none: min(2, CPU count)."""
    return max(1, min(2, os.cpu_count() or 1))


def store_key(prepare: Preparer) -> str | None:
    """The preparer's identity for the store (``store_key`` attribute), None for one that cannot be keyed."""
    key = getattr(prepare, "store_key", None)
    return key if isinstance(key, str) and key else None


def source_key(path: Path) -> str:
    """A source's identity: its resolved path, size and modification time (ns)."""
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Entry:
    """Where one prepared source lies: its chunk file and row, with the dtype and shape of the row."""

    chunk: str
    row: int
    dtype: str
    shape: tuple[int, ...]
    seen: tuple | None


@dataclass
class BuildResult:
    """What one ``prepare_store`` call did."""

    folder: Path
    built: int = 0
    reused: int = 0
    entries: list[Entry] = field(default_factory=list)


def _seen(value) -> tuple | None:
    """``Preparer.seen``'s tuple back from JSON: (shape, rgb, modality, body part)."""
    if not isinstance(value, list) or len(value) != 4:
        return None
    shape, rgb, modality, part = value
    if not (isinstance(shape, list) and all(isinstance(v, int) for v in shape)):
        return None
    return (tuple(shape), bool(rgb), str(modality), None if part is None else str(part))


class Store:
    """One preparation's folder: its committed entries (read from the index files) and the rows they hold."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._entries: dict[str, Entry] = {}
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict:
        """Picklable (datasets travel to DDP and federated worker processes): open chunk files are not sent."""
        return {"folder": self.folder, "_entries": self._entries, "_handles": {}}

    @classmethod
    def for_preparer(cls, prepare: Preparer, root: str | Path | None = None) -> "Store":
        key = store_key(prepare)
        if key is None:
            raise TypeError("this preparer has no store_key; it cannot be stored")
        digest = hashlib.sha256(f"{FORMAT}\0{key}".encode()).hexdigest()[:16]
        return cls(cache_root(root) / digest)

    @property
    def chunks(self) -> Path:
        return self.folder / "chunks"

    @property
    def index(self) -> Path:
        return self.folder / "index"

    def refresh(self) -> dict[str, Entry]:
        """Read the committed entries: every index file whose chunk is present with the recorded size."""
        entries: dict[str, Entry] = {}
        try:
            names = sorted(os.listdir(self.index))
        except OSError:
            names = []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                rec = json.loads((self.index / name).read_text(encoding="utf-8"))
                chunk = str(rec["chunk"])
                if not re.fullmatch(r"[0-9a-f]{32}\.b2nd", chunk):
                    continue
                if (self.chunks / chunk).stat().st_size != int(rec["bytes"]):
                    continue  # a chunk that is not the one indexed: prepared again
                shape = tuple(int(v) for v in rec["shape"])
                dtype = str(np.dtype(rec["dtype"]))
                for row, item in enumerate(rec["rows"]):
                    entries[str(item["key"])] = Entry(chunk, row, dtype, shape, _seen(item.get("seen")))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # an unreadable index commits nothing
        self._entries = entries
        return entries

    def read(self, entries: Sequence[Entry]) -> list[np.ndarray]:
        """The rows of ``entries`` (read chunk by chunk, in row order)."""
        out: list[np.ndarray | None] = [None] * len(entries)
        order = sorted(range(len(entries)), key=lambda i: (entries[i].chunk, entries[i].row))
        for i in order:
            e = entries[i]
            arr: Any = self._handles.get(e.chunk)
            if arr is None:
                try:
                    arr = blosc2.open(str(self.chunks / e.chunk), mode="r", dparams=_DPARAMS)
                except Exception as err:  # a chunk removed or damaged after it was indexed
                    raise DataError(f"prepared store chunk unreadable ({type(err).__name__}); remove the folder "
                                    "to prepare it again", self.chunks / e.chunk) from None
                self._handles[e.chunk] = arr
            # one image per Blosc2 chunk (``_write_chunk``): chunk ``row`` is the row, decompressed whole
            try:
                raw = cast(bytes, arr.schunk.decompress_chunk(e.row))
                out[i] = np.frombuffer(raw, dtype=e.dtype).reshape(e.shape)
            except Exception as err:  # damaged inside: the size was right, the content is not
                raise DataError(f"prepared store chunk unreadable at row {e.row} ({type(err).__name__}); remove "
                                "the folder to prepare it again", self.chunks / e.chunk) from None
        return [a for a in out if a is not None]

    @contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock on the folder (released by the kernel if the holder is killed)."""
        for d in (self.chunks, self.index):
            d.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_chunk(folder: Path, arrays: list[np.ndarray], keys: list[str], seen: list) -> None:
    """One chunk file and then its index, each through a temporary name and ``os.replace``."""
    cid = uuid.uuid4().hex
    tmp = folder / "chunks" / f".tmp-{os.getpid()}-{cid}.b2nd"
    final = folder / "chunks" / f"{cid}.b2nd"
    stack: Any = np.stack(arrays)  # (blosc2's hints do not take an ndarray, which it does take)
    try:
        blosc2.asarray(stack, urlpath=str(tmp), mode="w", chunks=(1, *stack.shape[1:]),
                       blocks=(1, *stack.shape[1:]), cparams=_CPARAMS)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    rows = [{"key": k, "seen": None if s is None else [list(s[0]), s[1], s[2], s[3]]} for k, s in zip(keys, seen)]
    itmp = folder / "index" / f".tmp-{os.getpid()}-{cid}.json"
    write_json_atomic(itmp, {"chunk": final.name, "bytes": final.stat().st_size, "dtype": str(stack.dtype),
                             "shape": list(stack.shape[1:]), "rows": rows})
    os.replace(itmp, folder / "index" / f"{cid}.json")


def _build_chunk(folder: Path, paths: list[str], keys: list[str], prepare: Preparer,
                 step: Callable[[], None] | None = None) -> int | str:
    """Prepare ``paths`` and store them (rows of one dtype and shape share a chunk file), ``step()`` after each file.
    Runs in a worker process; returns how many it stored, or the one-line error of the first bad file."""
    groups: dict[tuple, tuple[list, list, list]] = {}
    seen_map = getattr(prepare, "seen", None)
    try:
        for p, k in zip(paths, keys):
            arr = prepare(load(p), p)
            if step:
                step()
            seen = seen_map.pop(p, None) if isinstance(seen_map, dict) else None
            g = groups.setdefault((arr.dtype.str, arr.shape), ([], [], []))
            g[0].append(arr)
            g[1].append(k)
            g[2].append(seen)
    except MedlensError as e:
        return str(e)
    for arrays, ks, seens in groups.values():
        _write_chunk(folder, arrays, ks, seens)
    return len(paths)


def _worker_init(parent: int | None = None) -> None:
    """One OpenCV thread per worker process (the workers are the parallelism). In a process forked from
    ``parent`` (Linux): killed with it (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the builder leaves no worker that
    holds its lock or waits for work that will never come."""
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.setNumThreads(1)
    if parent is not None and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the builder died before the line above
            os._exit(1)


def _context() -> tuple[Any, bool]:
    """The start method of the pool, and whether it forks this process.

    Linux: a plain fork of this process, started from the calling thread before it prepares anything, after
    ``_worker_init`` has stopped OpenCV's thread pool here (the pool a forked child would wait for, on a futex,
    when it sets its own thread count: the hang a pytest process that had prepared and trained before showed). A
    child needs nothing imported (the fork server's first start imports medlens and torch: 3-4 s of CPU idle, 7-11 s
    on busy cores, a third of a 10,000-file build's second core) and prepares with numpy, OpenCV and Blosc2 (one
    thread each), pydicom, nibabel or SimpleITK; never torch, whose OpenMP pool is not fork-safe. Elsewhere (macOS
    frameworks are not fork-safe): a fork server that has imported the preparation; spawn would import medlens and
    torch again for every worker."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork"), True
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["medlens.data.store", "medlens.transforms.preprocess"])
    return ctx, False


def _chunks_of(n: int, workers: int) -> int:
    return max(1, min(MAX_CHUNK, -(-n // (workers * 8))))


def _part_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """(start, stop) of each part of a parallel build: ``_chunks_of`` files, fewer towards the end (at most a ``2 * workers``-th of
    what is left), so that the processes finish together: a pool process may hold two parts queued when the
    caller runs out (40 CT volumes in parts of 3: 1.36x with 2 workers)."""
    size, out, start = _chunks_of(n, workers), [], 0
    while start < n:
        step = max(1, min(size, -(-(n - start) // (2 * workers))))
        out.append((start, start + step))
        start += step
    return out


def prepare_store(paths: Sequence[Path], prepare: Preparer, workers: int | None = None,
                  progress: Callable | None = None, root: str | Path | None = None) -> BuildResult:
    """Read and prepare each of ``paths`` that the store lacks, exactly once, with ``workers`` processes (from a
    fork server; in this process for one worker), and return every path's entry. ``progress(done, total)`` counts the files
    the store holds (in one step) and then each one prepared. A bad file stops the build with its one-line error; what was stored before it stays."""
    store = Store.for_preparer(prepare, root)
    paths = [Path(p) for p in paths]
    keys = [source_key(p) for p in paths]
    workers = max(1, int(workers or default_workers()))
    entries = store.refresh()
    missing = [i for i, k in enumerate(keys) if k not in entries]
    built = 0
    if missing:
        with store.locked():
            remove_pid_named(store.chunks, _TMP)
            remove_pid_named(store.index, _TMP)
            (store.folder / "spec.txt").write_text(f"{store_key(prepare)}\n", encoding="utf-8")
            entries = store.refresh()  # another process may have built them while this one waited
            todo = list(dict.fromkeys(keys[i] for i in missing if keys[i] not in entries))
            first: dict[str, str] = {}
            for p, k in zip(paths, keys):
                first.setdefault(k, str(p))
            ready = len(paths) - len(todo)
            if progress and ready:
                progress(ready, len(paths))  # what the store holds: read, not prepared
            built = _build(store.folder, [first[k] for k in todo], todo, prepare, workers, progress, ready,
                           len(paths))
            entries = store.refresh()
    elif progress and paths:
        progress(len(paths), len(paths))
    out = []
    for p, k in zip(paths, keys):
        if k not in entries:
            raise DataError("the prepared store did not record this file", p)
        out.append(entries[k])
    seen_map = getattr(prepare, "seen", None)
    if isinstance(seen_map, dict):
        for p, e in zip(paths, out):
            if e.seen is not None:
                seen_map[str(p)] = e.seen
    return BuildResult(store.folder, built, len(paths) - built, out)


def _parallel(paths: list[str], workers: int, parts: int) -> bool:
    """Whether a pool pays for itself: several workers and parts, and at least ``MIN_PARALLEL`` files or
    ``MIN_PARALLEL_BYTES`` of sources (a few large files, volumes, are as much work as many small ones)."""
    if workers < 2 or parts < 2:
        return False
    if len(paths) >= MIN_PARALLEL:
        return True
    total = 0
    for p in paths:
        try:
            total += os.stat(p).st_size
        except OSError:
            continue  # its error comes from the build
        if total >= MIN_PARALLEL_BYTES:
            return True
    return False


def _ready() -> bool:
    return True


def _catching(fn: Callable[[], None], failed: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - handed to the thread that joins this one
        failed.append(e)


def _build(folder: Path, paths: list[str], keys: list[str], prepare: Preparer, workers: int,
           progress: Callable | None, offset: int = 0, total: int = 0) -> int:
    """Prepare and store ``paths``; ``progress(offset + done, total)`` after each file (in this process) or each
    chunk (workers). With ``workers`` > 1 (and work enough, ``_parallel``) this process is one of the workers: it
    prepares parts itself from the first moment while ``workers - 1`` pool processes (forked, ``_context``; or from a
    fork server, whose first start imports the preparation, seconds) take parts as they come free."""
    n = len(paths)
    total = total or n
    size = _chunks_of(n, workers)
    parts = deque((i, paths[s:s + size], keys[s:s + size]) for i, s in enumerate(range(0, n, size)))
    counted = [0]

    def step() -> None:
        counted[0] += 1
        if progress:
            progress(offset + counted[0], total)

    if not _parallel(paths, workers, len(parts)):
        for _, ps, ks in parts:
            r = _build_chunk(folder, ps, ks, prepare, step)
            if isinstance(r, str):
                raise DataError(r)
        return counted[0]
    parts = deque((i, paths[a:b], keys[a:b]) for i, (a, b) in enumerate(_part_bounds(n, workers)))
    errors: dict[int, str] = {}
    cv2 = sys.modules.get("cv2")
    threads = cv2.getNumThreads() if cv2 is not None else None
    _worker_init()   # this process is a worker too: one OpenCV thread, restored after
    pool = min(workers - 1, len(parts) - 1)
    ctx, forks = _context()
    try:
        with ProcessPoolExecutor(max_workers=pool, mp_context=ctx, initializer=_worker_init,
                                 initargs=(os.getpid() if forks else None,)) as ex:
            pending: dict[Any, int] = {}

            def collect(block: bool) -> None:
                if not pending:
                    return
                finished, _ = wait(pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
                for f in finished:
                    i, r = pending.pop(f), f.result()
                    if isinstance(r, str):
                        errors[i] = r
                    else:
                        counted[0] += r
                        if progress:
                            progress(offset + counted[0], total)

            def feed() -> None:  # two parts queued per pool process: it never waits for this one
                while parts and len(pending) < 2 * pool and not errors:
                    part = parts.popleft()
                    try:
                        pending[ex.submit(_build_chunk, folder, part[1], part[2], prepare)] = part[0]
                    except BaseException:
                        parts.appendleft(part)
                        raise

            failed: list[BaseException] = []
            if forks:
                # the first submit forks the pool's processes, here and now: from this thread, before it prepares
                # (no lock of the preparation held by another thread of this process at the fork)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12: "multi-threaded" (BLAS)
                    feed()
                starter = None
            else:
                # a fork server's first start waits for its preload (seconds, it imports torch): a warm-up task
                # starts the pool from a thread while this process prepares; parts go to the pool once it is up
                starter = threading.Thread(target=_catching, args=(lambda: ex.submit(_ready).result(), failed),
                                           daemon=True)
                starter.start()
            # after a bad file, only the parts before it go on (the error reported is the first in the order given)
            while parts and not (errors and parts[0][0] > min(errors)):
                i, ps, ks = parts.popleft()
                r = _build_chunk(folder, ps, ks, prepare, step)
                if isinstance(r, str):
                    errors[i] = r
                if starter is None or not starter.is_alive():
                    collect(False)
                    feed()
            if starter is not None:
                starter.join()
            if failed:
                raise failed[0]
            while pending:
                collect(True)
    finally:
        if cv2 is not None and threads is not None:
            cv2.setNumThreads(threads)
    if errors:
        raise DataError(errors[min(errors)])  # the first bad file in the order given, as a serial build finds it
    return counted[0]


class _Group:
    """The source files of one loader call and their entries, resolved as views need them."""

    def __init__(self, paths: list[Path], prepare: Preparer, spatial_dims: int) -> None:
        self.paths, self.prepare, self.ndim = paths, prepare, spatial_dims + 2
        self.resolved: dict[int, Entry] = {}
        self.store = Store.for_preparer(prepare, getattr(prepare, "store_root", None))
        self.shapes: set[tuple[int, ...]] = set()
        self.floating = False

    def ensure(self, rows: np.ndarray, progress: Callable | None = None) -> BuildResult | None:
        need = [int(r) for r in np.unique(rows) if int(r) not in self.resolved]
        if not need:
            return None
        result = prepare_store([self.paths[r] for r in need], self.prepare, getattr(self.prepare, "workers", None),
                               progress, getattr(self.prepare, "store_root", None))
        self.resolved.update(zip(need, result.entries))
        self.shapes |= {e.shape for e in result.entries}
        self.floating = self.floating or any(e.dtype != "uint8" for e in result.entries)
        log = getattr(self.prepare, "store_log", None)
        if isinstance(log, list):
            log.append(result)
        return result

    def item(self, rows: np.ndarray) -> tuple[tuple[int, ...], np.dtype]:
        """The shape of one row and the dtype the rows are served in (float32 as soon as one is not uint8)."""
        if len(self.shapes) > 1:
            raise DataError(f"prepared images of different shapes {sorted(self.shapes)[:2]} in one dataset",
                            self.paths[int(rows[0])].parent if len(rows) else None)
        shape = next(iter(self.shapes)) if self.shapes else ()
        return shape, np.dtype(np.float32 if self.floating else np.uint8)


class StoreImages:
    """Images of a dataset as rows of the prepared store: an array-like (``len``, ``ndim``, ``shape``, ``dtype``,
    indexing, ``np.asarray``) that ``ArrayDataset`` holds in place of an in-memory array. Indexing with indices,
    a mask or a slice gives another view without reading; an integer (or a tuple starting with one) reads that
    image; ``np.asarray`` reads all rows of the view."""

    def __init__(self, group: _Group, rows: np.ndarray) -> None:
        self.group, self.rows = group, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ndim(self) -> int:
        return self.group.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        self.group.ensure(self.rows)
        return (len(self.rows), *self.group.item(self.rows)[0])

    @property
    def dtype(self) -> np.dtype:
        self.group.ensure(self.rows)
        return self.group.item(self.rows)[1]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, k):
        if isinstance(k, tuple):
            head, rest = k[0], k[1:]
            if isinstance(head, (int, np.integer)):
                return self[head][rest]
            return np.asarray(self[head])[(slice(None), *rest)]
        if isinstance(k, (int, np.integer)):
            return self._read(self.rows[[int(k)]])[0]
        return StoreImages(self.group, self.rows[k])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._read(self.rows)
        return out if dtype is None else out.astype(dtype, copy=False)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        self.group.ensure(rows)
        shape, dtype = self.group.item(rows)
        arrays = self.group.store.read([self.group.resolved[int(r)] for r in rows])
        out = np.empty((len(rows), *shape), dtype)
        for i, a in enumerate(arrays):
            out[i] = a.astype(np.float32) / 255.0 if dtype != a.dtype and a.dtype == np.uint8 else a
        return out


@contextmanager
def deferred() -> Iterator[None]:
    """Inside the block ``stored_images`` prepares nothing: the caller selects, then calls ``realize``."""
    token = _DEFER.set(True)
    try:
        yield
    finally:
        _DEFER.reset(token)


def stored_images(paths: Sequence[Path], prepare: Preparer, spatial_dims: int = 2,
                  progress: Callable | None = None) -> StoreImages:
    """A view of ``paths`` through the store: prepared now (what the store lacks), or, inside ``deferred()``, when
    ``realize`` or a first read needs it."""
    view = StoreImages(_Group([Path(p) for p in paths], prepare, spatial_dims), np.arange(len(paths)))
    if not _DEFER.get():
        view.group.ensure(view.rows, progress)
    return view


def realize(datasets: Sequence[object], progress: Callable | None = None) -> list[BuildResult]:
    """Prepare, in one parallel pass per source group, every row that ``datasets`` (objects with ``images``)
    view through the store; returns what each pass built and reused."""
    wanted: dict[int, tuple[_Group, list[np.ndarray]]] = {}
    for ds in datasets:
        imgs = getattr(ds, "images", None)
        if isinstance(imgs, StoreImages):
            wanted.setdefault(id(imgs.group), (imgs.group, []))[1].append(imgs.rows)
    out = []
    for group, rows in wanted.values():
        r = group.ensure(np.concatenate(rows), progress)
        if r is not None:
            out.append(r)
    return out
