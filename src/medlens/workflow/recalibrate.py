"""``medlens recalibrate``: adapt a run's calibration and threshold to a site's own labelled sample.

A threshold chosen on validation may not transfer to another site (see the report's shift section).
A site that holds a small labelled sample of its own can refit the calibration and re-choose the
threshold on it, with the run's own rules. The result is a new run folder (the original is never
changed) that shares the weights and records where its operating point came from
(``Threshold.chosen_on = "site"``, ``RunMeta.recalibrated_on``). The site sample must be kept apart from
any data used to score the run: a sample that shares files or patients with the run's test split is
refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from medlens.data.base import confined_paths, read_csv_checked, refuse_blank_cells
from medlens.errors import DataError, MedlensError
from medlens.evaluation.calibration import select_calibration
from medlens.evaluation.evaluate import evaluate_run
from medlens.evaluation.threshold import choose_threshold
from medlens.report.html import write_report
from medlens.run import Predictor, Run, RunFolder, Threshold, run_lock
from medlens.run.folder import MARKER
from medlens.tasks import get_task
from medlens.transforms.preprocess import prepared_data


def _site_sample(run: Run, csv_path: Path):
    """The site's labelled images (``path,label[,patient_id]`` manifest), prepared like the run's inputs."""
    df = read_csv_checked(csv_path, ["path", "label"], "site manifest")
    refuse_blank_cells(df, ["path", "label"], csv_path)
    names = run.class_names
    labels = df["label"].astype(str)
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise DataError(f"label(s) {unknown[:3]} are not among the run's classes {names}", csv_path)
    paths = confined_paths(csv_path.parent, df["path"].astype(str).tolist(), csv_path, "path")
    pids = set(df["patient_id"].astype(str)) if "patient_id" in df.columns else set()
    return paths, np.array([names.index(v) for v in labels]), pids


def recalibrate(run_dir: str | Path, site_csv: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Copy the run to ``out`` with calibration and threshold refitted on the site sample; evaluate it."""
    run = Run.open(run_dir, expect="classification")
    run.require_weights()
    site_csv = Path(site_csv)
    task = get_task(run.task)
    if task.dense or not task.exclusive:
        raise MedlensError(f"recalibration handles binary, multi-class and ordinal runs, not {run.task}", run.dir)
    paths, y, pids = _site_sample(run, site_csv)
    if len(np.unique(y)) < 2:
        raise DataError("the site sample holds a single class; calibration and a threshold need both", site_csv)
    data = prepared_data(run.config.data, seed=run.config.seed)
    test = data.test
    shared = {str(Path(p).resolve()) for p in paths} & {str(Path(s).resolve()) for s in test.sources}
    shared_pids = pids & set(map(str, test.patient_ids))
    if shared or shared_pids:
        raise DataError(f"the site sample shares {len(shared)} file(s) and {len(shared_pids)} patient(s) with the "
                        "run's test split; keep the recalibration sample apart from the data that scores the run",
                        site_csv)
    predictor = Predictor(run)
    raw = predictor.predict_arrays(np.stack([predictor.prepare(p) for p in paths]), calibrated=False)
    cfg = run.config
    # chosen like training's, by cross-validation, but inside the site sample: none unless it lowers the log-loss
    cal, choice = select_calibration(run.task, y, raw, cfg.evaluation.calibration, seed=cfg.seed)
    if cal is not None:
        cal = cal.model_copy(update={"fitted_on": "site"})
    meta = run.meta.model_copy(deep=True)
    meta.calibration = cal
    meta.calibration_choice = {**choice, "on": "site"} if choice is not None else None
    p = cal.apply(raw) if cal is not None else raw
    if task.has_threshold:
        rule = cfg.evaluation.threshold
        meta.threshold = Threshold(rule=rule, value=choose_threshold(y, p, rule), chosen_on="site")
    meta.recalibrated_on = {"manifest": site_csv.name, "n": int(len(y)), "class_counts": np.bincount(
        y, minlength=len(run.class_names)).tolist(), "from_run": run.name}
    out = Path(out)
    folder = RunFolder(out)
    folder.check(False, overwrite)
    with run_lock(out):
        folder.prepare(False, overwrite)
        for name in ("config.yaml", run.weights_path.name, "history.csv"):
            if (run.dir / name).is_file():
                shutil.copy2(run.dir / name, out / name)
        (out / MARKER).touch()
        meta.save(out)
        new = Run.open(out)
        evaluate_run(new, data=data)
        write_report(new)
    return out

