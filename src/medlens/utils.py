"""Small shared helpers: atomic writes, seeding, the data directory."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from medlens.errors import ConfigError, MedlensError

DATA_ENV = "MEDLENS_DATA"


def data_dir() -> Path:
    """Root of the on-disk datasets: ``$MEDLENS_DATA`` or ``~/.medlens/data``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser().resolve() if env else Path.home() / ".medlens" / "data"


SMOKE_ENV = "MEDLENS_SMOKE"


def smoke_mode() -> bool:
    """``$MEDLENS_SMOKE=1``: a test aid (the README test runs every documented command in seconds) that caps the
    work of configs loaded from files (``medlens.config.load_config``) and the iterations of ``medlens register``.
    Figures made under it mean nothing; unset in use. Read through this function only."""
    return os.environ.get(SMOKE_ENV, "").strip() == "1"


def positive_int_env(name: str) -> int | None:
    """``$name`` as a positive whole number, or None when unset or blank; anything else is one ConfigError line."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not re.fullmatch(r"[0-9]+", raw) or int(raw) < 1:
        raise ConfigError(f"${name} must be a positive whole number, not {raw[:20]!r}")
    return int(raw)


def current_umask() -> int:
    """The process umask (read by setting and restoring it: the only way POSIX offers)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: Path, directory: bool = False) -> None:
    """Give a file made by ``mkstemp``/``mkdtemp`` (always 0600/0700) the mode a plain ``open``/``mkdir``
    would have given it: 0666/0777 less the user's umask."""
    if path.exists() and not path.is_symlink():
        os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or an exception leaves any previous file untouched and no half-written file behind. The
    file ends with the mode the user's umask gives new files (``mkstemp``'s 0600 is not kept).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            _apply_umask(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def unique_stems(paths) -> list[str]:
    """Output-name stems for input paths that never collide: ``a/x.png`` and ``b/x.png`` give ``x`` and
    ``x-2`` (``.nii.gz`` and other suffixes stripped; DICOM series folders keep their folder name)."""
    out, seen = [], {}
    for p in paths:
        p = Path(p)
        name = p.name
        stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else (name if p.is_dir() else p.stem)
        key = stem.lower()
        seen[key] = seen.get(key, 0) + 1
        out.append(stem if seen[key] == 1 else f"{stem}-{seen[key]}")
    return out


def did_you_mean(name, choices) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``choices`` to ``name``, or ``""``: the hint of every
    registry's one-line refusal of an unknown name."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours
        return True
    return True


def remove_pid_named(root: str | Path, pattern, which=None) -> int:
    """Remove the entries of ``root`` whose name matches ``pattern`` (a compiled regex whose first group is
    the PID of the process that made them) when ``which(pid)`` holds: by default, when that process is gone
    (and is not this one). Only this user's regular files and folders are removed; links are never followed.
    Returns how many were removed. The one rule for what a killed medlens process leaves behind."""
    me = os.getpid()
    which = which or (lambda pid: pid != me and not pid_alive(pid))
    try:
        entries = list(os.scandir(root))
    except OSError:
        return 0
    removed = 0
    for e in entries:
        m = pattern.match(e.name)
        if not m or not which(int(m.group(1))):
            continue
        try:
            st = os.lstat(e.path)
            if st.st_uid != os.geteuid():
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(e.path)
            elif stat.S_ISREG(st.st_mode):
                os.unlink(e.path)
            else:
                continue
            removed += 1
        except OSError:
            continue
    return removed


def _partial_prefix(path: Path) -> str:
    return f".{path.name}.partial-"


def _remove_stale_partials(path: Path) -> None:
    """Remove the temporary folders that killed earlier writers of ``path`` left beside it."""
    remove_pid_named(path.parent, re.compile(re.escape(_partial_prefix(path)) + r"(\d+)-[A-Za-z0-9_]+$"))


def check_new_dir(path: str | Path) -> Path:
    """``path`` as an output folder ``atomic_dir`` will accept (new, or an empty folder), checked before a long
    job starts instead of after it; else one-line ``MedlensError``."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and (not path.is_dir() or any(path.iterdir()))):
        raise MedlensError("output folder exists and is not empty; give a new or empty folder", path)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    ``path`` must not exist, or be an empty folder. A crash leaves no folder that looks complete, an
    exception removes the temporary one, and the next writer of ``path`` removes what a killed one left.
    """
    path = check_new_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(path)}{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        _apply_umask(tmp, directory=True)
        if path.exists():
            try:
                path.rmdir()
            except OSError:
                raise MedlensError("output folder is no longer empty; nothing written", path) from None
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
