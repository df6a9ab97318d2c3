"""``medlens fhir`` and ``medlens pacs query|pull|push``: results to the EHR and images to and from a PACS."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from medlens.cli.common import console

ALLOW_HTTP_HELP = ("allow plain http:// (or DIMSE, which is not encrypted) to a host other than this machine; "
                   "patient data then crosses the network unencrypted")

pacs_app = typer.Typer(help="A PACS over DICOMweb (QIDO/WADO/STOW-RS) or DIMSE (dimse://AET@host:port).",
                       no_args_is_help=True)


@pacs_app.command("query")
def pacs_query(url: str = typer.Argument(..., help="DICOMweb root (http://host:port/dicom-web) or dimse://AET@host:port"),
               study: Optional[str] = typer.Option(None, "--study", help="a Study Instance UID: list its series"),
               modality: Optional[str] = typer.Option(None, "--modality", help="only studies with this modality"),
               limit: int = typer.Option(100, "--limit", min=1),
               allow_http: bool = typer.Option(False, "--allow-http", help=ALLOW_HTTP_HELP)) -> None:
    """List studies (or the series of one study); only UIDs, dates, modalities and counts are shown."""
    from medlens.io.pacs import connect

    client = connect(url, allow_http=allow_http)
    if study:
        rows = client.require_study(study)
        cols = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances")
    else:
        rows = client.query(modality=modality, limit=limit)
        cols = ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances")
    from medlens.io.net import shown_url

    t = Table(title=f"{len(rows)} {'series' if study else 'studies'} at {shown_url(url)}")
    for c in cols:
        t.add_column(c.replace("NumberOf", "").replace("Related", " "))
    for r in rows:
        t.add_row(*(r.get(c, "") for c in cols))
    console.print(t)


@pacs_app.command("pull")
def pacs_pull(url: str = typer.Argument(..., help="DICOMweb root or dimse://AET@host:port"),
              study: str = typer.Option(..., "--study", help="Study Instance UID"),
              out: Path = typer.Option(..., "--out", help="new folder for the study (<series UID>/<SOP UID>.dcm)"),
              series: Optional[str] = typer.Option(None, "--series", help="only this Series Instance UID"),
              allow_http: bool = typer.Option(False, "--allow-http", help=ALLOW_HTTP_HELP)) -> None:
    """Retrieve a study (WADO-RS, or C-GET) into a new folder; each instance is named by its UIDs, which must
    be valid DICOM UIDs of the study asked for (anything else stops the pull and nothing is written)."""
    from medlens.io.pacs import connect

    dest = connect(url, allow_http=allow_http).pull(study, out, series)
    n = sum(1 for p in dest.rglob("*.dcm"))
    console.print(f"[green]pulled[/] {n} instance(s) -> {dest}")


@pacs_app.command("push")
def pacs_push(url: str = typer.Argument(..., help="DICOMweb root or dimse://AET@host:port"),
              files: List[Path] = typer.Argument(..., help="DICOM files or folders"),
              allow_http: bool = typer.Option(False, "--allow-http", help=ALLOW_HTTP_HELP)) -> None:
    """Store DICOM files (STOW-RS, or C-STORE)."""
    from medlens.io.net import shown_url
    from medlens.io.pacs import connect, read_instances

    client = connect(url, allow_http=allow_http)  # the URL is checked before any file is read
    paths: list[str | Path] = list(files)
    n = client.push(read_instances(paths))
    console.print(f"[green]stored[/] {n} instance(s) at {shown_url(url)}")


def fhir(sr: Path = typer.Argument(..., help="a DICOM SR (TID 1500 measurement report)"),
         out: Optional[Path] = typer.Option(None, "-o", "--out", help="Bundle JSON to write"),
         post: Optional[str] = typer.Option(None, "--post", help="FHIR server base URL: POST the transaction "
                                            "(https://, or http:// on this machine; redirects are refused)"),
         allow_http: bool = typer.Option(False, "--allow-http", help=ALLOW_HTTP_HELP)) -> None:
    """Convert a TID 1500 SR to a FHIR R5 transaction Bundle (HL7 SR-to-FHIR mapping); optionally POST it."""
    from medlens.errors import MedlensError
    from medlens.io.net import check_http_url, shown_url
    from medlens.report.dicom_sr import read_tid1500
    from medlens.report.fhir import post_bundle, sr_to_bundle
    from medlens.utils import write_text_atomic

    if out is None and post is None:
        raise MedlensError("give -o bundle.json, --post URL, or both")
    if post is not None:
        check_http_url(post, allow_http, "FHIR server")  # before anything is read or written
    bundle = sr_to_bundle(read_tid1500(sr))
    n = len(bundle.entry or [])
    if out is not None:
        write_text_atomic(out, bundle.model_dump_json(indent=2, exclude_none=True))
        console.print(f"[green]wrote[/] {out}: a transaction Bundle of {n} resources")
    if post is not None:
        reply = post_bundle(bundle, post, allow_http=allow_http)
        ok = sum(1 for e in reply.get("entry", []) if str(e.get("response", {}).get("status", "")).startswith("2"))
        console.print(f"[green]posted[/] {n} resources to {shown_url(post)} ({ok} created or matched)")
