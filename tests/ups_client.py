"""An external UPS client (IHE AIW-I Task Requester / Watcher / Performer) for the gateway's worklist tests: a
separate process, driven by JSON lines on stdin, one JSON line answered on stdout per command. It only uses
pynetdicom (no medlens import): it is what a worklist client elsewhere would be.

    python tests/ups_client.py CALLING_AET GATEWAY_AET HOST PORT EVENT_PORT

It listens on EVENT_PORT for the gateway's N-EVENT-REPORTs (UPS Event SOP Class) and keeps them in order.
Commands (``op``): create, find, get, state, set, cancel, subscribe, unsubscribe, events, quit; each answer has
``status`` (the DIMSE status, or null when no answer came back).
"""

from __future__ import annotations

import json
import logging
import sys
import threading

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, evt

PUSH, WATCH, PULL, EVENT, QUERY = (f"1.2.840.10008.5.1.4.34.6.{i}" for i in range(1, 6))
GLOBAL = "1.2.840.10008.5.1.4.34.5"

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


class Client:
    def __init__(self, aet: str, gw_aet: str, host: str, port: int, event_port: int) -> None:
        self.aet, self.gw_aet, self.host, self.port = aet, gw_aet, host, port
        self.events: list[dict] = []
        self.lock = threading.Lock()
        listener = AE(ae_title=aet)
        listener.add_supported_context(EVENT)
        server = listener.start_server(("127.0.0.1", event_port), block=False,
                                       evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.on_event)])
        assert server is not None
        self.server = server
        self.ae = AE(ae_title=aet)
        for c in (PUSH, WATCH, PULL, QUERY):
            self.ae.add_requested_context(c)

    def on_event(self, event):
        info = event.event_information
        with self.lock:
            self.events.append({"uid": str(event.request.AffectedSOPInstanceUID),
                                "type": int(event.event_type),
                                "state": str(info.get("ProcedureStepState", "")),
                                "reason": str(info.get("ReasonForCancellation", "")),
                                "calling": str(event.assoc.requestor.ae_title).strip()})
        return 0x0000, None

    def assoc(self):
        a = self.ae.associate(self.host, self.port, ae_title=self.gw_aet)
        if not a.is_established:
            raise ConnectionError("association rejected")
        return a

    @staticmethod
    def code(status) -> int | None:
        return int(status.Status) if status is not None and "Status" in status else None

    def run(self, cmd: dict) -> dict:
        op = cmd["op"]
        if op == "events":
            with self.lock:
                return {"events": list(self.events)}
        a = self.assoc()
        try:
            return getattr(self, "op_" + op)(a, cmd)
        finally:
            a.release()

    def op_create(self, a, cmd) -> dict:
        ds = Dataset()
        ds.ProcedureStepState = cmd.get("state", "SCHEDULED")
        ds.ScheduledProcedureStepPriority = cmd.get("priority", "HIGH")
        ds.ProcedureStepLabel = "AI triage"
        ds.WorklistLabel = "AI"
        ds.InputReadinessState = "INCOMPLETE"
        ds.PatientName, ds.PatientID = "", ""
        if cmd.get("txn"):
            ds.TransactionUID = cmd["txn"]
        items = []
        for study, series, refs in cmd.get("inputs", []):
            item = Dataset()
            item.TypeOfInstances = "DICOM"
            item.StudyInstanceUID, item.SeriesInstanceUID = study, series
            sops = []
            for cls, sop in refs:
                r = Dataset()
                r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = cls, sop
                sops.append(r)
            item.ReferencedSOPSequence = Sequence(sops)
            items.append(item)
        if items:
            ds.InputInformationSequence = Sequence(items)
        status, _ = a.send_n_create(ds, PUSH, cmd["uid"])
        return {"status": self.code(status)}

    def op_find(self, a, cmd) -> dict:
        q = Dataset()
        q.SOPInstanceUID = cmd.get("uid", "")
        q.ProcedureStepState = cmd.get("state", "")
        q.ProcedureStepLabel = ""
        q.TransactionUID = ""
        q.InputInformationSequence = Sequence()
        out, final = [], None
        for status, ident in a.send_c_find(q, PULL):
            final = self.code(status)
            if ident is not None and final in (0xFF00, 0xFF01):
                out.append({"uid": str(ident.SOPInstanceUID), "state": str(ident.get("ProcedureStepState", "")),
                            "has_txn": bool(ident.get("TransactionUID")),
                            "series": [str(i.SeriesInstanceUID) for i in ident.get("InputInformationSequence", [])]})
        return {"status": final, "matches": out}

    def op_get(self, a, cmd) -> dict:
        status, ds = a.send_n_get([], PULL, cmd["uid"])
        if ds is None:
            return {"status": self.code(status)}
        progress = ds.get("ProcedureStepProgressInformationSequence") or [Dataset()]
        performed = ds.get("UnifiedProcedureStepPerformedProcedureSequence") or []
        outputs = [[str(i.StudyInstanceUID), str(i.SeriesInstanceUID),
                    [[str(r.ReferencedSOPClassUID), str(r.ReferencedSOPInstanceUID)] for r in i.ReferencedSOPSequence]]
                   for p in performed for i in p.get("OutputInformationSequence", [])]
        inputs = [str(i.SeriesInstanceUID) for i in ds.get("InputInformationSequence", [])]
        return {"status": self.code(status), "state": str(ds.get("ProcedureStepState", "")),
                "reason": str(progress[0].get("ReasonForCancellation", "")), "outputs": outputs, "inputs": inputs,
                "has_txn": "TransactionUID" in ds, "patient": str(ds.get("PatientID", ""))}

    def op_state(self, a, cmd) -> dict:
        info = Dataset()
        info.ProcedureStepState = cmd["state"]
        info.TransactionUID = cmd["txn"]
        status, _ = a.send_n_action(info, 1, PULL, cmd["uid"])
        return {"status": self.code(status)}

    def op_set(self, a, cmd) -> dict:
        mods = Dataset()
        if cmd.get("txn"):
            mods.TransactionUID = cmd["txn"]
        for k, v in cmd.get("values", {}).items():
            setattr(mods, k, v)
        if cmd.get("performed"):
            p = Dataset()
            p.PerformedProcedureStepEndDateTime = "20260101120000"
            p.OutputInformationSequence = Sequence()
            mods.UnifiedProcedureStepPerformedProcedureSequence = Sequence([p])
        status, _ = a.send_n_set(mods, PULL, cmd["uid"])
        return {"status": self.code(status)}

    def op_cancel(self, a, cmd) -> dict:
        info = Dataset()
        info.ReasonForCancellation = cmd.get("reason", "")
        status, _ = a.send_n_action(info, 2, PUSH, cmd["uid"])
        return {"status": self.code(status)}

    def op_subscribe(self, a, cmd) -> dict:
        info = Dataset()
        info.ReceivingAE = cmd.get("aet", self.aet)
        info.DeletionLock = "FALSE"
        status, _ = a.send_n_action(info, 3, WATCH, cmd.get("uid", GLOBAL))
        return {"status": self.code(status)}

    def op_unsubscribe(self, a, cmd) -> dict:
        info = Dataset()
        info.ReceivingAE = self.aet
        status, _ = a.send_n_action(info, 4, WATCH, cmd.get("uid", GLOBAL))
        return {"status": self.code(status)}


def main() -> None:
    aet, gw_aet, host, port, event_port = sys.argv[1:6]
    client = Client(aet, gw_aet, host, int(port), int(event_port))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            answer = client.run(cmd)
        except Exception as e:  # the test sees it and fails with it
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)
    client.server.shutdown()


if __name__ == "__main__":
    main()
