"""A run's operating point: sensitivity and specificity at its validation-chosen threshold.

Read from the run's ``metrics.json`` (written by ``train``/``evaluate``); DICOM SR results carry it
(``predict --outputs sr``, ``serve ?format=dicom-sr``). A run without the file, or with one that does not
parse, has no recorded operating point (an empty dict), never an error.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medlens.run.run import Run

METRICS_FILE = "metrics.json"


def operating_point(run: Run) -> dict[str, float]:
    """Sensitivity and specificity at the threshold on validation, from the run's metrics.json."""
    p = run.dir / METRICS_FILE
    if not p.is_file():
        return {}
    try:
        val = json.loads(p.read_text(encoding="utf-8")).get("val", {}).get("metrics", {})
    except ValueError:
        return {}
    out = {}
    for k in ("sensitivity", "specificity"):
        v = val.get(k)
        v = v.get("value") if isinstance(v, dict) else v
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return out
