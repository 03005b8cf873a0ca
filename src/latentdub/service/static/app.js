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
    box.appendChild(optionControl(name, resolveSchema(raw, schema)));
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
  form.append("video", $("video").files[0]);
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
  $("verify-result").dataset.marked = String(Boolean(report.marked));
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
