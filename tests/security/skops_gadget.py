"""Forge a ``model.skops`` that runs code when a trusting loader opens it (shared by the security tests)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import skops.io as sio

GADGET = "numpy.testing._private.utils.runstring"  # calls exec(code, namespace)


def forge(model_file: Path, sentinel: Path) -> None:
    """Add an attribute to the saved estimator whose loader calls ``runstring(code, {})``: the code writes
    ``sentinel``. A loader that trusts every ``numpy.*`` type executes it while loading."""
    code = f"open({str(sentinel)!r}, 'w').write('code ran')"
    payload = json.loads(zipfile.ZipFile(io.BytesIO(sio.dumps((code, {})))).read("schema.json"))
    payload.pop("protocol"), payload.pop("_skops_version")
    node = {"__class__": "runstring", "__module__": "numpy.testing._private.utils",
            "__loader__": "ConstructorFromReduceNode", "content": payload, "__id__": 1}
    src = zipfile.ZipFile(model_file)
    schema = json.loads(src.read("schema.json"))
    attrs = schema["content"]  # the estimator's attribute dict: every key needs its key type
    attrs["content"]["probe_"] = node
    attrs["key_types"]["content"].append(dict(attrs["key_types"]["content"][0]))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for name in src.namelist():
            out.writestr(name, json.dumps(schema) if name == "schema.json" else src.read(name))
    src.close()
    Path(model_file).write_bytes(buf.getvalue())
