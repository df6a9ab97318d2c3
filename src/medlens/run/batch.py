"""Batch prediction over an archive: ``medlens predict RUN INPUT... --out results.csv|results.parquet``.

Inputs are expanded to one list of paths (files; folders, recursively, by ``medlens.io.formats``' suffixes, DICOM
series grouped for volume runs; ``@list.txt`` files; CSV manifests) and streamed: decoded and prepared in worker
processes (a torch ``DataLoader`` returning plain numpy arrays, so a small ``/dev/shm`` does not matter) through
``Predictor.prepare`` (the one ``InputSpec`` path), predicted in batches by the ``Predictor``, and appended to the
results as each batch completes. At most a few batches of decoded inputs are held at any time.

Results are keyed by the input path. A CSV batch is appended with one write, then flushed and fsynced; a parquet
batch becomes one part file (written to a temporary name, then renamed) that the end of the run combines into one
file. ``resume=True`` reads what a killed run left (a torn last CSV line is cut off and redone), validates it and
predicts only the inputs not yet answered, so the result has each input once, with no gap. An input that cannot be
read or prepared goes to ``<out stem>.errors.csv`` (file, reason) and the run goes on. An input outside the run's
training profile is predicted all the same; its row says so (``out_of_profile``, ``input_warnings``).

The local engine is here; ``medlens.run.batch_ray`` maps the same ``decode``/``answer`` over Ray Data.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import DataLoader, Dataset

from medlens.data.base import confined_paths, read_csv_checked, refuse_blank_cells
from medlens.data.folder import list_images
from medlens.errors import DataError, MedlensError
from medlens.io.dicom import list_series
from medlens.io.formats import DICOM_SUFFIXES, suffix_of
from medlens.run.predictor import Predictor
from medlens.utils import atomic_path

#: the suffixes of ``--out`` that select batch mode
TABLE_SUFFIXES = (".csv", ".parquet")
ERROR_COLUMNS = ("file", "reason")
Row = dict[str, object]
Batch = tuple[list[Row], list[Row]]        # (result rows, error rows) of one batch
ProgressFn = Callable[..., None]


def is_table_output(out: str | Path | None) -> bool:
    """Whether ``--out`` names a results table (batch mode) rather than a folder."""
    return out is not None and Path(out).suffix.lower() in TABLE_SUFFIXES


def errors_path(out: str | Path) -> Path:
    """``results.csv`` -> ``results.errors.csv`` (also for ``results.parquet``)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.errors.csv")


# ------------------------------------------------------------------------------------------------ inputs
def _list_file(path: Path) -> list[str]:
    """The paths of an ``@inputs.txt`` list: one a line, blank lines and ``#`` comments ignored; a relative path
    is relative to the list file's folder."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("list file not found", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"list file not readable ({type(e).__name__})", path) from None
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            out.append(str(path.parent / s) if not Path(s).is_absolute() else s)
    return out


def _manifest(path: Path, column: str) -> list[str]:
    """The ``column`` paths of a CSV manifest, relative to (and kept inside) its folder, as training reads them."""
    df = read_csv_checked(path, [column], "manifest")
    refuse_blank_cells(df, [column], path)
    names = df[column].astype(str).tolist()
    return [str(p) for p in confined_paths(path.parent, names, path, column)]


def _folder(folder: Path, spatial_dims: int) -> list[str]:
    """A folder's inputs: every image file under it; for a volume run, each DICOM series is one input (the folder
    holding its files), grouped by ``medlens.io.dicom.list_series``, and its slices are not inputs of their own."""
    files = list_images(folder)
    if spatial_dims != 3:
        return [str(p) for p in files]
    series_dirs = sorted({str(s.files[0] if len(s.files) == 1 else _common_parent(s.files))
                          for s in list_series(folder)})   # a one-file series (multi-frame) is that file
    return series_dirs + [str(p) for p in files if suffix_of(p) not in DICOM_SUFFIXES]


def _common_parent(files: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in files]))


def collect_inputs(args: Iterable[str | Path], spatial_dims: int = 2, path_column: str = "path") -> list[str]:
    """Expand ``INPUT...`` into input paths, each once, in the order given: files as they are, folders
    (recursively), ``@list.txt`` files and CSV manifests (their ``path_column``). A path that does not exist is
    kept: it becomes a row of the errors file, not the end of the run."""
    out: dict[str, None] = {}
    for arg in args:
        s = str(arg)
        expanded = ([s] if not s.startswith("@") else _list_file(Path(s[1:])))
        for item in expanded:
            p = Path(item)
            if p.is_dir():
                found = _folder(p, spatial_dims)
            elif p.suffix.lower() == ".csv" and p.is_file():
                found = _manifest(p, path_column)
            else:
                found = [item]
            out.update(dict.fromkeys(found))
    if not out:
        raise DataError("no input images found in " + ", ".join(map(str, args)))
    return list(out)


# ------------------------------------------------------------------------------------------------ one input
@dataclass
class Decoded:
    """One input after the worker: its prepared array and profile reasons, or why it could not be read."""

    file: str
    x: np.ndarray | None = None
    reasons: list[str] = field(default_factory=list)
    error: str | None = None


def reason_of(e: BaseException, file: str) -> str:
    """The problem of an exception, one line, without the file name the errors file already has."""
    text = " ".join(str(e).split()) or type(e).__name__
    path = getattr(e, "path", None)
    for prefix in (f"{path}: " if path else None, f"{file}: "):
        if prefix and text.startswith(prefix):
            text = text[len(prefix):]
    return text if isinstance(e, MedlensError) else f"{type(e).__name__}: {text}"[:300]


def decode(predictor: Predictor, file: str) -> Decoded:
    """Read and prepare one input through the run's ``Predictor`` (the one preparation path), with its input
    profile check; any failure is caught and returned as the reason."""
    try:
        image = predictor.load(file)
        x = predictor.prepare(image, name=file)
        return Decoded(file, x, predictor.input_warnings(image, x))
    except Exception as e:  # noqa: BLE001 - one bad file is reported and skipped, never fatal to the batch
        return Decoded(file, error=reason_of(e, file))


def columns(predictor: Predictor) -> list[tuple[str, str]]:
    """The results table's (column, kind) list for this run; kinds: str, float, prob, bool."""
    meta, task = predictor.meta, predictor.task
    if task.numeric:
        cols = [("value", "float"), ("lower", "float"), ("upper", "float"), ("unit", "str")]
    else:
        cols = [("prediction", "str"), ("predicted_probability", "prob")]
        cols += [(f"p_{n}", "prob") for n in meta.class_names]
        if task.has_threshold and len(meta.class_names) == 2:
            cols += [("positive_class", "str"), ("positive_probability", "prob"), ("threshold", "float")]
        cols += [("calibrated", "str")]
    return [("file", "str"), *cols, ("out_of_profile", "bool"), ("input_warnings", "str")]


def answer(predictor: Predictor, items: list[Decoded]) -> Batch:
    """Predict the decoded inputs of one batch: (result rows, error rows). A batch the model refuses (a
    non-finite output) is retried one input at a time, so only the inputs at fault become error rows."""
    good = [d for d in items if d.error is None and d.x is not None]
    errors: list[Row] = [{"file": d.file, "reason": d.error} for d in items if d.error is not None]
    if not good:
        return [], errors
    try:
        probs = _predict(predictor, np.stack([d.x for d in good if d.x is not None]))
    except MedlensError as e:
        if len(good) == 1:
            return [], errors + [{"file": good[0].file, "reason": reason_of(e, good[0].file)}]
        rows: list[Row] = []
        for d in good:
            r, e = answer(predictor, [d])
            rows += r
            errors += e
        return rows, errors
    rows = []
    for d, p, (cls, prob) in zip(good, probs, predictor.decide(probs)):
        rows.append(_row(predictor, predictor.prediction(d.file, p, cls, prob, d.reasons)))
    return rows, errors


#: the inputs of one forward pass, at most (bytes of prepared float32 inputs; at least ``MIN_PASS`` inputs): a
#: pass over 16 gray images of 128 px keeps the small CNN's activations (8 MB) in the cache, 64 do not (33 MB):
#: measured here, one thread, 0.8 ms an image against 1.6 ms
PASS_BYTES = 2**20
MIN_PASS = 4


def _predict(predictor: Predictor, x: np.ndarray) -> np.ndarray:
    """``predictor.predict_arrays`` of a batch, in passes of ``PASS_BYTES`` of inputs."""
    step = max(MIN_PASS, PASS_BYTES // max(1, x[0].nbytes))
    if len(x) <= step:
        return predictor.predict_arrays(x)
    return np.concatenate([predictor.predict_arrays(x[i:i + step]) for i in range(0, len(x), step)])


def _row(predictor: Predictor, pr) -> Row:
    row: Row = {"file": pr.source}
    if pr.value is not None:
        row.update(value=pr.value, lower=pr.lower, upper=pr.upper, unit=pr.unit or "")
    else:
        row.update(prediction=pr.prediction, predicted_probability=pr.predicted_probability)
        row.update({f"p_{k}": float(v) for k, v in pr.probabilities.items()})
        if pr.positive_class is not None:
            row.update(positive_class=pr.positive_class, positive_probability=float(pr.probability),
                       threshold=pr.threshold)
        row["calibrated"] = pr.calibrated or "no"
    reasons = pr.extra.get("input_warnings") or []
    row.update(out_of_profile=bool(reasons), input_warnings="; ".join(reasons))
    return row


# ------------------------------------------------------------------------------------------------ local engine
class _Decoding(Dataset):
    """The inputs as a map-style dataset whose items are ``Decoded`` (numpy inside: pickled through the worker's
    pipe, never torch shared memory)."""

    def __init__(self, predictor: Predictor, files: list[str]) -> None:
        self.predictor, self.files = predictor, files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Decoded:
        return decode(self.predictor, self.files[i])


def _as_list(items: list[Decoded]) -> list[Decoded]:
    return items


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)   # a decoding worker: its parent runs the model


def _fold_batch_norm(module: torch.nn.Module) -> None:
    """Fold each eval-mode BatchNorm that directly follows a convolution in a ``Sequential`` into that convolution
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``; the BatchNorm becomes an ``Identity``): the same outputs to float
    rounding, one pass over the activations fewer."""
    for child in module.children():
        _fold_batch_norm(child)
    if not isinstance(module, torch.nn.Sequential):
        return
    pairs = ((torch.nn.Conv2d, torch.nn.BatchNorm2d), (torch.nn.Conv3d, torch.nn.BatchNorm3d))
    for i in range(len(module) - 1):
        conv, bn = module[i], module[i + 1]
        for c, b in pairs:
            if isinstance(conv, c) and type(bn) is b and bn.track_running_stats and bn.running_mean is not None:
                module[i] = fuse_conv_bn_eval(conv, bn)
                module[i + 1] = torch.nn.Identity()


@contextmanager
def inference_network(predictor: Predictor) -> Iterator[None]:
    """For the block, the run's torch network replaced by an inference copy: BatchNorm folded into the convolution
    before it, and for a 2D run the channels-last memory format (oneDNN's convolutions on CPU). Measured on the
    small CNN at 128 px, one thread, batches of 64: 2.2-2.5 ms an image against 10 ms, the same probabilities to
    1e-7. Classical runs and an attached export as they are; the original network is attached again after."""
    run = predictor.run
    net = run.model
    if not isinstance(net, torch.nn.Module) or run.is_classical or next(net.parameters(), None) is None:
        yield          # an attached export's runtime (no parameters: nothing to fold or lay out)
        return
    try:
        fast = copy.deepcopy(net).eval()
    except Exception:  # noqa: BLE001 - a network that cannot be copied runs as it is
        yield
        return
    _fold_batch_norm(fast)
    if predictor.spec.spatial_dims == 2:
        fast.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  (a keyword torch accepts, untyped)
    run.use_model(fast)
    try:
        yield
    finally:
        run.use_model(net)


def local_batches(predictor: Predictor, files: list[str], batch_size: int = 64, workers: int = 2) -> Iterator[Batch]:
    """(rows, errors) per batch of ``files``, decoded by ``workers`` processes (0: in this one) and predicted here
    (``inference_network``, ``_predict``), in order. Memory: at most ``2 * workers + 1`` batches of prepared
    inputs.

    At most one decoder fewer than the CPUs this process may use: the model runs here, the pipeline's one serial
    stage, and a decoder on its core preempts it (2 CPUs, 4,000 PNGs of 256 px at 128 px, the small CNN: 540-630
    files/s with 2 decoders, 950-990 with 1)."""
    cpus = len(os.sched_getaffinity(0))
    workers = max(0, min(workers, cpus - 1))
    loader = DataLoader(_Decoding(predictor, files), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_as_list, worker_init_fn=_one_thread if workers else None,
                        prefetch_factor=2 if workers else None)
    # the model gets the cores the decoders leave: OpenMP threads that wait for a busy core spin, and on 2 cores
    # with 2 decoders a 2-thread forward pass was measured 40x slower per image than a 1-thread one
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, cpus - workers)))
    try:
        with inference_network(predictor):
            for items in loader:
                yield answer(predictor, items)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ writers
def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)   # shortest text that reads back to the same float
    return str(value)


def _parse(value: str, kind: str, where: str) -> object:
    if kind == "str":
        return value
    if kind == "bool":
        if value not in ("true", "false"):
            raise ValueError(f"{where} is {value[:20]!r}, not true/false")
        return value == "true"
    if value == "" and kind == "float":
        return None
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"{where} is {value[:20]!r}, not a number") from None
    if not math.isfinite(v) or (kind == "prob" and not 0.0 <= v <= 1.0):
        raise ValueError(f"{where} is {value[:20]!r}, not a {'probability' if kind == 'prob' else 'finite number'}")
    return v


class CsvTable:
    """An append-only CSV keyed by its ``file`` column: each batch one ``write`` of whole lines, then fsync."""

    def __init__(self, path: Path, cols: list[tuple[str, str]]) -> None:
        self.path, self.cols = path, cols
        self.names = [c for c, _ in cols]
        self.fd: int | None = None

    def _lines(self, rows: Iterable[Row]) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in self.names])
        return buf.getvalue().encode("utf-8")

    def read(self) -> list[str]:
        """The keys of the complete rows already written, each validated; a torn last line is cut off. A row that
        medlens did not write (wrong columns, a bad value, a repeated key) is a one-line error naming its line."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        if not end:                    # medlens writes the header whole (atomically): this is someone else's file
            if data:
                raise DataError("not a results table medlens wrote (no complete line); refusing to resume", self.path)
            return []
        try:
            lines = list(csv.reader(io.StringIO(data[:end].decode("utf-8"))))
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"not a results table medlens wrote ({type(e).__name__}); refusing to resume",
                            self.path) from None
        if lines[0] != self.names:
            raise DataError(f"its columns {lines[0][:6]}... are not this run's {self.names[:6]}...; it was written "
                            "for another run: refusing to resume (give a new --out)", self.path)
        if end < len(data):            # a batch cut short by a kill: its whole lines stay, the torn one goes
            os.truncate(self.path, end)
        keys: dict[str, None] = {}
        for n, fields in enumerate(lines[1:], start=2):
            try:
                if len(fields) != len(self.names):
                    raise ValueError(f"{len(fields)} fields, not {len(self.names)}")
                for v, (c, kind) in zip(fields, self.cols):
                    _parse(v, kind, f"'{c}'")
                if not fields[0] or fields[0] in keys:
                    raise ValueError("an empty or repeated file")
            except ValueError as e:
                raise DataError(f"line {n}: {e}; refusing to resume", self.path) from None
            keys[fields[0]] = None
        return list(keys)

    def open(self, fresh: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh or not self.path.exists() or self.path.stat().st_size == 0:
            with atomic_path(self.path) as tmp:      # the header appears whole or not at all
                tmp.write_bytes(self._lines([dict(zip(self.names, self.names))]))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, rows: list[Row]) -> None:
        if rows and self.fd is not None:
            os.write(self.fd, self._lines(rows))
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_ARROW = {"str": pa.string(), "float": pa.float64(), "prob": pa.float64(), "bool": pa.bool_()}


class ParquetTable:
    """Parquet results: one part file per batch in ``<out>.parts/`` (temporary name, then rename: a part is whole
    or absent), combined into ``<out>`` (atomically, keyed: a row once) when the run ends."""

    def __init__(self, path: Path, cols: list[tuple[str, str]]) -> None:
        self.path, self.cols = path, cols
        self.schema = pa.schema([(c, _ARROW[k]) for c, k in cols])
        self.parts = path.with_name(path.name + ".parts")
        self.seq = 0

    def _tables(self) -> Iterator[tuple[Path, pq.ParquetFile]]:
        files = ([self.path] if self.path.exists() else []) + (
            sorted(p for p in self.parts.glob("part-*.parquet")) if self.parts.is_dir() else [])
        for f in files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # noqa: BLE001 - any reader failure is this one-line refusal
                raise DataError(f"not a results file medlens wrote ({type(e).__name__}); refusing to resume",
                                f) from None
            if pf.schema_arrow.names != self.schema.names:
                raise DataError("its columns are not this run's; it was written for another run: refusing to resume "
                                "(give a new --out)", f)
            yield f, pf

    def read(self) -> list[str]:
        keys: dict[str, None] = {}
        for f, pf in self._tables():
            t = pf.read()
            for c, kind in self.cols:
                if kind == "prob":
                    v = t.column(c).to_numpy(zero_copy_only=False).astype(float)
                    if not (np.isfinite(v) & (v >= 0) & (v <= 1)).all():
                        raise DataError(f"'{c}' holds a value that is not a probability; refusing to resume", f)
            keys.update(dict.fromkeys(str(k) for k in t.column("file").to_pylist() if k))
            if f != self.path:
                self.seq = max(self.seq, int(f.stem.split("-")[1]) + 1)
        return list(keys)

    def open(self, fresh: bool) -> None:
        if fresh and self.parts.exists():
            shutil.rmtree(self.parts)
        self.parts.mkdir(parents=True, exist_ok=True)
        for leftover in self.parts.glob(".part-*"):   # temporary parts of a killed run: never complete
            leftover.unlink()

    def append(self, rows: list[Row]) -> None:
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=self.schema)
        with atomic_path(self.parts / f"part-{self.seq:08d}.parquet") as tmp:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        self.seq += 1

    def close(self) -> None:
        """Combine the parts (and a previous result being resumed) into ``<out>``, one row per key."""
        seen: set[str] = set()
        with atomic_path(self.path) as tmp:
            with pq.ParquetWriter(tmp, self.schema) as w:
                for _, pf in self._tables():
                    for rb in pf.iter_batches():
                        keep = [k not in seen for k in rb.column("file").to_pylist()]
                        seen.update(str(k) for k in rb.column("file").to_pylist())
                        w.write_table(pa.Table.from_batches([rb]).filter(pa.array(keep)))
        shutil.rmtree(self.parts, ignore_errors=True)


def results_table(out: Path, cols: list[tuple[str, str]]) -> CsvTable | ParquetTable:
    return ParquetTable(out, cols) if out.suffix.lower() == ".parquet" else CsvTable(out, cols)


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class BatchSummary:
    """What a batch prediction did."""

    out: Path
    errors_file: Path
    n_inputs: int
    already_done: int = 0
    predicted: int = 0
    errors: int = 0
    out_of_profile: int = 0
    seconds: float = 0.0

    @property
    def files_per_second(self) -> float:
        return (self.predicted + self.errors) / self.seconds if self.seconds > 0 else 0.0


Engine = Callable[[list[str]], Iterator[Batch]]


def predict_archive(predictor: Predictor, inputs: list[str], out: str | Path, *, resume: bool = False,
                    engine: Engine | None = None, batch_size: int = 64, workers: int = 2,
                    progress: ProgressFn | None = None) -> BatchSummary:
    """Predict ``inputs`` (from ``collect_inputs``) into the results table ``out`` (.csv or .parquet) and its
    errors file, batch by batch. ``engine(files)`` yields (rows, errors) per batch; the default is the local one
    (``local_batches`` with ``batch_size`` and ``workers``). Without ``resume`` an existing ``out`` is refused;
    with it, the inputs already in ``out`` or in the errors file are skipped."""
    out = Path(out)
    if out.suffix.lower() not in TABLE_SUFFIXES:
        raise MedlensError(f"a results table ends in {' or '.join(TABLE_SUFFIXES)}", out)
    cols = columns(predictor)
    table, errs = results_table(out, cols), CsvTable(errors_path(out), [("file", "str"), ("reason", "str")])
    exists = out.exists() or (isinstance(table, ParquetTable) and table.parts.exists())
    if exists and not resume:
        raise MedlensError("results exist; --resume continues them, or give a new --out", out)
    done = set(table.read()) | set(errs.read()) if resume else set()
    todo = [f for f in inputs if f not in done]
    summary = BatchSummary(out, errs.path, len(inputs), already_done=len(inputs) - len(todo))
    table.open(fresh=not resume)
    errs.open(fresh=not resume)
    run = engine or (lambda files: local_batches(predictor, files, batch_size, workers))
    t0, n = time.perf_counter(), summary.already_done
    if progress:
        progress(n, len(inputs))
    try:
        for rows, bad in run(todo):
            table.append(rows)
            errs.append(bad)
            summary.predicted += len(rows)
            summary.errors += len(bad)
            summary.out_of_profile += sum(bool(r.get("out_of_profile")) for r in rows)
            n += len(rows) + len(bad)
            if progress:
                progress(n, len(inputs))
    finally:
        errs.close()
        if isinstance(table, CsvTable):
            table.close()
    if isinstance(table, ParquetTable):
        table.close()     # combined only when every batch is in
    summary.seconds = time.perf_counter() - t0
    return summary
