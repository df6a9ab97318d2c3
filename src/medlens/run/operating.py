"""A run's operating point: sensitivity and specificity at its validation-chosen threshold, measured on the
split the run was evaluated on (``evaluated_split`` of ``metrics.json``: the test split once ``train`` or
``evaluate`` ran), with that split's name, so that what leaves medlens says where the figures come from.

Read from the run's ``metrics.json`` (written by ``train``/``evaluate``); DICOM SR results carry it
(``predict --outputs sr``, ``serve ?format=dicom-sr``) and the FHIR Bundle made from the SR. A run without
the file, or with one that does not parse, has no recorded operating point (an empty dict), never an error.
A file without an evaluated split gives the validation figures, named ``val``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medlens.run.run import Run

METRICS_FILE = "metrics.json"


def operating_point(run: Run) -> dict:
    """``{"split": name, "sensitivity": .., "specificity": ..}`` at the validation threshold, on the evaluated
    split (the test split when the run was evaluated; else validation), from the run's metrics.json."""
    p = run.dir / METRICS_FILE
    if not p.is_file():
        return {}
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    split = doc.get("evaluated_split")
    if not isinstance(split, str) or not isinstance(doc.get(split), dict):
        split = "val"
    metrics = doc.get(split, {})
    metrics = metrics.get("metrics", {}) if isinstance(metrics, dict) else {}
    out: dict = {}
    for k in ("sensitivity", "specificity"):
        v = metrics.get(k) if isinstance(metrics, dict) else None
        v = v.get("value") if isinstance(v, dict) else v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    if out:
        out["split"] = split
    return out
