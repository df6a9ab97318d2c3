"""Long steps report their progress through a callback the CLI passes in (issue 29): the library calls it with
the right totals, ending at done == total, and never prints."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medlens.io.image import Image


def _calls(fn, *args, **kwargs):
    seen: list[tuple] = []
    result = fn(*args, progress=lambda *a: seen.append(a), **kwargs)
    return result, seen


def test_train_reports_each_image_loaded_then_the_end_of_loading(tmp_path, capsys):
    # issue 29 item 8: `medlens train` on image files shows a loading bar (the CLI passes progress_step)
    import json

    from PIL import Image as PILImage

    from medlens.config import config_from_dict
    from medlens.evaluation.evaluate import evaluate_run
    from medlens.workflow.train import train

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for k in range(24):
        cls = root / ("normal" if k % 2 else "pneumonia")
        cls.mkdir(parents=True, exist_ok=True)
        PILImage.fromarray((rng.random((20, 20)) * 255).astype(np.uint8)).save(cls / f"img{k:02d}.png")
    cfg = config_from_dict({
        "name": "loading", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"source": "folder", "path": str(root), "size": 16, "val_fraction": 0.25, "test_fraction": 0.25},
        "model": {"name": "small_cnn", "params": {"widths": [4, 8]}},
        "train": {"epochs": 1, "batch_size": 8, "precision": "32"},
        "evaluation": {"bootstrap": 10}})
    run, seen = _calls(train, cfg, progress_bar=False, log=lambda s: None)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    # one step per file read, out of all of them; then the end of loading, before the fit; nothing after
    assert seen == [(k, 24, "loading") for k in range(1, 25)] + [(1, 1, "loaded")]
    # `medlens evaluate` on the run reads its data from the prepared store (issue 27): one step, nothing decoded
    results, seen = _calls(evaluate_run, run)
    assert results["test"]["n"] == 6 and seen == [(24, 24, "loading")]
    assert capsys.readouterr().out == ""


def test_registration_reports_iterations_against_the_stage_budget(capsys):
    from medlens.imaging.register import register

    rng = np.random.default_rng(0)
    fixed = ndimage.gaussian_filter(rng.random((64, 64)), 3).astype(np.float32)
    moving = ndimage.shift(fixed, (3, -2), order=1).astype(np.float32)
    reg, seen = _calls(register, Image(fixed), Image(moving), "affine", iterations=20)
    assert reg.kind == "affine"
    totals = {t for _, t in seen}
    assert totals == {2 * 3 * 20}  # two stages (rigid, then affine), three levels, 20 iterations each
    done = [d for d, _ in seen]
    assert len(done) > 2 and done == sorted(done) and done[-1] == 120  # monotone, ends complete
    assert any(0 < d < 60 for d in done)  # reported during the first stage, not only at its end
    assert capsys.readouterr() == ("", "")


@pytest.mark.integration
def test_export_reports_each_parity_pass(trained_run, tmp_path, capsys):
    import shutil

    from medlens.workflow.export import export_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    report, seen = _calls(export_run, run, "onnx", n_parity=16)
    assert report["max_abs_prob_diff"] < 1e-3
    # a classifier: the PyTorch reference, then the written file, one pass each over the parity images
    assert seen == [(0, 2, "reference"), (1, 2, "reference"), (2, 2, "onnx parity")]
    assert capsys.readouterr() == ("", "")


@pytest.mark.integration
def test_deid_reports_files_finished_out_of_all(tmp_path, data_root):
    import shutil

    from medlens.io.deid import deidentify_folder

    src = tmp_path / "in"
    src.mkdir()
    for k, f in enumerate(sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))[:3]):
        shutil.copy(f, src / f"{k}.dcm")
    (src / "notes.txt").write_text("not DICOM")  # a skipped file counts as finished too
    rep, seen = _calls(deidentify_folder, src, tmp_path / "out", key="k")
    assert rep.files == 3 and rep.files_in == 4
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.integration
@pytest.mark.slow
def test_segmentation_evaluate_reports_loading_then_cases(tmp_path_factory, capsys):
    from servehelp import tiny_run

    from medlens.evaluation.segmentation import evaluate_segmentation_run
    from medlens.run import Run

    run = Run.open(tiny_run("unet2d", tmp_path_factory))
    capsys.readouterr()
    results, seen = _calls(evaluate_segmentation_run, run)
    n_cases = results["val"]["n"] + results["test"]["n"]
    loading = [s for s in seen if s[2] == "loading"]
    predicting = [s for s in seen if s[2] == "predicting"]
    assert loading and seen.index(loading[-1]) < seen.index(predicting[0])  # the cases load first
    assert predicting == [(k, n_cases, "predicting") for k in range(n_cases + 1)]  # then one step per case
    assert capsys.readouterr() == ("", "")
