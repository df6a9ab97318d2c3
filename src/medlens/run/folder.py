"""Run folders on disk: created under ``output_dir`` with a marker, replaced only when they hold one,
and locked while a process writes them."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Iterator

from medlens.errors import MedlensError
from medlens.run.meta import META_FILE

MARKER = ".medlens-run"   # written first into every run folder; --overwrite deletes only folders holding it
LOCK = ".lock"


class RunFolder:
    """Where a run lives, and the rules for creating, resuming and overwriting it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def is_run(self) -> bool:
        return (self.path / MARKER).is_file() or (self.path / META_FILE).is_file()

    def has_checkpoint(self) -> bool:
        return (self.path / "checkpoints" / "last.ckpt").is_file()

    def is_complete(self) -> bool:
        return (self.path / "model.pt").is_file() or (self.path / "model.skops").is_file()

    def _entries(self) -> list[Path]:
        return [c for c in self.path.iterdir() if c.name != LOCK] if self.path.is_dir() else []

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse, before anything is written, what ``prepare`` must not do."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise MedlensError("run path exists and is not a folder", p)
        exists = bool(self._entries())
        if resume:
            if not exists or not self.is_run:
                raise MedlensError("nothing to resume: not a medlens run folder", p)
            if self.is_complete():
                raise MedlensError("this run finished; nothing to resume (use --overwrite to train it again)", p)
        elif exists:
            if not overwrite:
                hint = "--resume to continue it" if self.is_run and not self.is_complete() else "--overwrite"
                raise MedlensError(f"run folder already exists; use {hint}, or another name", p)
            if not self.is_run:
                raise MedlensError("refusing to overwrite: the folder is not a medlens run (no run marker); "
                                   "remove it yourself or choose another name", p)

    def prepare(self, resume: bool, overwrite: bool) -> bool:
        """Make the folder ready for training (call it holding ``run_lock``); returns True when training
        continues from a checkpoint. A resumed run killed before its first checkpoint starts again."""
        self.check(resume, overwrite)
        if resume:
            return self.has_checkpoint()
        if self._entries():
            self._clear()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MARKER).write_text("medlens run folder\n", encoding="utf-8")
        return False

    def _clear(self) -> None:
        """Empty a marked run folder (the lock file of the running process stays)."""
        for child in self.path.iterdir():
            if child.name == LOCK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


@contextlib.contextmanager
def run_lock(path: str | Path) -> Iterator[None]:
    """Exclusive lock on a run folder for the life of the block: a second writer gets a one-line error."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    fd = os.open(p / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MedlensError("another medlens process is writing this run folder; wait for it or choose "
                               "another name", p) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
