"""Report sections of a run folder, kept as data (``report_sections/<kind>.json``).

A section is ``{"kind", "title", "data"}``; the report renders each known kind with its own
autoescaping template (``report/templates/sections/<kind>.html``). Nothing in a section is markup, so
class names, file names or a hand-edited JSON can never inject HTML into the report.
"""

from __future__ import annotations

import json
from pathlib import Path

from medlens.utils import write_json_atomic

SECTION_DIR = "report_sections"
KINDS = ("explanations", "segmentation", "anomaly", "federated")


def write_section(run_dir: str | Path, kind: str, title: str, data: dict) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown report section kind '{kind}'")
    return write_json_atomic(Path(run_dir) / SECTION_DIR / f"{kind}.json", {"kind": kind, "title": title, "data": data})


def read_sections(run_dir: str | Path) -> tuple[list[dict], list[str]]:
    """(sections of known kinds, in ``KINDS`` order; names of files that were skipped and why)."""
    folder = Path(run_dir) / SECTION_DIR
    found, skipped = {}, []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            s = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            skipped.append(f"{f.name} (not JSON)")
            continue
        if not isinstance(s, dict) or s.get("kind") not in KINDS or not isinstance(s.get("data"), dict):
            skipped.append(f"{f.name} (not a medlens section)")
            continue
        found[s["kind"]] = {"kind": s["kind"], "title": str(s.get("title", s["kind"])), "data": s["data"]}
    return [found[k] for k in KINDS if k in found], skipped
