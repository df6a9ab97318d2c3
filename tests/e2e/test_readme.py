"""Every README command runs as printed (issue 19).

Convention (stated in a comment at the top of the README's Quick tour, too):
- every ```bash block of README.md is executable: each `medlens ...` line in it runs, in README order, in one
  temporary folder that has `configs/` beside it (as the repository root does), with `$MEDLENS_DATA` expanded
  and `MEDLENS_MAX_EPOCHS=1` plus `MEDLENS_SMOKE=1` capping each training's epochs, samples, bootstrap
  resamples and patches (config loading reads both: `medlens.config.load_config`);
- a line must exit 0, unless it ends in a `# expected error` comment: then it must fail with exit code 2
  (a one-line MedlensError);
- ```console blocks show commands that start long-running servers (`medlens serve`), need a PACS/EHR
  (Orthanc, a FHIR server) or the network (`medlens data fetch`): this test does not run them; the serve and
  interop tests (tests/e2e/test_serve.py, the interop tests with a real Orthanc) cover them.
Commands run in this process through `medlens.cli.main.main` (the console script's entry point), so the
package is imported once rather than forty times.
"""

from __future__ import annotations

import os
import re
import shlex
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPECTED_ERROR = "# expected error"


def readme_commands(text: str) -> list[tuple[str, bool]]:
    """``(command line, expected to fail)`` for each `medlens` line of the README's ```bash blocks."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("medlens "):
                out.append((line, EXPECTED_ERROR in line))
    return out


def test_readme_convention_is_stated_and_blocks_are_fenced_by_it():
    text = (REPO / "README.md").read_text()
    assert text.splitlines()[2:5] == ["```bash", "make run    # creates .venv if needed, installs, trains + evaluates "
                                      "PneumoniaMNIST, prints the report path",
                                      "make test   # the same set-up, then the whole test suite (unit, integration on "
                                      "real data, e2e, headless Chromium)"]
    assert "tests/e2e/test_readme.py" in text and "```console" in text
    cmds = [c for c, _ in readme_commands(text)]
    assert len(cmds) >= 30
    # nothing that needs a server, a PACS or the network sits in an executed block
    assert not [c for c in cmds if re.match(r"medlens (serve|pacs|fhir|data fetch)\b", c) or "--from-pacs" in c]
    # nor a placeholder path that no command creates
    assert not [c for c in cmds if re.search(r"path/to|(?<![/\w])(xray\d?\.png|fundus\d\.jpg)|fixed\.nii|\[--", c)]


@pytest.mark.slow
def test_every_readme_command_runs_as_printed(tmp_path, data_root, monkeypatch):
    from medlens.cli.main import main

    work = tmp_path / "readme"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(work)
    monkeypatch.setenv("MEDLENS_MAX_EPOCHS", "1")
    monkeypatch.setenv("MEDLENS_SMOKE", "1")  # and few samples, resamples and patches: each line proves it runs
    commands = readme_commands((REPO / "README.md").read_text())
    failures = []
    with warnings.catch_warnings():
        for line, expect_error in commands:
            argv = shlex.split(line.replace("$MEDLENS_DATA", str(data_root)), comments=True)
            code = main(argv[1:])
            if (code != 2) if expect_error else (code != 0):
                failures.append(f"exit {code}: {line}")
    assert not failures, "\n".join(failures)
    luna = (work / "runs" / "luna16_seed_cnn" / "report.html").read_text()
    assert 'id="published"' in luna and "0.893" in luna and "0.982" in luna  # the seed's figures beside ours
    assert (work / "runs" / "retinamnist_dr_seed" / "report.html").exists()
    assert os.path.isfile(work / "masks3d" / "brain1_mask.nii.gz") or any((work / "masks3d").iterdir())
