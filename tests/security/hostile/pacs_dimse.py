"""A hostile DIMSE PACS (C-FIND and C-GET SCP, pynetdicom) for the security tests; a real process on
127.0.0.1, stopped by PID by the test.

    python pacs_dimse.py PORT MODE STUDY_UID SRC_FOLDER [VICTIM]

C-FIND answers that the study has one CT series; C-GET sends the first three DICOM files of SRC_FOLDER moved
into STUDY_UID. MODE ``good`` keeps valid UIDs; ``traverse`` gives the first instance SeriesInstanceUID ``..``
and the SOPInstanceUID of VICTIM's stem; ``absolute`` gives it the SOPInstanceUID VICTIM without ``.dcm``.
The process exits on its own after 300 s.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from pathlib import Path

import pydicom
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

PORT, MODE, STUDY, SRC = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
VICTIM = Path(sys.argv[5]) if len(sys.argv) > 5 else None
SERIES = STUDY + ".1"
warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs this server means to send


def instances() -> list[Dataset]:
    out = []
    for i, f in enumerate(sorted(SRC.rglob("*.dcm"))[:3]):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
        ds.SOPInstanceUID = f"{SERIES}.{i + 1}"
        if i == 0 and MODE == "traverse":
            ds.SeriesInstanceUID, ds.SOPInstanceUID = "..", VICTIM.stem
        if i == 0 and MODE == "absolute":
            ds.SOPInstanceUID = str(VICTIM.with_suffix(""))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


DATASETS = instances()


def on_find(event):
    if str(event.identifier.get("StudyInstanceUID", "")) != STUDY:
        return
    row = Dataset()
    row.QueryRetrieveLevel = event.identifier.QueryRetrieveLevel
    row.StudyInstanceUID, row.SeriesInstanceUID, row.Modality = STUDY, SERIES, "CT"
    yield 0xFF00, row


def on_get(event):
    yield len(DATASETS)
    for ds in DATASETS:
        yield 0xFF00, ds


ae = AE(ae_title="HOSTILE")
ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
server = ae.start_server(("127.0.0.1", PORT), block=False,
                         evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)])
threading.Timer(300, server.shutdown).start()
while server.socket is not None and server.socket.fileno() != -1:
    time.sleep(0.5)
