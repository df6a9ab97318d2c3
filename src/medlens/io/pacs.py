"""PACS access: DICOMweb (QIDO-RS query, WADO-RS retrieve, STOW-RS store) with ``dicomweb-client``, and DIMSE
(C-FIND, C-GET, C-STORE) with ``pynetdicom`` as the fallback for a PACS without DICOMweb.

A PACS is named by a URL: ``http(s)://host:port/dicom-web`` (DICOMweb root) or ``dimse://AET@host:port``.
Errors are one line naming the PACS and the problem (unreachable, study not found, store refused); they never
carry a patient's name or ID, and query results here keep only non-identifying study and series attributes.

The PACS is not trusted (``medlens.io.net``): no redirect is followed, unencrypted ``http://`` or DIMSE to
another host needs ``allow_http``, every connection has timeouts, and a retrieved study is streamed to disk
against a byte limit. Each instance is written as ``<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` only when both
are valid DICOM UIDs of the study asked for (and the path stays inside the folder); any other instance stops
the pull with one line naming the value, and the folder, which appears only when complete, is not written.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import overload
from urllib.parse import urlparse

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # pynetdicom writes its SOP classes into globals() at import: no checker sees them
    StudyRootQueryRetrieveInformationModelFind,  # pyright: ignore[reportAttributeAccessIssue]
    StudyRootQueryRetrieveInformationModelGet,  # pyright: ignore[reportAttributeAccessIssue]
)
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from medlens.errors import ConfigError, DataError, MedlensError
from medlens.io import net
from medlens.utils import atomic_dir

STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "StudyDescription",
                "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_FIELDS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                 "NumberOfSeriesRelatedInstances")
#: the UIDs read from each retrieved instance (nothing else of it is decoded here)
_UID_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]


class PacsError(DataError):
    """A PACS that cannot be reached, lacks what was asked for, refuses a store, or sends what cannot be kept."""


def connect(url: str, calling_aet: str = "MEDLENS", timeout: float | None = None, allow_http: bool = False):
    """A client for the PACS at ``url`` (DICOMweb root URL, or ``dimse://AET@host:port``).

    ``timeout`` (seconds) is the read timeout (default ``MEDLENS_NET_TIMEOUT``); ``allow_http`` permits plain
    ``http://`` or DIMSE to a host other than this machine."""
    u = urlparse(url)
    try:
        port = u.port
    except ValueError:
        raise PacsError("the port is not a number from 0 to 65535", net.shown_url(url)) from None
    if u.scheme in ("http", "https") and u.hostname:
        net.check_http_url(url, allow_http, "PACS")
        return DicomWeb(url, timeout)
    if u.scheme == "dimse" and u.hostname and port:
        net.require_encrypted(url, u.hostname, "dimse", allow_http, "PACS")
        return Dimse(u.username or "ANY-SCP", u.hostname, port, calling_aet, timeout)
    raise PacsError("not a PACS URL: give a DICOMweb root (https://host:port/dicom-web) or dimse://AET@host:port",
                    net.shown_url(url))


def _timeouts(read: float | None) -> tuple[float, float]:
    connect, default = net.timeouts()
    return (connect, default) if read is None else (min(connect, read), read)


def _row(ds_or_json, fields) -> dict:
    """The listed attributes of a QIDO JSON result or a C-FIND identifier, as plain strings."""
    try:
        ds = ds_or_json if isinstance(ds_or_json, Dataset) else Dataset.from_json(ds_or_json)
    except (ValueError, TypeError, KeyError, AttributeError):
        raise PacsError("PACS sent a query result that is not DICOM JSON") from None
    out = {}
    for f in fields:
        v = ds.get(f)
        if v is not None and v != "":
            out[f] = "\\".join(map(str, v)) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" \
                else str(v)
    return out


@overload
def _require_uid(value: str, what: str) -> str: ...
@overload
def _require_uid(value: str | None, what: str) -> str | None: ...
def _require_uid(value: str | None, what: str) -> str | None:
    """A UID the user gave (it goes into a URL path or a query): valid or a one-line error."""
    if value is None:
        return None
    try:
        return net.uid_name(value, what)
    except DataError:
        raise ConfigError(f"{what} {net.shown_value(value)} is not a valid DICOM UID (digits and dots, at most "
                          "64 characters)") from None


class _Study:
    """Where the instances of one retrieve go: ``work/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, each checked
    (valid UIDs of the study and series asked for, inside ``work``, no instance twice) before it is kept."""

    def __init__(self, work: Path, study_uid: str, series_uid: str | None, source: str) -> None:
        self.work, self.study, self.series, self.source = Path(work), study_uid, series_uid, source
        self.count = 0

    def place(self, header) -> Path:
        src = self.source
        study = str(header.get("StudyInstanceUID", "") or "")
        if study != self.study:
            raise PacsError(f"PACS sent an instance of another study (StudyInstanceUID {net.shown_value(study)}, "
                            f"not {self.study}); nothing was written", src)
        series = net.uid_name(header.get("SeriesInstanceUID"), "the PACS's SeriesInstanceUID", src)
        if self.series and series != self.series:
            raise PacsError(f"PACS sent an instance of another series ({series}, not {self.series}); nothing was "
                            "written", src)
        sop = net.uid_name(header.get("SOPInstanceUID"), "the PACS's SOPInstanceUID", src)
        dest = net.confined(self.work, series, f"{sop}.dcm", source=src)
        if dest.exists():
            raise PacsError(f"PACS sent SOPInstanceUID {sop} twice; nothing was written", src)
        dest.parent.mkdir(exist_ok=True)
        self.count += 1
        return dest

    def keep_file(self, tmp: Path, part: int) -> Path:
        """A received file (``tmp``, inside ``work``) moved to its checked place; not DICOM is an error."""
        try:
            header = pydicom.dcmread(tmp, stop_before_pixels=True, specific_tags=_UID_TAGS)
        except Exception:  # pydicom raises several types for what is not a DICOM file
            raise PacsError(f"part {part} of the PACS reply is not a DICOM file; nothing was written",
                            self.source) from None
        dest = self.place(header)
        tmp.replace(dest)
        return dest

    def done(self) -> None:
        if not self.count:
            raise PacsError(f"the PACS sent no instance of study {self.study}"
                            + (f" series {self.series}" if self.series else ""), self.source)


def read_instances(paths: list[str | Path]) -> list:
    """DICOM files (or every file under folders) to store; a non-DICOM file is a one-line error."""
    files = []  # (path, named explicitly)
    for p in map(Path, paths):
        if p.is_dir():
            files += [(q, False) for q in sorted(p.rglob("*")) if q.is_file() and not q.name.startswith(".")]
        elif p.is_file():
            files.append((p, True))
        else:
            raise DataError("file not found", p)
    out = []
    for f, named in files:
        try:
            out.append(pydicom.dcmread(f))
        except Exception:  # pydicom raises several types for non-DICOM files
            if named:
                raise DataError("not a DICOM file; nothing was sent", f) from None
    if not out:
        raise DataError("no DICOM files to send", paths[0] if paths else None)
    return out


@dataclass
class DicomWeb:
    url: str
    timeout: float | None = None

    def _client(self):
        c = DICOMwebClient(url=self.url.rstrip("/"), session=net.session(), timeout=_timeouts(self.timeout))
        c.set_http_retry_params(retry=False)  # its retries would repeat each timeout five times
        return c

    @contextlib.contextmanager
    def _errors(self, what: str):
        """Network failures of ``what`` as one-line PacsErrors."""
        src = net.shown_url(self.url)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except net.RedirectRefused as e:
            raise PacsError(f"PACS answered {what} with a redirect (HTTP {e.status}); medlens follows no "
                            "redirect: give the PACS's own URL", src) from None
        except net.BodyTooLarge as e:
            raise PacsError(f"{what}: {e.describe()}" + ("; nothing was written" if "retrieve" in what else ""),
                            src) from None
        except requests.exceptions.Timeout:
            raise PacsError(f"PACS did not answer in time ({what}; {net.TIMEOUT_ENV}="
                            f"{_timeouts(self.timeout)[1]:g} s)", src) from None
        except requests.exceptions.ConnectionError as e:
            if "timed out" in str(e).lower():
                raise PacsError(f"PACS did not answer in time ({what}; {net.TIMEOUT_ENV}="
                                f"{_timeouts(self.timeout)[1]:g} s)", src) from None
            raise PacsError(f"PACS unreachable ({what}: connection refused, closed or no route)", src) from None
        except requests.exceptions.HTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            raise PacsError(f"PACS refused {what} (HTTP {code})", src) from None
        except requests.exceptions.RequestException as e:
            raise PacsError(f"PACS request failed ({what}: {type(e).__name__})", src) from None
        except MedlensError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise PacsError(f"PACS sent a malformed reply to {what} ({type(e).__name__})", src) from None

    def _call(self, what: str, fn, *args, **kw):
        with self._errors(what):
            return fn(*args, **kw)

    def query(self, study_uid: str | None = None, modality: str | None = None, limit: int = 100) -> list[dict]:
        filters = {}
        if study_uid:
            filters["StudyInstanceUID"] = _require_uid(study_uid, "--study")
        if modality:
            filters["ModalitiesInStudy"] = modality
        res = self._call("the study query (QIDO-RS)", self._client().search_for_studies, fields=list(STUDY_FIELDS),
                         search_filters=filters, limit=limit)
        return [_row(r, STUDY_FIELDS) for r in res]

    def series(self, study_uid: str) -> list[dict]:
        res = self._call("the series query (QIDO-RS)", self._client().search_for_series,
                         study_instance_uid=_require_uid(study_uid, "--study"), fields=list(SERIES_FIELDS))
        return [_row(r, SERIES_FIELDS) for r in res]

    def instances(self, study_uid: str, series_uid: str | None = None) -> list[dict]:
        fields = ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "Modality")
        res = self._call("the instance query (QIDO-RS)", self._client().search_for_instances,
                         study_instance_uid=_require_uid(study_uid, "--study"),
                         series_instance_uid=_require_uid(series_uid, "--series"), fields=list(fields))
        return [_row(r, fields) for r in res]

    def require_study(self, study_uid: str) -> list[dict]:
        series = self.series(study_uid)
        if not series:
            raise PacsError(f"the PACS has no study {study_uid}", net.shown_url(self.url))
        return series

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str):
        """One instance as a pydicom dataset (in memory, within ``MEDLENS_MAX_RESPONSE_BYTES``)."""
        return self._call("the instance retrieve (WADO-RS)", self._client().retrieve_instance,
                          _require_uid(study_uid, "--study"), _require_uid(series_uid, "--series"),
                          _require_uid(sop_uid, "SOPInstanceUID"))

    def _retrieve_to(self, st: _Study) -> None:
        """WADO-RS of the study (or series) streamed part by part to files in ``st.work`` and each part kept
        under its checked name: memory stays at one chunk, the body at ``MEDLENS_MAX_RETRIEVE_BYTES``."""
        what = "the series retrieve (WADO-RS)" if st.series else "the study retrieve (WADO-RS)"
        url = f"{self.url.rstrip('/')}/studies/{st.study}" + (f"/series/{st.series}" if st.series else "")
        limit, src = net.max_retrieve_bytes(), net.shown_url(self.url)
        cur: dict = {"file": None, "path": None, "n": 0}

        def begin():
            cur["n"] += 1
            cur["path"] = st.work / f".part-{cur['n']:06d}"
            cur["file"] = open(cur["path"], "xb")

        def data(buf, start, end):
            cur["file"].write(buf[start:end])

        def end():
            cur["file"].close()
            cur["file"] = None
            st.keep_file(cur["path"], cur["n"])

        with self._errors(what), net.session() as s:
            r = s.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}, stream=True,
                      timeout=_timeouts(self.timeout))
            try:
                if r.status_code >= 400:
                    raise PacsError(f"PACS refused {what} (HTTP {r.status_code})", src)
                ctype, opts = parse_options_header(r.headers.get("Content-Type", ""))
                if ctype != b"multipart/related" or not opts.get(b"boundary"):
                    raise PacsError(f"PACS answered {what} with {net.shown_value(ctype.decode('latin-1'))}, not "
                                    "multipart/related DICOM", src)
                declared = net.declared_length(r)
                if declared is not None and declared > limit:
                    raise net.BodyTooLarge(declared, limit, net.MAX_RETRIEVE_ENV)
                parser = MultipartParser(opts[b"boundary"], {"on_part_begin": begin, "on_part_data": data,
                                                             "on_part_end": end})
                total = 0
                try:
                    for chunk in r.iter_content(1 << 20):
                        total += len(chunk)
                        if total > limit:
                            raise net.BodyTooLarge(total, limit, net.MAX_RETRIEVE_ENV)
                        parser.write(chunk)
                    parser.finalize()
                except MultipartParseError:
                    raise PacsError(f"PACS sent a malformed multipart reply to {what}", src) from None
                if cur["file"] is not None:
                    raise PacsError(f"the PACS reply to {what} ended inside part {cur['n']} (truncated); nothing "
                                    "was written", src)
            finally:
                if cur["file"] is not None and not cur["file"].closed:
                    cur["file"].close()
                r.close()

    def pull(self, study_uid: str, dest: str | Path, series_uid: str | None = None) -> Path:
        study, series = _require_uid(study_uid, "--study"), _require_uid(series_uid, "--series")
        self.require_study(study)
        dest = Path(dest)
        with atomic_dir(dest) as work:
            st = _Study(work, study, series, net.shown_url(self.url))
            self._retrieve_to(st)
            st.done()
        return dest

    def push(self, datasets: list) -> int:
        """STOW-RS; the number of instances the PACS stored (a refused one is an error)."""
        resp = self._call("the store (STOW-RS)", self._client().store_instances, datasets)
        failed = resp.get("FailedSOPSequence") if resp is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise PacsError(f"PACS refused {len(failed)} of {len(datasets)} instance(s) (failure reason {reason})",
                            net.shown_url(self.url))
        return len(datasets)


@dataclass
class Dimse:
    """DIMSE fallback: C-FIND (study root), C-GET (retrieve on the same association), C-STORE."""

    called_aet: str
    host: str
    port: int
    calling_aet: str = "MEDLENS"
    timeout: float | None = None

    @property
    def url(self) -> str:
        return f"dimse://{self.called_aet}@{self.host}:{self.port}"

    def _ae(self):
        ae = AE(ae_title=self.calling_aet)
        connect, read = _timeouts(self.timeout)
        ae.connection_timeout = connect  # TCP connect
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = read  # association, each message, idle
        return ae

    def _associate(self, ae, **kw):
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.called_aet, **kw)
        except (OSError, RuntimeError, ValueError):
            assoc = None
        if assoc is None or not assoc.is_established:
            raise PacsError("PACS unreachable (DIMSE association refused or no answer within "
                            f"{_timeouts(self.timeout)[1]:g} s, {net.TIMEOUT_ENV})", self.url)
        return assoc

    def _assoc(self, contexts, roles=None):
        ae = self._ae()
        for c in contexts:
            ae.add_requested_context(c)
        return self._associate(ae, ext_neg=roles or [])

    def _find(self, level: str, query) -> list:
        query.QueryRetrieveLevel = level
        assoc = self._assoc([StudyRootQueryRetrieveInformationModelFind])
        try:
            out = []
            for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if status is None or "Status" not in status:
                    raise PacsError("PACS closed the association or did not answer during C-FIND", self.url)
                if status.Status in (0xFF00, 0xFF01) and ident is not None:
                    out.append(ident)
                elif status.Status not in (0x0000, 0xFF00, 0xFF01):
                    raise PacsError(f"PACS refused C-FIND (status 0x{status.Status:04X})", self.url)
            return out
        finally:
            assoc.release()

    def query(self, study_uid: str | None = None, modality: str | None = None, limit: int = 100) -> list[dict]:
        q = Dataset()
        for f in STUDY_FIELDS:
            setattr(q, f, "")
        if study_uid:
            q.StudyInstanceUID = _require_uid(study_uid, "--study")
        if modality:
            q.ModalitiesInStudy = modality
        return [_row(r, STUDY_FIELDS) for r in self._find("STUDY", q)][:limit]

    def series(self, study_uid: str) -> list[dict]:
        q = Dataset()
        for f in SERIES_FIELDS:
            setattr(q, f, "")
        q.StudyInstanceUID = _require_uid(study_uid, "--study")
        return [_row(r, SERIES_FIELDS) for r in self._find("SERIES", q)]

    def require_study(self, study_uid: str) -> list[dict]:
        series = self.series(study_uid)
        if not series:
            raise PacsError(f"the PACS has no study {study_uid}", self.url)
        return series

    def _retrieve_to(self, st: _Study) -> None:
        """C-GET into ``st.work``: each instance written (as received, with its file meta) under its checked
        name as it arrives; the first bad one stops the pull, and the total is held to
        ``MEDLENS_MAX_RETRIEVE_BYTES``."""
        limit = net.max_retrieve_bytes()
        state: dict = {"bytes": 0, "error": None}

        def on_store(event):
            if state["error"] is not None:
                return 0xA700  # refused: out of resources (the pull has already failed)
            try:
                state["bytes"] += len(event.request.DataSet.getvalue())
                if state["bytes"] > limit:
                    raise PacsError(f"C-GET: {net.BodyTooLarge(state['bytes'], limit, net.MAX_RETRIEVE_ENV).describe()}"
                                    "; nothing was written", self.url)
                dest = st.place(event.dataset)
                with open(dest, "xb") as f:
                    f.write(event.encoded_dataset(include_meta=True))
                return 0x0000
            except MedlensError as e:
                state["error"] = e
            except Exception as e:  # a dataset that cannot be decoded: the pull fails in one line
                state["error"] = PacsError(f"PACS sent an instance that cannot be read ({type(e).__name__}); "
                                           "nothing was written", self.url)
            return 0xA700

        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        storage = [c.abstract_syntax for c in StoragePresentationContexts[:120] if c.abstract_syntax is not None]
        for syntax in storage:
            ae.add_requested_context(syntax)
        roles = [build_role(syntax, scp_role=True) for syntax in storage]
        assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES" if st.series else "STUDY"
        q.StudyInstanceUID = st.study
        if st.series:
            q.SeriesInstanceUID = st.series
        try:
            last = None
            for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
                if state["error"] is not None:
                    break
                if status is None or "Status" not in status:
                    raise PacsError("PACS closed the association or did not answer during C-GET", self.url)
                last = status.Status
            if state["error"] is not None:
                raise state["error"]
            if last not in (0x0000, None):
                raise PacsError(f"C-GET ended with status 0x{last:04X} ({st.count} instance(s) received)", self.url)
        finally:
            if state["error"] is not None:
                assoc.abort()
            else:
                assoc.release()

    def pull(self, study_uid: str, dest: str | Path, series_uid: str | None = None) -> Path:
        study, series = _require_uid(study_uid, "--study"), _require_uid(series_uid, "--series")
        self.require_study(study)
        dest = Path(dest)
        with atomic_dir(dest) as work:
            st = _Study(work, study, series, self.url)
            self._retrieve_to(st)
            st.done()
        return dest

    def push(self, datasets: list) -> int:
        ae = self._ae()
        for c in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(c, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = self._associate(ae)
        try:
            for ds in datasets:
                st = assoc.send_c_store(ds)
                if st is None or "Status" not in st or st.Status not in (0x0000, 0xB000, 0xB007, 0xB006):
                    code = "no answer" if st is None or "Status" not in st else f"status 0x{st.Status:04X}"
                    raise PacsError(f"PACS refused C-STORE ({code})", self.url)
        finally:
            assoc.release()
        return len(datasets)
