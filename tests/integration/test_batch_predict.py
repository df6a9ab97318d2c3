"""Batch prediction over an archive (issue 27, deliver 4): ``medlens predict RUN INPUT... --out results.csv``.

A tiny PneumoniaMNIST run (``trained_run``) predicts a few hundred tiny PNGs written here. Every expected
probability comes from ``Predictor.predict_files`` (the per-file path that existed before batch mode), never from
the batch code itself.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import ray

from clirun import medlens
from medlens.run import Predictor, Run, batch

N_FOLDER, N_LIST, N_MANIFEST, N_BULK = 120, 30, 30, 400


def _pngs(folder: Path, images: np.ndarray, prefix: str) -> list[Path]:
    """Real 28 px chest X-rays as PNGs, spread over two levels of sub-folders."""
    out = []
    for i, img in enumerate(images):
        p = folder / f"g{i % 3}" / (f"deeper{i % 2}" if i % 5 == 0 else "") / f"{prefix}{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(p), img)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory, data_root):
    """A folder of PNGs, a list file (with comments and blanks) and a CSV manifest of two other folders: real
    PneumoniaMNIST test images (inside the run's input profile)."""
    root = tmp_path_factory.mktemp("archive")
    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as d:
        xs = d["test_images"][:N_FOLDER + N_LIST + N_MANIFEST + N_BULK]
    folder = _pngs(root / "folder", xs[:N_FOLDER], "img")
    listed = _pngs(root / "listed", xs[N_FOLDER:N_FOLDER + N_LIST], "l")
    (root / "inputs.txt").write_text("# radiographs to score\n\n" + "\n".join(
        str(p.relative_to(root)) for p in listed) + "\n  \n# end\n")
    manifest = _pngs(root / "man", xs[N_FOLDER + N_LIST:N_FOLDER + N_LIST + N_MANIFEST], "m")
    _pngs(root / "bulk", xs[N_FOLDER + N_LIST + N_MANIFEST:], "b")   # the kill test's: enough to kill mid-way
    pd.DataFrame({"path": [str(p.relative_to(root)) for p in manifest], "site": "a"}).to_csv(root / "man.csv",
                                                                                           index=False)
    return root, folder, listed, manifest


@pytest.fixture(scope="module")
def reference(trained_run, archive):
    """Probabilities of every archive PNG by the per-file path (``Predictor.predict_files``), by file name."""
    root, folder, listed, manifest = archive
    files = folder + listed + manifest + sorted((root / "bulk").rglob("*.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # an out-of-profile input warns here; the rows carry the reasons
        rows = Predictor(Run.open(trained_run)).predict_files(list(files))
    return {Path(r.source).name: (r.probabilities, "; ".join(r.extra["input_warnings"])) for r in rows}


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)


def _check_against(df: pd.DataFrame, reference: dict, names: set[str]) -> None:
    """One row per expected input, each once, with the per-file path's probabilities and input-profile check."""
    got = [Path(f).name for f in df["file"]]
    assert len(got) == len(set(got)) == len(names)
    assert set(got) == names
    for name, p_norm, p_pneu, oop, why in zip(got, df["p_normal"], df["p_pneumonia"], df["out_of_profile"],
                                              df["input_warnings"]):
        probs, reasons = reference[name]
        # float32 convolutions sum in another order for another batch size: a few 1e-6 apart, never more
        assert np.allclose([p_norm, p_pneu], [probs["normal"], probs["pneumonia"]], rtol=0, atol=1e-5)
        assert str(oop).lower() == str(bool(reasons)).lower() and why == reasons


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_folder_list_and_manifest_give_one_row_per_input(trained_run, archive, reference, tmp_path, suffix):
    root, folder, listed, manifest = archive
    out = tmp_path / f"results{suffix}"
    # the folder, the list, the manifest, and one file of the folder named again: it is predicted once
    r = medlens("predict", trained_run, root / "folder", f"@{root / 'inputs.txt'}", root / "man.csv", folder[0],
                "--out", out, "--batch-size", "16", "--workers", "2")
    assert r.returncode == 0, r.stderr
    df = _read(out)
    _check_against(df, reference, {p.name for p in folder + listed + manifest})
    assert set(df.columns[:5]) == {"file", "prediction", "predicted_probability", "p_normal", "p_pneumonia"}
    assert set(df["positive_class"]) == {"pneumonia"}
    assert np.allclose(df["positive_probability"], df["p_pneumonia"])
    assert set(df["prediction"]) <= {"normal", "pneumonia"}
    # the decision is the run's validation threshold applied to P(pneumonia)
    th = Run.open(trained_run).meta.threshold
    assert th is not None
    assert np.array_equal(df["p_pneumonia"].to_numpy() >= th.value, df["prediction"].to_numpy() == "pneumonia")
    assert "0 error(s)" in r.stdout and f"{N_FOLDER + N_LIST + N_MANIFEST} predicted" in r.stdout
    assert not out.with_name(out.name + ".parts").exists()   # parquet: the parts are combined and gone


def test_kill_9_then_resume_gives_each_input_once(trained_run, archive, reference, tmp_path):
    """A real ``medlens predict`` process killed with SIGKILL mid-way, a torn last line added as a kill during a
    write would leave it, then ``--resume``: every input once, none missing, the per-file probabilities."""
    root, folder, listed, manifest = archive
    out = tmp_path / "results.csv"
    args = ["predict", str(trained_run), str(root / "bulk"), f"@{root / 'inputs.txt'}", str(root / "man.csv"),
            "--out", str(out), "--batch-size", "1", "--workers", "1"]
    p = subprocess.Popen([sys.executable, "-m", "medlens.cli.main", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") > 10:   # the header and at least 10 rows
                break
            time.sleep(0.005)
        assert p.poll() is None, "the run ended before it could be killed: " + (p.stderr.read() if p.stderr else b"").decode()
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
        if p.stderr:
            p.stderr.close()
    total = N_BULK + N_LIST + N_MANIFEST
    done = _read(out)
    assert 10 <= len(done) < total
    with open(out, "ab") as f:          # half of a row: what a kill during a batch's write would leave
        f.write(b"/somewhere/else.png,pneumonia,0.9")
    r = medlens(*args, "--resume", "--batch-size", "32")
    assert r.returncode == 0, r.stderr
    assert f"{len(done)} done before" in r.stdout
    df = _read(out)
    assert len(df) == total
    assert "/somewhere/else.png" not in set(df["file"])
    _check_against(df, reference, {p.name for p in [*(root / "bulk").rglob("*.png"), *listed, *manifest]})
    # a second resume has nothing left to do and changes nothing
    before = out.read_bytes()
    r = medlens(*args, "--resume")
    assert r.returncode == 0 and out.read_bytes() == before and "0 predicted" in r.stdout


def test_bad_files_go_to_the_errors_file_and_the_others_are_predicted(trained_run, archive, reference, tmp_path):
    root, folder, _, _ = archive
    src = tmp_path / "mixed"
    src.mkdir()
    good = folder[:20]
    for f in good:
        (src / f.name).write_bytes(f.read_bytes())
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)      # a PNG signature, then nothing
    np.save(src / "volume.npy", np.zeros((4, 28, 28), np.float32))             # a 3D array for a 2D model
    out = tmp_path / "r.csv"
    r = medlens("predict", trained_run, src, src / "missing.png", "--out", out, "--workers", "2")
    assert r.returncode == 3, r.stderr      # documented: 3 when some inputs are listed in the errors file
    assert "3 error(s) listed in" in r.stdout and "20 predicted" in r.stdout
    df = _read(out)
    _check_against(df, reference, {f.name for f in good})
    with open(tmp_path / "r.errors.csv", newline="") as f:
        errors = {Path(row["file"]).name: row["reason"] for row in csv.DictReader(f)}
    assert set(errors) == {"corrupt.png", "volume.npy", "missing.png"}
    assert "2D" in errors["volume.npy"] and "3D" in errors["volume.npy"]
    assert "not found" in errors["missing.png"]
    assert errors["corrupt.png"]


def test_out_of_profile_inputs_are_predicted_with_the_warning(trained_run, archive, tmp_path):
    """An RGB photo of another size: batch mode writes its row with the reasons instead of refusing it."""
    rgb = tmp_path / "photo.png"
    rng = np.random.default_rng(5)
    cv2.imwrite(str(rgb), rng.integers(0, 255, (300, 200, 3), dtype=np.uint8))
    inside = archive[1][0]
    out = tmp_path / "r.csv"
    r = medlens("predict", trained_run, rgb, inside, "--out", out)
    assert r.returncode == 0, r.stderr
    df = _read(out).set_index("file")
    assert df.loc[str(rgb), "out_of_profile"] in (True, "true")
    assert "colour" in df.loc[str(rgb), "input_warnings"] and "300" in df.loc[str(rgb), "input_warnings"]
    assert df.loc[str(inside), "out_of_profile"] in (False, "false") and df.loc[str(inside), "input_warnings"] == ""
    assert "(1 outside the training data)" in r.stdout


def test_resume_refuses_a_table_it_did_not_write(trained_run, archive, tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("file,label\nx.png,1")        # no last newline: still not cut like a torn line of ours
    f = archive[1][0]
    r = medlens("predict", trained_run, f, "--out", out, "--resume")
    assert r.returncode == 2 and "another run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = medlens("predict", trained_run, f, "--out", out)   # without --resume: existing results are not touched
    assert r.returncode == 2 and "--resume" in r.stderr
    assert out.read_text() == "file,label\nx.png,1"


def test_ray_engine_gives_the_local_probabilities(trained_run, archive, reference, tmp_path):
    """--engine ray starts a local Ray instance (2 CPUs: --workers 2), maps the Predictor with Ray Data, writes
    the same table, and shuts Ray down."""
    root, folder, listed, manifest = archive
    out = tmp_path / "ray.parquet"
    assert not ray.is_initialized()
    try:
        r = medlens("predict", trained_run, root / "folder", f"@{root / 'inputs.txt'}", "--out", out,
                    "--engine", "ray", "--workers", "2", "--batch-size", "32")
        assert not ray.is_initialized()     # the CLI stopped the instance it started
    finally:
        ray.shutdown()
    assert r.returncode == 0, r.stderr
    assert "ray" not in r.stderr.lower()    # no Ray console chatter
    _check_against(_read(out), reference, {p.name for p in folder + listed})


def test_a_batch_is_predicted_in_passes_of_bounded_size(trained_run, archive, reference, monkeypatch):
    """``answer`` runs the network over a batch in passes of at most ``PASS_BYTES`` of inputs (the activations
    stay in the cache): the passes are that size and the rows are the per-file path's probabilities."""
    root, folder, listed, manifest = archive
    predictor = Predictor(Run.open(trained_run))
    items = [batch.decode(predictor, str(f)) for f in folder[:40]]
    x0 = items[0].x
    assert x0 is not None
    monkeypatch.setattr(batch, "PASS_BYTES", 8 * x0.nbytes)
    sizes: list[int] = []
    real = predictor.predict_arrays

    def counted(x, calibrated=True):
        sizes.append(len(x))
        return real(x, calibrated)

    monkeypatch.setattr(predictor, "predict_arrays", counted)
    with batch.inference_network(predictor):
        rows, errors = batch.answer(predictor, items)
    assert sizes == [8] * 5 and not errors
    _check_against(pd.DataFrame(rows), reference, {p.name for p in folder[:40]})


def test_a_dicom_series_is_one_input_of_a_volume_run_and_its_slices_inputs_of_a_2d_run(data_root, tmp_path):
    """Folder expansion: the LIDC scan's slices are one series input (its folder) for a 3D run, and each slice an
    input of its own for a 2D run."""
    from medlens.run.batch import collect_inputs

    scan = data_root / "lidc-idri-0001"
    slices = sorted(p for p in scan.rglob("*.dcm"))
    assert len(slices) > 50
    assert collect_inputs([scan], spatial_dims=3) == [str(slices[0].parent)]
    assert collect_inputs([scan], spatial_dims=2) == [str(p) for p in slices]
