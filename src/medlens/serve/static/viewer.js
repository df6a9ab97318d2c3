// medlens viewer: upload an image or a DICOM series to the served model, show the answer and the
// heatmap or mask over the image with NiiVue (vendored, /static/niivue.umd.js).
// Everything that comes from the server or a file (class names, messages) is set with textContent,
// never as HTML.
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const state = { models: [], plane: 3, dims: [1, 1, 1], vox: [0, 0, 0], mm: null, answers: 0, overlay: false,
                  busy: false };
  const PLANE_AXIS = { 0: 2, 1: 1, 2: 0, 3: 2 };           // which voxel axis a plane's slices run along
  const PLANE_NAME = { 0: "axial", 1: "coronal", 2: "sagittal", 3: "axial" };
  let nv = null;

  function setStatus(text, isError) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("error", !!isError);
  }

  function row(tbody, cells) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = String(c);
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
  }

  async function loadModels() {
    const r = await fetch("/v1/models");
    if (!r.ok) { setStatus(await errorText(r), true); return; }
    state.models = (await r.json()).models;
    const sel = $("model");
    sel.replaceChildren();
    for (const m of state.models) {
      const o = document.createElement("option");
      o.value = m.name;
      o.textContent = `${m.name} (${m.task}, ${m.spatial_dims}D)`;
      sel.appendChild(o);
    }
    describeModel();
  }

  function currentModel() {
    return state.models.find((m) => m.name === $("model").value);
  }

  function describeModel() {
    const m = currentModel();
    if (!m) return;
    const op = m.operating_point ? `threshold ${m.operating_point.threshold.toFixed(3)} (${m.operating_point.rule}, validation)` : "";
    $("model-info").textContent = `${m.classes.join(" / ")}; ${m.backend}${op ? "; " + op : ""}`;
  }

  async function errorText(r) {
    try {
      const j = await r.json();
      if (j && j.error) return `${r.status}: ${j.error.message}`;
    } catch (e) { /* not JSON */ }
    return `${r.status}: ${r.statusText}`;
  }

  async function analyse(files) {
    const m = currentModel();
    if (!m || !files.length || state.busy) return;
    state.busy = true;
    const endpoint = m.endpoints[0];   // "segment" or "predict", as the server lists it for the model
    const fd = new FormData();
    for (const f of files) fd.append("file", f, f.name);
    setStatus(`sending ${files.length} file(s) to ${m.name} ...`);
    try {
      const r = await fetch(`/v1/models/${encodeURIComponent(m.name)}/${endpoint}?display=true`, { method: "POST", body: fd });
      if (!r.ok) { setStatus(await errorText(r), true); return; }
      const res = await r.json();
      showAnswer(res);
      await showImages(res);
      state.answers += 1;
      setStatus(`${res.input.kind}, ${res.input.shape.join(" x ")}; ${res.timing_ms.total} ms`);
    } catch (e) {
      setStatus(`failed: ${e.message}`, true);
    } finally {
      state.busy = false;
    }
  }

  function showAnswer(res) {
    $("answer").hidden = false;
    const tbody = $("probs").querySelector("tbody");
    tbody.replaceChildren();
    const mt = $("measures").querySelector("tbody");
    mt.replaceChildren();
    if (res.measures) {                // a segment answer: volume/area and diameters per class
      $("probs").hidden = true;
      $("measures").hidden = false;
      const ms = res.measures;
      $("prediction").textContent = ms.foreground_voxels ? "foreground found" : "no foreground";
      if ("volume_mm3" in ms) row(mt, ["volume", `${ms.volume_mm3.toFixed(1)} mm³`]);
      if ("area_mm2" in ms) row(mt, ["area", `${ms.area_mm2.toFixed(1)} mm²`]);
      row(mt, ["largest diameter", `${ms.max_diameter_mm.toFixed(1)} mm`]);
      row(mt, ["components", ms.components]);
      $("decision").textContent = res.threshold !== null ? `threshold ${res.threshold.toFixed(3)} (validation)` : "";
    } else {
      $("probs").hidden = false;
      $("measures").hidden = true;
      $("prediction").textContent = `${res.prediction} (${(100 * res.probability).toFixed(1)}%)`;
      for (const [k, v] of Object.entries(res.probabilities)) row(tbody, [k, v.toFixed(4)]);
      $("decision").textContent = "threshold" in res
        ? `decision at threshold ${res.threshold.toFixed(3)} (${res.decision_rule})` : "decision: highest probability";
    }
  }

  async function showImages(res) {
    while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
    const img = await niivue.NVImage.loadFromBase64({ base64: res.display.image, name: "image.nii.gz" });
    nv.addVolume(img);
    let overlay = null;
    if (res.heatmap && res.heatmap.nifti) {
      overlay = await niivue.NVImage.loadFromBase64({ base64: res.heatmap.nifti, name: "heatmap.nii.gz",
        colormap: "warm", cal_min: 51, cal_max: 255, opacity: Number($("opacity").value) });
    } else if (res.mask && res.mask.nifti) {
      overlay = await niivue.NVImage.loadFromBase64({ base64: res.mask.nifti, name: "mask.nii.gz",
        colormap: "red", cal_min: 0.5, cal_max: 1.0, opacity: Number($("opacity").value) });
    }
    if (overlay) nv.addVolume(overlay);
    state.overlay = !!overlay;
    const d = img.dims;                                 // NIfTI dims: [ndim, x, y, z, ...]
    state.dims = [d[1], d[2], Math.max(1, d[3] || 1)];
    const isVolume = state.dims[2] > 1;
    nv.setCrosshairWidth(isVolume ? 1 : 0);
    setPlane(isVolume ? 3 : 0);
    $("controls").disabled = false;
    $("level").value = Math.round((img.cal_min + img.cal_max) / 2);
    $("width").value = Math.round(img.cal_max - img.cal_min);
    nv.updateGLVolume();
  }

  function setPlane(p) {
    state.plane = p;
    nv.setSliceType(p);
    for (const b of document.querySelectorAll("#planes button")) b.classList.toggle("on", Number(b.dataset.plane) === p);
    const axis = PLANE_AXIS[p];
    const s = $("slice");
    s.max = String(state.dims[axis] - 1);
    s.value = String(state.vox[axis] || 0);
    showSlice();
  }

  function showSlice() {
    const axis = PLANE_AXIS[state.plane];
    $("slice-status").textContent = `${PLANE_NAME[state.plane]} slice ${Math.round(state.vox[axis]) + 1} / ${state.dims[axis]}`;
  }

  function onLocation(loc) {
    if (!loc || !loc.vox) return;
    state.vox = [loc.vox[0], loc.vox[1], loc.vox[2]];
    state.mm = loc.mm;
    const axis = PLANE_AXIS[state.plane];
    $("slice").value = String(Math.round(state.vox[axis]));
    showSlice();
    const v = (loc.values && loc.values.length) ? loc.values.map((x) => `${x.name}: ${Number(x.value).toFixed(3)}`).join("\n") : "";
    $("cursor").textContent = `x ${loc.mm[0].toFixed(1)} mm  y ${loc.mm[1].toFixed(1)} mm  z ${loc.mm[2].toFixed(1)} mm\n` +
      `voxel ${state.vox.map((x) => Math.round(x)).join(", ")}\n${v}`;
  }

  function setWindow(level, width) {
    const v = nv.volumes[0];
    if (!v || !(width > 0)) return;
    v.cal_min = level - width / 2;
    v.cal_max = level + width / 2;
    $("level").value = Math.round(level);
    $("width").value = Math.round(width);
    nv.updateGLVolume();
  }

  function wire() {
    $("model").addEventListener("change", describeModel);
    $("file").addEventListener("change", (e) => analyse(Array.from(e.target.files)));
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      analyse(Array.from(e.dataTransfer.files));
    });
    $("opacity").addEventListener("input", (e) => {
      if (nv.volumes.length > 1) nv.setOpacity(1, Number(e.target.value));
    });
    for (const b of document.querySelectorAll("#planes button")) b.addEventListener("click", () => setPlane(Number(b.dataset.plane)));
    $("slice").addEventListener("input", (e) => {
      const axis = PLANE_AXIS[state.plane];
      const delta = [0, 0, 0];
      delta[axis] = Number(e.target.value) - Math.round(state.vox[axis]);
      nv.moveCrosshairInVox(delta[0], delta[1], delta[2]);
    });
    for (const b of document.querySelectorAll("#presets button")) {
      b.addEventListener("click", () => {
        const v = nv.volumes[0];
        if (!v) return;
        if (b.dataset.window === "auto") setWindow((v.robust_min + v.robust_max) / 2, v.robust_max - v.robust_min);
        else { const [l, w] = b.dataset.window.split(",").map(Number); setWindow(l, w); }
      });
    }
    const lw = () => setWindow(Number($("level").value), Number($("width").value));
    $("level").addEventListener("change", lw);
    $("width").addEventListener("change", lw);
  }

  async function main() {
    nv = new niivue.Niivue({ backColor: [0, 0, 0, 1], isColorbar: false, dragAndDropEnabled: false,
                             crosshairColor: [0.3, 0.8, 1, 0.5], show3Dcrosshair: false });
    await nv.attachToCanvas($("gl"));
    nv.onLocationChange = onLocation;
    wire();
    await loadModels();
    // what the browser tests read; the page itself needs none of it
    window.medlensViewer = {
      state: () => ({ answers: state.answers, volumes: nv.volumes.length, overlay: state.overlay, plane: state.plane,
                      vox: state.vox.slice(), dims: state.dims.slice(), mm: state.mm ? Array.from(state.mm) : null,
                      opacity: nv.volumes.length > 1 ? nv.volumes[1].opacity : null,
                      calMin: nv.volumes.length ? nv.volumes[0].cal_min : null,
                      calMax: nv.volumes.length ? nv.volumes[0].cal_max : null }),
    };
    document.body.dataset.ready = "1";
  }

  main().catch((e) => setStatus(`viewer failed to start: ${e.message}`, true));
})();
