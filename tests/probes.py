"""Helpers of the security tests: a one-line error from a finished command, a load in a capped child, and the
library chatter that must not reach the console of a real `medlens federate` process."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed (exit > 0, not killed by a signal) with exactly one stderr line holding ``needles``."""
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode("utf-8", "backslashreplace")
    assert r.returncode > 0, (r.returncode, err[-2000:])  # < 0: killed by a signal (SIGABRT = -6)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# Flower's deprecation notices and log lines ("INFO :  [ROUND 1]"), Ray's actor prefix "(ClientAppActor pid=..)",
# Python warnings from any process, and colour codes
FEDERATE_CHATTER = ("DEPRECATED", "deprecated", "flwr", "Flower", "INFO ", "WARNING ", "ClientAppActor",
                    "Warning:", "not writable", "\x1b[")


def assert_no_federate_chatter(text: str) -> None:
    """What a `medlens federate` process printed holds medlens's own lines only (issue 29, item 8)."""
    found = [c for c in FEDERATE_CHATTER if c in text]
    assert not found, f"library chatter on the console: {found}\n{text[-4000:]}"


_CHILD = r"""
import json, resource, sys, time
import nibabel, numpy, PIL.Image, pydicom, SimpleITK  # imported before measuring: only the load counts
from medlens.errors import MedlensError
from medlens.io import load
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
try:
    out = {"loaded": list(load(sys.argv[1]).array.shape)}
except MedlensError as e:
    out = {"error": str(e)}
except MemoryError:
    out = {"error": "MemoryError"}
out["seconds"] = time.time() - t0
out["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
print(json.dumps(out))
"""


def load_in_child(path: Path, env: dict | None = None, memory_gb: int = 2) -> dict:
    """``load(path)`` in a child process capped at ``memory_gb`` of address space: a regression that
    decodes a bomb fails the test instead of taking the machine down. Returns the outcome, the time
    and the growth of the peak resident memory."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))

    r = subprocess.run([sys.executable, "-c", _CHILD, os.fsencode(path)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, **(env or {})}, preexec_fn=cap)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
