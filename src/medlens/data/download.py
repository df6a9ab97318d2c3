"""Downloads with HTTP range resume and checksum verification (stdlib only)."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from medlens.errors import DataError

CHUNK = 1 << 20


def file_md5(path: str | Path, chunk: int = CHUNK) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_md5(path: str | Path, expected: str) -> None:
    got = file_md5(path)
    if got != expected:
        raise DataError(f"MD5 mismatch: expected {expected}, got {got} (corrupt or partial download; "
                        "delete it and fetch again)", path)


def download(url: str, dest: str | Path, md5: str | None = None, *,
             progress: Callable[[int, int | None], None] | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, resuming a previous partial ``dest.part``, then check ``md5``.

    The final file appears only once complete and verified (the ``.part`` file is renamed).
    """
    dest = Path(dest)
    if dest.exists() and (md5 is None or file_md5(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "medlens"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status = getattr(resp, "status", 200)
            if have and status != 206:  # server ignored the range: start over
                have = 0
            length = resp.headers.get("Content-Length")
            total = (int(length) + have) if length is not None else None
            with open(part, "ab" if have else "wb") as out:
                done = have
                for block in iter(lambda: resp.read(CHUNK), b""):
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: the part file is already complete
            pass
        else:
            raise DataError(f"download failed: HTTP {e.code} for {url}", dest) from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise DataError(f"download failed ({e}); re-run the same command to resume", dest) from e
    if md5 is not None:
        got = file_md5(part)
        if got != md5:
            part.unlink(missing_ok=True)
            raise DataError(f"downloaded file has MD5 {got}, expected {md5}; removed it, try again", dest)
    os.replace(part, dest)
    return dest
