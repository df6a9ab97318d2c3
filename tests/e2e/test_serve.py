"""``medlens serve`` as a real uvicorn process: the REST API, refusals, batching, logs, and the viewer in
headless Chromium (playwright driving Debian's /usr/bin/chromium)."""

from __future__ import annotations

import asyncio
import base64
import glob
import gzip
import io
import json
import re
import secrets
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from clirun import medlens as inproc
from servehelp import REPO, Server, tiny_run

pytestmark = pytest.mark.integration
KEY = "test-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def files(tmp_path_factory, data_root):
    """Real inputs: PneumoniaMNIST test PNGs, one LIDC CT slice, 12 contiguous slices of that series, an
    AdrenalMNIST3D volume and an MRI volume as NIfTI, and broken variants."""
    import nibabel as nib
    import pydicom
    from PIL import Image

    from medlens.io import load, save

    out = tmp_path_factory.mktemp("inputs")
    d = np.load(data_root / "medmnist" / "pneumoniamnist.npz")
    f = {"png": out / "pneu0.png", "png_phi": out / "Doe^John_1234567.png"}
    Image.fromarray(d["test_images"][0]).save(f["png"])
    Image.fromarray(d["test_images"][1]).save(f["png_phi"])
    dcm = sorted(glob.glob(str(data_root / "lidc-idri-0001" / "**" / "*.dcm"), recursive=True))
    by_z = sorted((float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]), p) for p in dcm)
    f["ct_slice"] = Path(by_z[80][1])
    f["series"] = [Path(p) for _, p in by_z[68:80]]
    ds = pydicom.dcmread(f["ct_slice"])
    del ds.PixelData
    f["no_pixels"] = out / "nopix.dcm"
    ds.save_as(f["no_pixels"])
    vol = np.load(data_root / "medmnist" / "adrenalmnist3d.npz")["test_images"][0]
    f["nifti3d"] = out / "adrenal.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.uint8), np.eye(4)), f["nifti3d"])
    f["two_channels"] = out / "two_channels.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([d["test_images"][0]] * 2, -1)[:, :, None, :].astype(np.uint8), np.eye(4)),
             f["two_channels"])
    f["mri"] = out / "breast1.nii.gz"
    save(load(data_root / "mri-seg" / "breast1_image.nrrd"), f["mri"])
    f["truncated"] = out / "truncated.png"
    f["truncated"].write_bytes(f["png"].read_bytes()[:60])
    f["text"] = out / "notes.png"
    f["text"].write_text("this is not an image\n" * 10)
    f["big"] = out / "big.png"
    f["big"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(9 * 1024 * 1024))
    return f


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """p2d: the shared PneumoniaMNIST run, exported (ONNX Runtime); a3d: a 3D classifier (PyTorch); unet3d: a
    3D U-Net (PyTorch). API keys on, small limits so the refusals can be provoked; --allow-out-of-profile, so that
    the CT inputs the X-ray and adrenal models were not trained on are answered with the reasons (the refusal
    without the flag: tests/integration/test_out_of_profile.py)."""
    from medlens.workflow.export import export_run

    base = tmp_path_factory.mktemp("served")
    p2d = base / "p2d"
    shutil.copytree(trained_run, p2d)
    export_run(p2d, "onnx", n_parity=16)
    a3d = shutil.copytree(tiny_run("a3d", tmp_path_factory), base / "a3d")
    shutil.rmtree(a3d / "export", ignore_errors=True)   # PyTorch backend for this one
    unet = shutil.copytree(tiny_run("unet3d", tmp_path_factory), base / "unet3d")
    shutil.rmtree(unet / "export", ignore_errors=True)
    s = Server([p2d, a3d, unet], base / "server.log", "--max-upload-mb", "8", "--max-queue", "4",
               "--max-wait-ms", "50", "--allow-out-of-profile", env={"MEDLENS_API_KEYS": KEY})
    s.runs = {"p2d": p2d, "a3d": a3d, "unet3d": unet}
    yield s
    s.stop()
    assert not s.alive()


def _client(server, key=KEY):
    import httpx

    return httpx.Client(base_url=server.url, headers={"X-API-Key": key} if key else {}, timeout=120)


def _post(c, model, paths, endpoint="predict", **params):
    parts = [("file", (Path(p).name, Path(p).read_bytes(), "application/octet-stream")) for p in paths]
    return c.post(f"/v1/models/{model}/{endpoint}", files=parts, params=params)


def _nifti(b64: str):
    import nibabel as nib

    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(b64)))


def test_models_health_docs_and_metrics(server):
    from medlens.run import Run

    with _client(server) as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert set(models) == {"p2d", "a3d", "unet3d"}
        assert models["p2d"]["backend"] == "onnxruntime" and models["a3d"]["backend"] == "pytorch"
        meta = Run.open(server.runs["p2d"]).meta
        assert models["p2d"]["classes"] == meta.class_names
        assert models["p2d"]["operating_point"]["threshold"] == pytest.approx(meta.threshold.value)
        assert models["p2d"]["input_spec"]["size"] == [28, 28] and models["a3d"]["spatial_dims"] == 3
        assert models["unet3d"]["task"] == "segmentation"
        spec = c.get("/openapi.json").json()
        assert "/v1/models/{name}/predict" in spec["paths"] and "/v1/models/{name}/segment" in spec["paths"]
        assert c.get("/docs").status_code == 404     # no Swagger UI: it would load from a CDN (issue 25)
        metrics = c.get("/metrics")
        assert metrics.status_code == 200 and "medlens_requests_total" in metrics.text
    with _client(server, key=None) as anon:
        assert anon.get("/healthz").json() == {"status": "ok"}
        assert anon.get("/readyz").json()["status"] == "ready"
        assert anon.get("/metrics").status_code == 401


def test_predict_png_dicom_series_and_nifti(server, files):
    from PIL import Image

    from medlens.run import Predictor, Run

    with _client(server) as c:
        r = _post(c, "p2d", [files["png"]])
        assert r.status_code == 200, r.text
        a = r.json()
        ref = Predictor(Run.open(server.runs["p2d"])).predict_files([str(files["png"])])[0]   # PyTorch
        assert abs(a["probabilities"]["pneumonia"] - ref.probabilities["pneumonia"]) < 1e-4
        assert sum(a["probabilities"].values()) == pytest.approx(1.0)
        p, t = a["probabilities"]["pneumonia"], a["threshold"]
        assert a["prediction"] == ("pneumonia" if p >= t else "normal") and a["backend"] == "onnxruntime"
        heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(a["heatmap"]["png"]))))
        assert heat.shape == (28, 28) and heat.max() == 255 and a["heatmap"]["method"] == "gradcam"

        r = _post(c, "p2d", [files["ct_slice"]])          # a DICOM CT slice (512 x 512, HU) to the 2D model
        assert r.status_code == 200, r.text
        assert r.json()["input"]["kind"] == "dicom" and r.json()["input"]["shape"] == [512, 512]
        assert r.json()["outside_training_data"] is True   # answered (--allow-out-of-profile), with the reasons
        assert any(w.startswith("modality CT") for w in r.json()["input_warnings"]), r.json()["input_warnings"]

        r = _post(c, "a3d", files["series"], display="true")   # 12 DICOM files = one series
        assert r.status_code == 200, r.text
        b = r.json()
        assert b["input"] == {"kind": "dicom-series", "shape": [12, 512, 512], "files": 12,
                              "spacing_mm": pytest.approx([2.5, 0.703125, 0.703125])}
        assert b["backend"] == "pytorch" and set(b["probabilities"]) == set(Run.open(server.runs["a3d"]).class_names)
        heat3d = _nifti(b["heatmap"]["nifti"])
        assert heat3d.shape == (512, 512, 12)                        # NIfTI is (x, y, z): the image grid
        assert _nifti(b["display"]["image"]).get_fdata().min() < -900   # HU kept for the window presets

        r = _post(c, "a3d", [files["nifti3d"]])
        assert r.status_code == 200 and r.json()["input"]["kind"] == "nifti-gz"


def test_segment_mask_volume_diameter_and_formats(server, files):
    with _client(server) as c:
        r = _post(c, "unet3d", [files["mri"]], endpoint="segment")
        assert r.status_code == 200, r.text
        s = r.json()
        mask = _nifti(s["mask"]["nifti"])
        m = np.asarray(mask.dataobj)
        sp = np.asarray(mask.header.get_zooms()[:3], float)
        assert m.shape == (45, 120, 21)                       # breast1's own grid (x, y, z)
        ms = s["measures"]
        assert ms["foreground_voxels"] == int((m > 0).sum())
        assert ms["volume_mm3"] == pytest.approx((m > 0).sum() * sp.prod(), rel=1e-6)
        if ms["foreground_voxels"] > 1:   # bounds on the diameter, computed here: a sample pair and the box
            from scipy import ndimage

            lab, _ = ndimage.label(m > 0)
            big = lab == np.bincount(lab.ravel())[1:].argmax() + 1
            pts = np.argwhere(big) * sp
            sample = pts[np.random.default_rng(0).choice(len(pts), min(len(pts), 300), replace=False)]
            lower = np.sqrt(((sample[:, None] - sample[None]) ** 2).sum(-1)).max()
            upper = np.linalg.norm(pts.max(0) - pts.min(0))
            assert lower - 1e-6 <= ms["max_diameter_mm"] <= upper + 1e-6
        for fmt in ("fhir", "dicom-sr"):   # SEG + SR of a mask: not served yet, said so
            r = _post(c, "unet3d", [files["mri"]], endpoint="segment", format=fmt)
            assert r.status_code == 501 and "--outputs sr,seg,fhir" in r.json()["error"]["message"]
        assert _post(c, "unet3d", [files["png"]], endpoint="segment").status_code == 422   # 2D to a 3D U-Net
        assert _post(c, "p2d", [files["png"]], endpoint="segment").json()["error"]["type"] == "WrongEndpoint"


def test_dicom_sr_and_fhir_of_a_prediction(server, files):
    import pydicom

    src = pydicom.dcmread(files["ct_slice"], stop_before_pixels=True)
    with _client(server) as c:
        answer = _post(c, "p2d", [files["ct_slice"]], heatmap="false").json()
        r = _post(c, "p2d", [files["ct_slice"]], format="dicom-sr")
        assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
        sr = pydicom.dcmread(io.BytesIO(r.content))
        assert sr.SOPClassUID.name == "Comprehensive 3D SR Storage"
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        assert sr.StudyInstanceUID == src.StudyInstanceUID
        refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert [x.ReferencedSOPInstanceUID for x in refs] == [src.SOPInstanceUID]
        nums = []

        def walk(items):
            for it in items:
                if it.ValueType == "NUM" and it.ConceptNameCodeSequence[0].CodeMeaning == "Probability":
                    nums.append(float(it.MeasuredValueSequence[0].NumericValue))
                walk(getattr(it, "ContentSequence", []))

        walk(sr.ContentSequence)
        assert nums and abs(nums[0] - answer["probabilities"]["pneumonia"]) < 1e-4
        r = _post(c, "p2d", [files["ct_slice"]], format="fhir")
        assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
        bundle = r.json()
        kinds = {e["resource"]["resourceType"] for e in bundle["entry"]}
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction" and "DiagnosticReport" in kinds
        r = _post(c, "p2d", [files["png"]], format="fhir")      # no DICOM attributes to report on
        assert r.status_code == 422 and "need DICOM input" in r.json()["error"]["message"]
        assert _post(c, "p2d", [files["png"]], format="xml").status_code == 422


def _bad_requests(c, files):
    """(what, response) for every kind of bad input."""
    import httpx

    yield "not an image", _post(c, "p2d", [files["text"]]), 415
    yield "truncated PNG", _post(c, "p2d", [files["truncated"]]), 422
    yield "oversized", _post(c, "p2d", [files["big"]]), 413
    yield "DICOM without pixel data", _post(c, "p2d", [files["no_pixels"]]), 422
    yield "3D volume to a 2D model", _post(c, "p2d", [files["nifti3d"]]), 422
    yield "2D image to a 3D model", _post(c, "a3d", [files["png"]]), 422
    yield "wrong number of channels", _post(c, "p2d", [files["two_channels"]]), 422
    yield "unknown model", _post(c, "nope", [files["png"]]), 404
    yield "no file part", c.post("/v1/models/p2d/predict", data={"x": "1"}), 422
    with httpx.Client(base_url=c.base_url, timeout=60) as anon:
        yield "no key", _post(anon, "p2d", [files["png"]]), 401
    wrong_key = KEY[:-1] + ("y" if KEY.endswith("x") else "x")  # differs from KEY in its last character, always
    with httpx.Client(base_url=c.base_url, headers={"X-API-Key": wrong_key}, timeout=60) as wrong:
        yield "wrong key", _post(wrong, "p2d", [files["png"]]), 401


def test_bad_input_gets_json_errors_and_the_server_stays_up(server, files):
    with _client(server) as c:
        for _ in range(3):
            for what, r, status in _bad_requests(c, files):
                assert r.status_code == status, (what, r.status_code, r.text[:300])
                err = r.json()["error"]
                assert err["status"] == status and err["message"], what
                assert "Traceback" not in r.text and 'File "' not in r.text and "/tmp/" not in r.text, what
                if what == "DICOM without pixel data":
                    assert "no pixel data" in err["message"]
                if what == "wrong number of channels":
                    assert "2 values (channels) per voxel" in err["message"]
                if what in ("3D volume to a 2D model", "2D image to a 3D model"):
                    assert re.search(r"takes [23]D inputs, this is [23]D", err["message"])
        assert server.alive()
        r = _post(c, "p2d", [files["png"]])
        assert r.status_code == 200 and r.json()["prediction"] in ("normal", "pneumonia")


def test_micro_batching_and_a_full_queue(server, files):
    """32 concurrent requests against a queue bound of 4: the admitted ones are answered in shared batches,
    the rest get 503 + Retry-After; afterwards the server answers normally."""
    import httpx

    body = files["png"].read_bytes()

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/models/p2d/predict", params={"heatmap": "false"},
                                                 files={"file": ("x.png", body)}) for _ in range(32)])

    def batches() -> tuple[float, float]:
        text = _client(server).get("/metrics").text
        count = float(re.search(r'medlens_batch_size_count\{model="p2d"\} (\S+)', text).group(1))
        ones = float(re.search(r'medlens_batch_size_bucket\{le="1.0",model="p2d"\} (\S+)', text).group(1))
        return count, ones

    before = batches()
    rs = asyncio.run(burst())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503} and codes.count(200) >= 4 and codes.count(503) >= 1, codes
    busy = next(r for r in rs if r.status_code == 503)
    assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["type"] == "Busy"
    after = batches()
    n_batches, n_single = after[0] - before[0], after[1] - before[1]
    assert n_batches < codes.count(200) and n_single < n_batches    # at least one batch held several requests
    with _client(server) as c:
        assert _post(c, "p2d", [files["png"]], heatmap="false").status_code == 200


def test_logs_are_json_without_phi_or_keys(server, files):
    with _client(server) as c:
        assert _post(c, "p2d", [files["png_phi"]]).status_code == 200
        assert _post(c, "p2d", [files["no_pixels"]]).status_code == 422
    lines = [ln for ln in server.log_path.read_text().splitlines() if ln.strip()]
    assert len(lines) > 10
    records = [json.loads(ln) for ln in lines]          # every line is one JSON object
    text = "\n".join(lines)
    assert KEY not in text and "Doe" not in text and "1234567" not in text and "nopix" not in text
    assert {"request", "ready"} <= {r.get("event") for r in records}
    req = [r for r in records if r.get("event") == "request" and r.get("route") == "/v1/models/{name}/predict"]
    assert req and all(set(r) <= {"ts", "level", "logger", "event", "request_id", "method", "route", "model",
                                  "status", "ms"} for r in req)


def test_non_local_bind_requires_a_key(trained_run, monkeypatch):
    # the CLI's entry point in this process (a subprocess added only the library's imports); the port is held
    # here, so that a server that started anyway would fail to bind (exit 1) instead of serving
    monkeypatch.delenv("MEDLENS_API_KEYS", raising=False)
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        r = inproc("serve", trained_run, "--host", "0.0.0.0", "--port", held.getsockname()[1], cwd=REPO)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "requires API keys" in err and "MEDLENS_API_KEYS" in err


# ---------------------------------------------------------------- the viewer in headless Chromium
def _colour_pixels(png: bytes) -> int:
    """Pixels where the colour channels differ clearly: the overlay (the images themselves are gray)."""
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((a.max(-1) - a.min(-1)) > 40).sum())


def test_viewer_401_without_key_then_login(server, browser):
    page = browser.new_context().new_page()
    resp = page.goto(server.url + "/")
    assert resp.status == 401
    assert "API key required" in page.text_content("h1")
    page.fill("#key", "wrong-key-wrong-key")
    page.click("button[type=submit]")
    assert "API key required" in page.text_content("h1")
    page.fill("#key", KEY)
    page.click("button[type=submit]")
    page.wait_for_selector("body[data-ready='1']", timeout=60000)
    names = [o.text_content() for o in page.query_selector_all("#model option")]
    assert any(n.startswith("p2d ") for n in names) and any(n.startswith("a3d ") for n in names)
    page.context.close()


def _viewer(server, browser):
    ctx = browser.new_context(viewport={"width": 1000, "height": 640})
    import httpx

    login = httpx.post(server.url + "/login", data={"key": KEY}, timeout=30)   # a session token, not the key
    ctx.add_cookies([{"name": "medlens_session", "value": login.cookies["medlens_session"], "url": server.url}])
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    assert page.goto(server.url + "/").status == 200
    page.wait_for_selector("body[data-ready='1']", timeout=60000)
    return page, errors


def _answered(page, n):
    page.wait_for_function(f"window.medlensViewer.state().answers >= {n}", timeout=120000)
    return page.evaluate("window.medlensViewer.state()")


def test_viewer_png_and_ct_slice_prediction_with_overlay(server, browser, files):
    page, errors = _viewer(server, browser)
    page.select_option("#model", "p2d")
    page.set_input_files("#file", str(files["png"]))
    st = _answered(page, 1)
    with _client(server) as c:
        api = _post(c, "p2d", [files["png"]], heatmap="false").json()
    assert page.text_content("#prediction").startswith(api["prediction"] + " (")
    rows = [r.text_content() for r in page.query_selector_all("#probs tbody tr")]
    assert len(rows) == 2 and rows[0].startswith("normal") and rows[1].startswith("pneumonia")
    assert st["volumes"] == 2 and st["overlay"] and st["dims"] == [28, 28, 1]
    page.wait_for_timeout(300)
    shown = _colour_pixels(page.locator("#gl").screenshot())
    page.fill("#opacity", "0")
    page.dispatch_event("#opacity", "input")
    page.wait_for_timeout(300)
    hidden = _colour_pixels(page.locator("#gl").screenshot())
    assert page.evaluate("window.medlensViewer.state()")["opacity"] == 0
    assert shown > 1000 and hidden < shown / 10     # the heatmap overlay is drawn, and the slider fades it

    page.set_input_files("#file", str(files["ct_slice"]))    # a DICOM CT slice
    st = _answered(page, 2)
    assert st["dims"] == [512, 512, 1] and st["overlay"]
    assert page.text_content("#prediction").split(" (")[0] in ("normal", "pneumonia")
    assert "dicom, 512 x 512" in page.text_content("#status")
    assert not errors, errors
    page.context.close()


def test_viewer_volume_slices_window_presets_and_cursor(server, browser, files):
    page, errors = _viewer(server, browser)
    page.select_option("#model", "a3d")
    page.set_input_files("#file", [str(p) for p in files["series"]])
    st = _answered(page, 1)
    assert st["dims"] == [512, 512, 12] and st["overlay"] and st["plane"] == 3
    page.click("#planes button[data-plane='0']")            # axial only
    page.wait_for_timeout(300)
    before_text = page.text_content("#slice-status")
    before_img = page.locator("#gl").screenshot()
    box = page.locator("#gl").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(4):
        page.mouse.wheel(0, 120)
        page.wait_for_timeout(150)
    after_text = page.text_content("#slice-status")
    after_img = page.locator("#gl").screenshot()
    assert before_text != after_text and re.match(r"axial slice \d+ / 12", after_text)
    assert before_img != after_img
    page.fill("#slice", "3")
    page.dispatch_event("#slice", "input")
    page.wait_for_timeout(200)
    assert page.text_content("#slice-status") == "axial slice 4 / 12"
    cursor = page.text_content("#cursor")
    assert re.search(r"x -?\d+\.\d mm\s+y -?\d+\.\d mm\s+z -?\d+\.\d mm", cursor)
    for name, lo, hi in (("lung", -1350, 150), ("mediastinum", -125, 225), ("bone", -500, 1300), ("brain", 0, 80)):
        page.click(f"#presets button:text-is('{name}')")
        s = page.evaluate("window.medlensViewer.state()")
        assert (s["calMin"], s["calMax"]) == (lo, hi), name
    for plane in ("1", "2"):
        page.click(f"#planes button[data-plane='{plane}']")
        assert page.evaluate("window.medlensViewer.state()")["plane"] == int(plane)
    assert not errors, errors
    page.context.close()


def test_a_request_over_the_timeout_gets_504_and_the_server_keeps_serving(trained_run, files):
    """In-process (the app object under starlette's TestClient, lifespan included): with a 1 ms per-request
    timeout a prediction with its Grad-CAM heatmap cannot finish, so the answer is a JSON 504; a health check and
    the model list still answer afterwards."""
    from starlette.testclient import TestClient

    from medlens.serve import ServeSettings, create_app

    app = create_app([trained_run], ServeSettings(timeout_s=0.001, backend="torch"))
    name = next(iter(app.state.models))
    with TestClient(app, base_url="http://localhost") as c:    # a Host the allow-list accepts
        r = c.post(f"/v1/models/{name}/predict", files={"file": ("x.png", files["png"].read_bytes())})
        assert r.status_code == 504, r.text[:300]
        err = r.json()["error"]
        assert err["type"] == "Timeout" and "longer than 0.001 s" in err["message"] and "Traceback" not in r.text
        assert c.get("/healthz").json() == {"status": "ok"}
        assert [m["name"] for m in c.get("/v1/models").json()["models"]] == [name]
