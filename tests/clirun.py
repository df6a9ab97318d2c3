"""Run the ``medlens`` command line inside the test process, as a subprocess would see it.

``medlens(*args)`` calls ``medlens.cli.main.main`` (the console script's entry point) with the arguments as
strings, in ``cwd`` and with ``env`` when given, and returns a ``subprocess.CompletedProcess`` with the exit
code and everything written to stdout and stderr. One interpreter instead of one per command: each subprocess
paid 3-10 s of imports (torch, Lightning, MONAI) before doing any work, well over a hundred times per suite.

What a subprocess gave for free is restored after each call: the working directory, the environment, torch's
thread count and the warning filters (so a warning shown by one command is shown again by the next). An
exception escaping ``main`` (only possible with ``--debug``) becomes exit code 1 with its traceback on stderr,
as the interpreter would print it. The console script itself is still run as a real process by
``tests/e2e/test_cli.py::test_console_script_runs_as_a_process`` and the security tests.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import traceback
import warnings


def medlens(*args, cwd=None, check: bool = False, env: dict | None = None, timeout=None
            ) -> subprocess.CompletedProcess:
    import torch

    from medlens.cli.main import main

    argv = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    cwd0, env0, threads0 = os.getcwd(), dict(os.environ), torch.get_num_threads()
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("default")
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd0)
        os.environ.clear()
        os.environ.update(env0)
        torch.set_num_threads(threads0)
    r = subprocess.CompletedProcess(["medlens", *argv], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"medlens {argv} failed ({code}): {r.stderr[-2000:]}")
    return r
