// latentdub's web page: plain JS, no framework, nothing loaded from elsewhere.
"use strict";

const KEY_STORE = "latentdub.apiKey";
const POLL_MS = 500;
const FINAL = ["succeeded", "failed", "cancelled"];
let authEnabled = true;
let resultUrl = null; // the object URL of the current result (revoked when replaced)

const $ = (id) => document.getElementById(id);

function authHeaders() {
  const key = $("api-key").value.trim();
  return authEnabled && key ? { Authorization: "Bearer " + key } : {};
}

// An API error body {"error": {"code", "message"}} (or anything else) as one readable line.
function errorText(status, body) {
  if (body && body.error) {
    const e = body.error;
    return `${e.message} (${e.code}${e.field ? ", field " + e.field : ""}; HTTP ${status})`;
  }
  if (typeof body === "string" && body) return `HTTP ${status}: ${body.slice(0, 300)}`;
  return status ? `HTTP ${status}` : "the server cannot be reached";
}

function showError(id, text) {
  const box = $(id);
  box.textContent = text || "";
  box.hidden = !text;
}

function parseBody(text) {
  try { return JSON.parse(text); } catch (_) { return text; }
}

async function api(method, path) {
  let r;
  try {
    r = await fetch(path, { method, headers: authHeaders() });
  } catch (err) {
    throw new Error("the server cannot be reached: " + err.message);
  }
  const body = parseBody(await r.text());
  if (!r.ok) throw new Error(errorText(r.status, body));
  return body;
}

// POST a FormData with upload progress (fetch cannot report upload progress).
function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (ev) => { if (ev.lengthComputable && onProgress) onProgress(ev.loaded / ev.total); };
    xhr.upload.onload = () => onProgress && onProgress(1);
    xhr.onload = () => {
      const body = parseBody(xhr.responseText);
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new Error(errorText(xhr.status, body)));
    };
    xhr.onerror = () => reject(new Error("the upload failed: the server cannot be reached"));
    xhr.send(form);
  });
}

// -- tabs -----------------------------------------------------------------------------------
function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== name;
  if (name === "jobs") loadJobs();
}

// -- options: one control per field of the options schema that /api/v1/info publishes ----------
// Nothing about the options is written here: a new field of the server's options model gets a
// control with no change to this page.

// A property's schema with $ref followed and Optional (anyOf [T, null]) reduced to T.
function resolveSchema(prop, root) {
  let p = prop || {};
  for (let i = 0; i < 8; i++) {
    if (p.$ref && p.$ref.startsWith("#/$defs/")) {
      const { $ref, ...rest } = p;
      p = { ...((root.$defs || {})[$ref.slice(8)] || {}), ...rest };
    } else if (Array.isArray(p.anyOf)) {
      const { anyOf, ...rest } = p;
      p = { ...(anyOf.find((s) => s.type !== "null") || {}), ...rest };
    } else if (Array.isArray(p.allOf) && p.allOf.length === 1) {
      const { allOf, ...rest } = p;
      p = { ...allOf[0], ...rest };
    } else break;
  }
  return p;
}

function optionControl(name, prop) {
  const label = document.createElement("label");
  label.dataset.option = name;
  label.title = prop.description || "";
  let control;
  if (Array.isArray(prop.enum)) {
    control = document.createElement("select");
    for (const value of prop.enum) {
      const option = document.createElement("option");
      option.value = option.textContent = String(value);
      option.selected = value === prop.default;
      control.appendChild(option);
    }
  } else {
    control = document.createElement("input");
    if (prop.type === "boolean") {
      control.type = "checkbox";
      control.checked = prop.default === true;
      label.className = "check";
    } else if (prop.type === "integer" || prop.type === "number") {
      control.type = "number";
      control.step = prop.type === "integer" ? "1" : "any";
      const min = prop.minimum ?? prop.exclusiveMinimum;
      const max = prop.maximum ?? prop.exclusiveMaximum;
      if (min !== undefined) control.min = String(min);
      if (max !== undefined) control.max = String(max);
      if (prop.default !== undefined && prop.default !== null) control.value = String(prop.default);
    } else {
      control.type = "text";
      if (prop.minLength) control.required = true;
      if (prop.maxLength) control.maxLength = prop.maxLength;
      if (prop.default !== undefined && prop.default !== null) control.value = String(prop.default);
    }
  }
  control.name = name;
  control.dataset.default = prop.default === undefined ? "" : String(prop.default);
  // Sent when the user touched it or it differs from the default: an untouched control leaves
  // the choice to the server (e.g. steps follows the chosen sampler's default).
  control.addEventListener("input", () => { control.dataset.touched = "true"; });
  control.addEventListener("change", () => { control.dataset.touched = "true"; });
  const text = document.createElement("span");
  text.textContent = name;
  const help = document.createElement("span");
  help.className = "hint";
  help.textContent = prop.description || "";
  if (control.type === "checkbox") label.append(control, text, help);
  else label.append(text, " ", control, " ", help);
  return label;
}

function buildOptions(schema) {
  const box = $("options");
  for (const old of box.querySelectorAll("label[data-option]")) old.remove();
  for (const [name, raw] of Object.entries((schema && schema.properties) || {})) {
    const prop = resolveSchema(raw, schema);
    // A list or an object (e.g. segments) has no one-input control: left to the API.
    if (prop.type === "array" || prop.type === "object") continue;
    box.appendChild(optionControl(name, prop));
  }
}

function optionValues() {
  const out = [];
  for (const control of $("options").querySelectorAll("[name]")) {
    const value = control.type === "checkbox" ? String(control.checked) : control.value.trim();
    if (value === "" || (value === control.dataset.default && !control.dataset.touched)) continue;
    out.push([control.name, value]);
  }
  return out;
}

// -- faces and speakers of the chosen video, before the dub ----------------------------------
// Picking a video uploads it once as an asset (the dub then names it by id) and asks the server
// for its analysis: thumbnails with the face boxes, and who speaks when. The analysis names the
// option that pins a face (analysis.pin), so no option name is written here.
const TRACK_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];
const NOBODY_COLOUR = "#bbbbbb";
const BUSY_RETRIES = 60;
let videoAsset = null; // {file, id: Promise<string>} of the video picked last
let analysis = null; // the analysis shown (null: none)

function setAnalysisState(state, text) {
  $("analysis").hidden = false;
  $("analysis").dataset.state = state;
  $("analysis-status").textContent = text;
  $("analysis-bar").hidden = state !== "uploading" && state !== "running";
}

function pinControl() {
  if (!analysis || !analysis.pin) return null;
  return $("options").querySelector(`[name="${CSS.escape(analysis.pin.option)}"]`);
}

// value: a track's pin ("track:N"), or null for the option's default (whoever speaks).
function pinFace(value) {
  const control = pinControl();
  if (!control) return;
  if (value === null) {
    control.value = analysis.pin.default;
    delete control.dataset.touched; // untouched: the server's default applies
  } else {
    control.value = value;
    control.dataset.touched = "true";
  }
  markPinned();
}

function markPinned() {
  const control = pinControl();
  const value = control ? control.value.trim() : "";
  for (const box of document.querySelectorAll("#face-strip .face-box")) {
    box.classList.toggle("selected", box.dataset.pin === value);
    box.setAttribute("aria-pressed", String(box.dataset.pin === value));
  }
  const auto = $("face-auto");
  const isAuto = !control || value === "" || value === analysis.pin.default;
  auto.classList.toggle("selected", isAuto);
  auto.setAttribute("aria-pressed", String(isAuto));
}

function fmtS(s) { return `${s.toFixed(2)} s`; }

function renderAnalysis(data) {
  analysis = data;
  const colour = new Map(data.tracks.map((t, i) => [t.id, TRACK_COLOURS[i % TRACK_COLOURS.length]]));
  const tracks = new Map(data.tracks.map((t) => [t.id, t]));
  const strip = $("face-strip");
  for (const old of strip.querySelectorAll(".thumb")) old.remove();
  const pinnable = Boolean(pinControl());
  for (const frame of data.frames) {
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    thumb.dataset.frame = frame.index;
    const img = document.createElement("img");
    img.src = "data:image/jpeg;base64," + frame.jpeg;
    img.alt = `frame ${frame.index} at ${fmtS(frame.time_s)}`;
    const when = document.createElement("span");
    when.className = "t";
    when.textContent = fmtS(frame.time_s);
    thumb.append(img, when);
    for (const face of frame.faces) {
      const t = tracks.get(face.track);
      const [x0, y0, x1, y1] = face.box;
      const box = document.createElement("button");
      box.type = "button";
      box.className = "face-box";
      box.dataset.track = face.track;
      box.dataset.pin = t ? t.pin : "";
      box.style.left = `${(100 * x0) / data.video.width}%`;
      box.style.top = `${(100 * y0) / data.video.height}%`;
      box.style.width = `${(100 * (x1 - x0)) / data.video.width}%`;
      box.style.height = `${(100 * (y1 - y0)) / data.video.height}%`;
      box.style.borderColor = colour.get(face.track) || NOBODY_COLOUR;
      box.title = t ? `track ${t.id}: ${fmtS(t.first_s)}–${fmtS(t.last_s)}, about ${Math.round(t.mean_size)} px`
        + (pinnable ? "; click to dub only this face" : "") : `track ${face.track}`;
      box.disabled = !pinnable;
      box.addEventListener("click", () => pinFace(box.dataset.pin));
      thumb.appendChild(box);
    }
    strip.appendChild(thumb);
  }
  $("face-auto").hidden = !pinnable;

  const bar = $("speaker-bar");
  bar.replaceChildren();
  const legend = $("speaker-legend");
  legend.replaceChildren();
  const duration = data.video.duration_s || 1;
  if (data.speakers) {
    for (const seg of data.speakers.segments) {
      const div = document.createElement("div");
      div.className = "seg";
      div.dataset.track = seg.track === null ? "none" : String(seg.track);
      div.style.left = `${(100 * seg.start_s) / duration}%`;
      div.style.width = `${(100 * (seg.end_s - seg.start_s)) / duration}%`;
      div.style.background = seg.track === null ? NOBODY_COLOUR : colour.get(seg.track) || NOBODY_COLOUR;
      const who = seg.track === null ? "nobody speaks" : `track ${seg.track} speaks`;
      div.title = `${who}: ${fmtS(seg.start_s)}–${fmtS(seg.end_s)} (confidence ${seg.confidence.toFixed(2)})`;
      bar.appendChild(div);
    }
    for (const t of data.tracks) {
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colour.get(t.id);
      legend.append(swatch, `track ${t.id}`);
    }
    // "none": the library could not judge (no audio, or no lips to read), not a silent video.
    if (data.speakers.method === "none") legend.append(" (who speaks cannot be told for this video)");
  } else {
    legend.textContent = `no speaker timeline: ${data.speakers_error || "not available"}`;
  }
  $("analysis-result").hidden = false;
  const faces = data.tracks.length;
  setAnalysisState("ready", faces ? `${faces} face${faces === 1 ? "" : "s"} found` : "no face found");
  markPinned();
}

function resetAnalysis() {
  const had = analysis;
  if (had && pinControl() && pinControl().value.trim().startsWith("track:")) pinFace(null);
  analysis = null;
  $("analysis-result").hidden = true;
  showError("analysis-error", "");
}

async function fetchAnalysis(id, asset) {
  for (let attempt = 0; ; attempt++) {
    let r;
    try {
      r = await fetch(`/api/v1/assets/${encodeURIComponent(id)}/analysis`, { headers: authHeaders() });
    } catch (err) {
      throw new Error("the server cannot be reached: " + err.message);
    }
    const body = parseBody(await r.text());
    if (asset !== videoAsset) return null; // another video was picked meanwhile
    if (r.status === 503 && attempt < BUSY_RETRIES) {
      setAnalysisState("running", "the server is busy with other analyses; waiting…");
      await new Promise((done) => setTimeout(done, 1000 * (Number(r.headers.get("Retry-After")) || 5)));
      continue;
    }
    if (!r.ok) throw new Error(errorText(r.status, body));
    return body;
  }
}

async function videoPicked() {
  resetAnalysis();
  const file = $("video").files[0];
  if (!file) {
    videoAsset = null;
    $("analysis").hidden = true;
    return;
  }
  const form = new FormData();
  form.append("kind", "video");
  form.append("file", file);
  setAnalysisState("uploading", "uploading the video…");
  $("analysis-bar").value = 0;
  const id = upload("/api/v1/assets", form, (p) => { $("analysis-bar").value = p; }).then((a) => a.id);
  const asset = { file, id };
  videoAsset = asset;
  try {
    await id;
    if (asset !== videoAsset) return;
    setAnalysisState("running", "finding faces and who speaks…");
    $("analysis-bar").removeAttribute("value"); // indeterminate: the server gives no progress
    const data = await fetchAnalysis(await id, asset);
    if (data) renderAnalysis(data);
  } catch (err) {
    if (asset !== videoAsset) return;
    setAnalysisState("error", "");
    showError("analysis-error", `faces and speakers cannot be shown (the dub can still go ahead): ${err.message}`);
  }
}

// The id of the picked video's asset, or null when its upload failed (the dub then sends the file).
async function videoAssetId(file) {
  if (!videoAsset || videoAsset.file !== file) return null;
  try {
    return await videoAsset.id;
  } catch (_) {
    return null;
  }
}

// -- dub ------------------------------------------------------------------------------------
function fmtEta(s) {
  if (s === null || s === undefined) return "–";
  return s < 60 ? `${Math.round(s)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

async function submitDub(ev) {
  ev.preventDefault();
  showError("dub-error", "");
  $("dub-result").hidden = true;
  const form = new FormData();
  const video = $("video").files[0];
  const videoId = await videoAssetId(video);
  if (videoId) form.append("video_asset_id", videoId); // uploaded already when it was picked
  else form.append("video", video);
  form.append("audio", $("audio").files[0]);
  form.append("consent", JSON.stringify({
    subject: $("consent-subject").value.trim(),
    granted_by: $("consent-granted-by").value.trim(),
    method: $("consent-method").value.trim(),
    evidence: $("consent-evidence").value.trim(),
  }));
  for (const [name, value] of optionValues()) form.append(name, value);

  $("dub-status").hidden = false;
  $("upload-bar").value = 0;
  $("upload-text").textContent = "uploading…";
  $("job-id").textContent = "";
  setJob({ status: "uploading", progress: 0 });
  $("dub-submit").disabled = true;
  try {
    const job = await upload("/api/v1/jobs", form, (p) => {
      $("upload-bar").value = p;
      $("upload-text").textContent = `${Math.round(p * 100)} %`;
    });
    $("upload-text").textContent = "done";
    $("job-id").textContent = job.id;
    await pollJob(job.id);
  } catch (err) {
    setJob({ status: "error", progress: 0 });
    showError("dub-error", err.message);
  } finally {
    $("dub-submit").disabled = false;
  }
}

function setJob(job) {
  const status = job.status === "succeeded" ? "done" : job.status;
  $("job-status").textContent = status;
  $("job-status").dataset.status = job.status;
  $("job-bar").value = job.progress || 0;
  $("job-percent").textContent = `${Math.round((job.progress || 0) * 100)} %`;
  $("job-stage").textContent = job.stage || "–";
  $("job-eta").textContent = FINAL.includes(job.status) ? "–" : fmtEta(job.eta_s);
}

async function pollJob(id) {
  for (;;) {
    const job = await api("GET", `/api/v1/jobs/${encodeURIComponent(id)}`);
    if (job.status === "succeeded") {
      await showResult(job);
      setJob(job);
      return;
    }
    setJob(job);
    if (job.status === "failed") {
      const e = job.error || {};
      throw new Error(`the dub failed: ${e.message || "no reason given"} (${e.code || "failed"})`);
    }
    if (job.status === "cancelled") throw new Error(`job ${id} was cancelled`);
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

// <video src> cannot send the Authorization header: fetch the result, then an object URL.
async function showResult(job) {
  const r = await fetch(job.result_url, { headers: authHeaders() });
  if (!r.ok) throw new Error(errorText(r.status, parseBody(await r.text())));
  const blob = await r.blob();
  if (resultUrl) URL.revokeObjectURL(resultUrl);
  resultUrl = URL.createObjectURL(new Blob([blob], { type: "video/mp4" }));
  $("result-video").src = resultUrl;
  const link = $("download-link");
  link.href = resultUrl;
  link.download = `${job.id}.mp4`;
  $("dub-result").hidden = false;
}

// -- verify ---------------------------------------------------------------------------------
function li(list, text, cls) {
  const item = document.createElement("li");
  item.textContent = text;
  if (cls) item.className = cls;
  list.appendChild(item);
}

function fmt(x, digits) {
  return typeof x === "number" ? x.toFixed(digits) : "–";
}

async function submitVerify(ev) {
  ev.preventDefault();
  showError("verify-error", "");
  $("verify-result").hidden = true;
  const form = new FormData();
  form.append("video", $("verify-video").files[0]);
  const bar = $("verify-bar");
  bar.hidden = false;
  bar.value = 0;
  $("verify-submit").disabled = true;
  try {
    const report = await upload("/api/v1/verify", form, (p) => { bar.value = p; });
    renderVerify(report);
  } catch (err) {
    showError("verify-error", err.message);
  } finally {
    $("verify-submit").disabled = false;
    bar.hidden = true;
  }
}

const VERDICT_CLASS = { marked: "found", ai_marker: "found", copied_mark: "bad", tampered: "bad", not_found: "notfound" };

function renderVerdict(report) {
  const status = report.status || "not_found";
  const word = $("verify-status");
  word.textContent = status.replace(/_/g, " ");
  word.className = VERDICT_CLASS[status] || "notfound";
  const key = report.key || {};
  $("verify-status-text").textContent =
    (report.status_text || "") + (key.public ? ` (${key.note})` : "");
  const att = report.attribution || {};
  $("verify-attribution").textContent = att.claimed
    ? `made by job ${att.job_id_hex}: ${att.basis}`
    : `job not claimed: ${att.reason || "no mark"}`;
  const body = $("verify-segments").querySelector("tbody");
  body.replaceChildren();
  for (const seg of report.segments || []) {
    const row = document.createElement("tr");
    row.dataset.status = seg.status;
    const content = seg.content || {};
    const picture = content.match === true ? "the job's output" : content.match === false ? "NOT the job's output" : "–";
    for (const text of [fmt(seg.start_s, 2), fmt(seg.end_s, 2), seg.status.replace(/_/g, " "), seg.job_id_hex || "–",
                        picture, fmt(seg.score, 1)]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    }
    body.appendChild(row);
  }
  const creds = report.credentials || {};
  if (creds.present) li($("c2pa-details"), `mark and credentials: ${(creds.agreement || "?").replace(/_/g, " ")}`,
                        creds.agreement === "agree" ? "" : "bad");
}

function renderVerify(report) {
  const wm = report.watermark || {};
  const c2 = report.c2pa || {};
  const wmStatus = $("wm-status");
  wmStatus.textContent = wm.found ? "found" : "not found";
  wmStatus.className = wm.found ? "found" : "notfound";
  const wmList = $("wm-details");
  wmList.replaceChildren();
  if (wm.found) li(wmList, `AI-generated: made by latentdub job ${wm.job_id_hex} (id ${wm.job_id})`);
  else if (wm.ai_marker) li(wmList, "the AI-generated marker is present, but the job id could not be read");
  li(wmList, `bit accuracy ${fmt(wm.bit_accuracy, 3)}`);
  li(wmList, `${wm.frames_checked} frames checked, score ${fmt(wm.score, 2)} (threshold ${fmt(wm.threshold, 2)})`);

  const c2Status = $("c2pa-status");
  const c2List = $("c2pa-details");
  c2List.replaceChildren();
  if (!c2.present) {
    c2Status.textContent = "none";
    c2Status.className = "notfound";
  } else {
    c2Status.textContent = c2.valid ? "present, valid" : "present, INVALID";
    c2Status.className = c2.valid ? "found" : "bad";
    li(c2List, c2.trusted ? "signed by a trusted signer" : "signer not in a trust list");
    const claims = c2.claims || {};
    if (claims.ai_edited) li(c2List, "says: altered by an AI model");
    const dub = claims.latentdub || {};
    if (Object.keys(dub).length) {
      const model = dub.model || {};
      li(c2List, `model ${model.name || model.version || "?"}${model.random_weights ? " (RANDOM weights)" : ""}`);
      li(c2List, `consent ${dub.consent_id || "?"}, watermark ${dub.watermark ? "on" : "OFF"}`);
    }
    for (const failure of c2.failures || []) li(c2List, failure, "bad");
  }
  renderVerdict(report);
  $("verify-result").dataset.marked = String(Boolean(report.marked));
  $("verify-result").dataset.status = report.status || "";
  $("verify-result").hidden = false;
}

// -- jobs -----------------------------------------------------------------------------------
async function loadJobs() {
  showError("jobs-error", "");
  const body = $("jobs-table").tBodies[0];
  try {
    const page = await api("GET", "/api/v1/jobs?limit=100");
    body.replaceChildren();
    for (const job of page.jobs) {
      const row = body.insertRow();
      row.dataset.id = job.id;
      const cells = [job.id, job.status, `${Math.round((job.progress || 0) * 100)} %`, job.stage || "–",
        job.created_at || ""];
      for (const text of cells) row.insertCell().textContent = text;
      const action = row.insertCell();
      if (job.status === "queued" || job.status === "running") {
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = "Cancel";
        button.className = "cancel";
        button.onclick = () => cancelJob(job.id, button);
        action.appendChild(button);
      }
    }
    if (!page.jobs.length) body.insertRow().insertCell().textContent = "no jobs yet";
  } catch (err) {
    showError("jobs-error", err.message);
  }
}

async function cancelJob(id, button) {
  button.disabled = true;
  try {
    await api("POST", `/api/v1/jobs/${encodeURIComponent(id)}/cancel`);
  } catch (err) {
    showError("jobs-error", err.message);
  }
  await loadJobs();
}

// -- start ----------------------------------------------------------------------------------
async function start() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORE) || "";
  key.addEventListener("input", () => localStorage.setItem(KEY_STORE, key.value.trim()));
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  $("dub-form").addEventListener("submit", submitDub);
  $("video").addEventListener("change", videoPicked);
  $("face-auto").addEventListener("click", () => pinFace(null));
  $("options").addEventListener("input", () => { if (analysis) markPinned(); });
  $("verify-form").addEventListener("submit", submitVerify);
  $("jobs-refresh").addEventListener("click", loadJobs);
  try {
    const info = await api("GET", "/api/v1/info");
    authEnabled = info.auth_enabled;
    buildOptions(info.options);
    $("version").textContent = "v" + info.version;
    $("auth-off").hidden = authEnabled;
    $("auth-box").hidden = !authEnabled;
  } catch (err) {
    showError("dub-error", err.message);
  }
  document.body.dataset.ready = "true";
}

start();
