"""PACS access: DICOMweb (QIDO-RS query, WADO-RS retrieve, STOW-RS store) with ``dicomweb-client``, and DIMSE
(C-FIND, C-GET, C-STORE) with ``pynetdicom`` as the fallback for a PACS without DICOMweb.

A PACS is named by a URL: ``http(s)://host:port/dicom-web`` (DICOMweb root) or ``dimse://AET@host:port``.
Errors are one line naming the PACS and the problem (unreachable, study not found, store refused); they never
carry a patient's name or ID, and query results here keep only non-identifying study and series attributes.
A pulled study is written into a folder that appears only when complete.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from medlens.errors import DataError
from medlens.utils import atomic_dir

STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "StudyDescription",
                "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_FIELDS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                 "NumberOfSeriesRelatedInstances")


class PacsError(DataError):
    """A PACS that cannot be reached, lacks what was asked for, or refuses a store."""


def connect(url: str, calling_aet: str = "MEDLENS", timeout: float = 30.0):
    """A client for the PACS at ``url`` (DICOMweb root URL, or ``dimse://AET@host:port``)."""
    u = urlparse(url)
    if u.scheme in ("http", "https") and u.hostname:
        return DicomWeb(url, timeout)
    if u.scheme == "dimse" and u.hostname and u.port:
        return Dimse(u.username or "ANY-SCP", u.hostname, u.port, calling_aet, timeout)
    raise PacsError("not a PACS URL: give a DICOMweb root (http://host:port/dicom-web) or dimse://AET@host:port", url)


def _row(ds_or_json, fields) -> dict:
    """The listed attributes of a QIDO JSON result or a C-FIND identifier, as plain strings."""
    from pydicom import Dataset

    ds = ds_or_json if isinstance(ds_or_json, Dataset) else Dataset.from_json(ds_or_json)
    out = {}
    for f in fields:
        v = ds.get(f)
        if v is not None and v != "":
            out[f] = "\\".join(map(str, v)) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" \
                else str(v)
    return out


def write_study(datasets: list, dest: str | Path) -> Path:
    """Instances into the new folder ``dest`` as ``<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (UIDs only)."""
    dest = Path(dest)
    with atomic_dir(dest) as work:
        for ds in datasets:
            folder = work / str(ds.SeriesInstanceUID)
            folder.mkdir(exist_ok=True)
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return dest


def read_instances(paths: list[str | Path]) -> list:
    """DICOM files (or every file under folders) to store; a non-DICOM file is a one-line error."""
    import pydicom

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
    timeout: float = 30.0

    def _client(self):
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(url=self.url.rstrip("/"))

    def _call(self, what: str, fn, *args, **kw):
        import requests

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fn(*args, **kw)
        except requests.exceptions.ConnectionError:
            raise PacsError(f"PACS unreachable ({what}: connection refused or no route)", self.url) from None
        except requests.exceptions.Timeout:
            raise PacsError(f"PACS did not answer in time ({what})", self.url) from None
        except requests.exceptions.HTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            raise PacsError(f"PACS refused {what} (HTTP {code})", self.url) from None
        except requests.exceptions.RequestException as e:
            raise PacsError(f"PACS request failed ({what}: {type(e).__name__})", self.url) from None

    def query(self, study_uid: str | None = None, modality: str | None = None, limit: int = 100) -> list[dict]:
        filters = {}
        if study_uid:
            filters["StudyInstanceUID"] = study_uid
        if modality:
            filters["ModalitiesInStudy"] = modality
        res = self._call("the study query (QIDO-RS)", self._client().search_for_studies, fields=list(STUDY_FIELDS),
                         search_filters=filters, limit=limit)
        return [_row(r, STUDY_FIELDS) for r in res]

    def series(self, study_uid: str) -> list[dict]:
        res = self._call("the series query (QIDO-RS)", self._client().search_for_series, study_instance_uid=study_uid,
                         fields=list(SERIES_FIELDS))
        return [_row(r, SERIES_FIELDS) for r in res]

    def instances(self, study_uid: str, series_uid: str | None = None) -> list[dict]:
        fields = ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "Modality")
        res = self._call("the instance query (QIDO-RS)", self._client().search_for_instances,
                         study_instance_uid=study_uid, series_instance_uid=series_uid, fields=list(fields))
        return [_row(r, fields) for r in res]

    def require_study(self, study_uid: str) -> list[dict]:
        series = self.series(study_uid)
        if not series:
            raise PacsError(f"the PACS has no study {study_uid}", self.url)
        return series

    def retrieve(self, study_uid: str, series_uid: str | None = None) -> list:
        self.require_study(study_uid)
        c = self._client()
        if series_uid:
            return self._call("the series retrieve (WADO-RS)", c.retrieve_series, study_uid, series_uid)
        return self._call("the study retrieve (WADO-RS)", c.retrieve_study, study_uid)

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str):
        return self._call("the instance retrieve (WADO-RS)", self._client().retrieve_instance, study_uid, series_uid,
                          sop_uid)

    def pull(self, study_uid: str, dest: str | Path, series_uid: str | None = None) -> Path:
        return write_study(self.retrieve(study_uid, series_uid), dest)

    def push(self, datasets: list) -> int:
        """STOW-RS; the number of instances the PACS stored (a refused one is an error)."""
        resp = self._call("the store (STOW-RS)", self._client().store_instances, datasets)
        failed = resp.get("FailedSOPSequence") if resp is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise PacsError(f"PACS refused {len(failed)} of {len(datasets)} instance(s) (failure reason {reason})",
                            self.url)
        return len(datasets)


@dataclass
class Dimse:
    """DIMSE fallback: C-FIND (study root), C-GET (retrieve on the same association), C-STORE."""

    called_aet: str
    host: str
    port: int
    calling_aet: str = "MEDLENS"
    timeout: float = 30.0

    @property
    def url(self) -> str:
        return f"dimse://{self.called_aet}@{self.host}:{self.port}"

    def _assoc(self, contexts, roles=None):
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for c in contexts:
            ae.add_requested_context(c)
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.called_aet, ext_neg=roles or [])
        except (OSError, RuntimeError, ValueError):
            assoc = None
        if assoc is None or not assoc.is_established:
            raise PacsError("PACS unreachable (DIMSE association refused or no answer)", self.url)
        return assoc

    def _find(self, level: str, query) -> list:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        query.QueryRetrieveLevel = level
        assoc = self._assoc([StudyRootQueryRetrieveInformationModelFind])
        try:
            out = []
            for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if status is None:
                    raise PacsError("PACS closed the association during C-FIND", self.url)
                if status.Status in (0xFF00, 0xFF01) and ident is not None:
                    out.append(ident)
                elif status.Status not in (0x0000, 0xFF00, 0xFF01):
                    raise PacsError(f"PACS refused C-FIND (status 0x{status.Status:04X})", self.url)
            return out
        finally:
            assoc.release()

    def query(self, study_uid: str | None = None, modality: str | None = None, limit: int = 100) -> list[dict]:
        from pydicom import Dataset

        q = Dataset()
        for f in STUDY_FIELDS:
            setattr(q, f, "")
        if study_uid:
            q.StudyInstanceUID = study_uid
        if modality:
            q.ModalitiesInStudy = modality
        return [_row(r, STUDY_FIELDS) for r in self._find("STUDY", q)][:limit]

    def series(self, study_uid: str) -> list[dict]:
        from pydicom import Dataset

        q = Dataset()
        for f in SERIES_FIELDS:
            setattr(q, f, "")
        q.StudyInstanceUID = study_uid
        return [_row(r, SERIES_FIELDS) for r in self._find("SERIES", q)]

    def require_study(self, study_uid: str) -> list[dict]:
        series = self.series(study_uid)
        if not series:
            raise PacsError(f"the PACS has no study {study_uid}", self.url)
        return series

    def retrieve(self, study_uid: str, series_uid: str | None = None) -> list:
        from pydicom import Dataset
        from pynetdicom import StoragePresentationContexts, build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

        self.require_study(study_uid)
        got: list = []

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            got.append(ds)
            return 0x0000

        contexts = [StudyRootQueryRetrieveInformationModelGet] + [c.abstract_syntax for c in
                                                                   StoragePresentationContexts[:120]]
        roles = [build_role(c.abstract_syntax, scp_role=True) for c in StoragePresentationContexts[:120]]
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for c in contexts:
            ae.add_requested_context(c)
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.called_aet, ext_neg=roles,
                                 evt_handlers=[(evt.EVT_C_STORE, on_store)])
        except (OSError, RuntimeError, ValueError):
            assoc = None
        if assoc is None or not assoc.is_established:
            raise PacsError("PACS unreachable (DIMSE association refused or no answer)", self.url)
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
        q.StudyInstanceUID = study_uid
        if series_uid:
            q.SeriesInstanceUID = series_uid
        try:
            last = None
            for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
                if status is None:
                    raise PacsError("PACS closed the association during C-GET", self.url)
                last = status.Status
            if last not in (0x0000, None):
                raise PacsError(f"C-GET ended with status 0x{last:04X} ({len(got)} instance(s) received)", self.url)
        finally:
            assoc.release()
        return got

    def pull(self, study_uid: str, dest: str | Path, series_uid: str | None = None) -> Path:
        return write_study(self.retrieve(study_uid, series_uid), dest)

    def push(self, datasets: list) -> int:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        contexts = sorted({str(ds.SOPClassUID) for ds in datasets})
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for c in contexts:
            ae.add_requested_context(c, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.called_aet)
        except (OSError, RuntimeError, ValueError):
            assoc = None
        if assoc is None or not assoc.is_established:
            raise PacsError("PACS unreachable (DIMSE association refused or no answer)", self.url)
        try:
            for ds in datasets:
                st = assoc.send_c_store(ds)
                if st is None or st.Status not in (0x0000, 0xB000, 0xB007, 0xB006):
                    code = "no answer" if st is None else f"status 0x{st.Status:04X}"
                    raise PacsError(f"PACS refused C-STORE ({code})", self.url)
        finally:
            assoc.release()
        return len(datasets)
