// adapter-server dashboard: plain JavaScript over the server's public HTTP API, no build step.
// The API key lives in sessionStorage (this tab only) and travels in the Authorization header,
// never in a URL.
"use strict";

const KEY_STORE = "adapter-server-key";
const POLL_MS = 2000;
const HISTORY = 60; // samples kept for the charts
const $ = (id) => document.getElementById(id);

const state = {
  baseModel: "",
  needKey: false, // the last keyed request got a 401: wait for a key before asking again
  metricsKeyed: false,
  lastSample: null, // {t, tokens}
  history: { throughput: [], queue: [], hit: [] },
};

// ------------------------------------------------------------------ HTTP
function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function withKey(headers = {}) {
  const key = apiKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorOf(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || message;
  } catch (_) { /* not JSON */ }
  return new ApiError(response.status, message);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: withKey(options.headers) });
  if (!response.ok) throw await errorOf(response);
  return response;
}

const postJson = (path, body) =>
  api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

// ------------------------------------------------------------------ formatting and messages
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function say(text, kind = "info") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = !text;
}

function explain(error, action) {
  if (error.status === 401) {
    state.needKey = true;
    say(`${action}: this server needs an API key — enter it above (the admin key for uploads and merges).`, "error");
  } else {
    say(`${action}: ${error.message}`, "error");
  }
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(text, onClick, className = "admin") {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

// ------------------------------------------------------------------ key form
function showKeyState() {
  $("key-state").textContent = apiKey() ? "key set for this tab" : "no key";
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  $("key").value = "";
  state.needKey = false;
  state.metricsKeyed = false;
  showKeyState();
  say("");
  refresh();
});

$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORE);
  showKeyState();
});

// ------------------------------------------------------------------ health and metrics
async function refreshHealth() {
  try {
    const health = await (await fetch("/health")).json();
    state.baseModel = health.model || state.baseModel;
    $("model").textContent = `${health.model} · batch ${health.max_batch} · context ${health.max_seq_len}`;
    $("status").textContent = health.status;
    $("status").className = `pill ${health.status === "ok" ? "ok" : "bad"}`;
    $("pick-0").value = state.baseModel;
  } catch (_) {
    $("status").textContent = "unreachable";
    $("status").className = "pill bad";
  }
}

function parseMetrics(text) {
  const samples = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const kv of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[kv[1]] = kv[2];
    (samples[m[1]] = samples[m[1]] || []).push({ labels, value: Number(m[3]) });
  }
  return samples;
}

function total(samples, name, keep = () => true) {
  return (samples[name] || []).filter((s) => keep(s.labels)).reduce((sum, s) => sum + s.value, 0);
}

function push(series, value) {
  series.push(value);
  if (series.length > HISTORY) series.shift();
}

function drawChart(canvas, series, maxHint = 0) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  if (series.length < 2) return;
  const max = Math.max(maxHint, ...series, 1e-9);
  ctx.strokeStyle = "#2b6cb0";
  ctx.lineWidth = 2;
  ctx.beginPath();
  series.forEach((v, i) => {
    const x = (i / (HISTORY - 1)) * width;
    const y = height - 2 - (v / max) * (height - 4);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

async function refreshMetrics() {
  if (state.metricsKeyed && !apiKey()) return;
  let samples;
  try {
    samples = parseMetrics(await (await api("/metrics")).text());
  } catch (error) {
    if (error.status === 401 || error.status === 403) state.metricsKeyed = true;
    $("tiers").textContent = `metrics: ${error.message}`;
    return;
  }
  const now = performance.now() / 1000;
  const tokens = total(samples, "adapter_server_completion_tokens_total");
  const last = state.lastSample;
  const rate = last ? Math.max(0, (tokens - last.tokens) / (now - last.t)) : 0;
  state.lastSample = { t: now, tokens };
  const queue = total(samples, "adapter_server_queue_depth");
  const running = total(samples, "adapter_server_running_requests");
  const device = (l) => l.tier === "device";
  const hits = total(samples, "adapter_server_adapter_cache_hits_total", device);
  const misses = total(samples, "adapter_server_adapter_cache_misses_total", device);
  const hitRate = hits + misses > 0 ? hits / (hits + misses) : null;
  $("throughput").textContent = rate.toFixed(1);
  $("queue").textContent = queue;
  $("running").textContent = running;
  $("hit-rate").textContent = hitRate === null ? "–" : `${(100 * hitRate).toFixed(0)} %`;
  $("requests").textContent = total(samples, "adapter_server_engine_requests_total");
  $("tokens").textContent = tokens;
  const loads = (src) => total(samples, "adapter_server_adapter_loads_total", (l) => l.source === src);
  $("tiers").textContent = `loads from host ${loads("host")}, from disk ${loads("disk")}`;
  push(state.history.throughput, rate);
  push(state.history.queue, queue);
  push(state.history.hit, hitRate === null ? 0 : hitRate);
  drawChart($("throughput-chart"), state.history.throughput);
  drawChart($("queue-chart"), state.history.queue, 1);
  drawChart($("hit-chart"), state.history.hit, 1);
}

// ------------------------------------------------------------------ adapters, merge, reset
async function refreshAdapters() {
  if (state.needKey && !apiKey()) return;
  let adapters, merged;
  try {
    adapters = (await (await api("/v1/adapters")).json()).data;
    merged = (await (await api("/v1/merge")).json()).merged;
  } catch (error) {
    explain(error, "listing adapters");
    return;
  }
  $("merged-state").textContent = `merged: ${merged || "none"}`;
  $("merged-state").dataset.merged = merged || "";
  const rows = adapters.map((a) => {
    const tr = document.createElement("tr");
    tr.dataset.name = a.id;
    tr.append(cell(a.id, "name"), cell(a.method), cell(a.format), cell(a.parameters.toLocaleString("en"), "num"),
      cell(bytes(a.bytes), "num"), cell(a.location || "–", `tier ${a.location || ""}`), cell(a.pinned ? "yes" : "no"),
      cell(a.merged ? "yes" : "no", a.merged ? "merged" : ""), cell(String(a.requests_served), "num"));
    const actions = document.createElement("td");
    actions.append(button("Merge", () => merge(a.id)), button("Delete", (e) => remove(a.id, e.target)));
    tr.append(actions);
    return tr;
  });
  if (!rows.length) rows.push(Object.assign(document.createElement("tr"), { innerHTML: '<td colspan="10" class="muted">no adapters yet: upload one below</td>' }));
  $("adapter-rows").replaceChildren(...rows);
  $("adapter-names").replaceChildren(...adapters.map((a) => Object.assign(document.createElement("option"), { value: a.id })));
  [1, 2].forEach((i) => { // offer the first adapters in the playground until the user picks
    const pick = $(`pick-${i}`);
    if (!pick.value && !pick.dataset.touched && adapters[i - 1]) pick.value = adapters[i - 1].id;
  });
}

async function merge(name) {
  try {
    await postJson("/v1/merge", { adapter: name });
    say(`merged ${name} into the base weights`);
  } catch (error) {
    explain(error, `merging ${name}`);
  }
  refreshAdapters();
}

async function reset() {
  try {
    await api("/v1/merge/reset", { method: "POST" });
    say("base weights restored");
  } catch (error) {
    explain(error, "reset");
  }
  refreshAdapters();
}

async function remove(name, target) {
  if (target.dataset.armed !== "1") { // a second click within 3 s confirms
    target.dataset.armed = "1";
    target.textContent = "Sure?";
    setTimeout(() => { target.dataset.armed = ""; target.textContent = "Delete"; }, 3000);
    return;
  }
  try {
    await api(`/v1/adapters/${encodeURIComponent(name)}`, { method: "DELETE" });
    say(`deleted ${name}`);
  } catch (error) {
    explain(error, `deleting ${name}`);
  }
  refreshAdapters();
}

$("reset").addEventListener("click", reset);
[1, 2].forEach((i) => $(`pick-${i}`).addEventListener("input", (e) => { e.target.dataset.touched = "1"; }));

// ------------------------------------------------------------------ playground
function requestFor(spec, prompt) {
  const names = spec.split("+").map((s) => s.trim()).filter(Boolean);
  const body = {
    model: names.length === 1 ? names[0] : state.baseModel,
    prompt,
    max_tokens: Number($("max-tokens").value) || 64,
    temperature: Number($("temperature").value) || 0,
    stream: true,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (names.length > 1) body.adapters = names;
  return body;
}

async function streamInto(out, body) {
  out.textContent = "";
  out.dataset.chunks = "0";
  out.classList.remove("error");
  out.classList.add("streaming");
  try {
    const response = await api("/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          if (payload === "[DONE]") continue;
          const chunk = JSON.parse(payload);
          if (chunk.error) throw new ApiError(0, chunk.error.message);
          if (chunk.choices && chunk.choices.length) {
            out.textContent += chunk.choices[0].text;
            out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
          }
        }
      }
    }
  } catch (error) {
    out.classList.add("error");
    out.textContent += `\n[${error.message}]`;
    if (error.status === 401) explain(error, "completion");
  } finally {
    out.classList.remove("streaming");
  }
}

$("play-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const prompt = $("prompt").value;
  const runs = [0, 1, 2].map((i) => {
    const spec = i === 0 ? state.baseModel : $(`pick-${i}`).value.trim();
    const out = $(`out-${i}`);
    if (!spec) { out.textContent = ""; return null; }
    return streamInto(out, requestFor(spec, prompt));
  });
  $("run").disabled = true;
  await Promise.all(runs.filter(Boolean));
  $("run").disabled = false;
  refreshAdapters();
});

// ------------------------------------------------------------------ upload
const ARCHIVE = /\.(zip|tar\.gz|tgz)$/i;

function readEntries(reader) {
  return new Promise((resolve, reject) => reader.readEntries(resolve, reject));
}

async function filesOf(entry, prefix = "") {
  // a dropped folder: every file below it, named by its path inside the folder
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    return [{ path: prefix + entry.name, file }];
  }
  const reader = entry.createReader();
  const found = [];
  for (let batch = await readEntries(reader); batch.length; batch = await readEntries(reader)) {
    for (const child of batch) found.push(...await filesOf(child, `${prefix}${entry.name}/`));
  }
  return found;
}

async function droppedFiles(dataTransfer) {
  // [{path, file}] with paths relative to the adapter folder, and the folder's name if one was dropped
  const items = [...(dataTransfer.items || [])].filter((i) => i.kind === "file");
  const entries = items.map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null));
  if (entries.length === 1 && entries[0] && entries[0].isDirectory) {
    const folder = entries[0];
    const files = [];
    const reader = folder.createReader();
    for (let batch = await readEntries(reader); batch.length; batch = await readEntries(reader)) {
      for (const child of batch) files.push(...await filesOf(child));
    }
    return { folder: folder.name, files };
  }
  return { folder: "", files: [...dataTransfer.files].map((file) => ({ path: file.name, file })) };
}

function upload(name, files) {
  const form = new FormData();
  form.append("name", name);
  if (files.length === 1 && ARCHIVE.test(files[0].path)) form.append("archive", files[0].file, files[0].path);
  else for (const { path, file } of files) form.append("files", file, path);
  const bar = $("upload-progress");
  const status = $("upload-state");
  bar.hidden = false;
  bar.value = 0;
  status.textContent = `uploading ${name}…`;
  const xhr = new XMLHttpRequest(); // fetch cannot report upload progress
  xhr.open("POST", "/v1/adapters");
  for (const [k, v] of Object.entries(withKey())) xhr.setRequestHeader(k, v);
  xhr.upload.onprogress = (e) => {
    if (!e.lengthComputable) return;
    bar.value = e.loaded / e.total;
    status.textContent = `uploading ${name}: ${bytes(e.loaded)} / ${bytes(e.total)}`;
  };
  xhr.onload = () => {
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
    if (xhr.status === 201) {
      bar.value = 1;
      status.textContent = `uploaded ${name}: ${body.method}, ${body.format}, ${bytes(body.bytes)}`;
      say("");
    } else {
      status.textContent = `upload of ${name} failed (${xhr.status})`;
      explain(new ApiError(xhr.status, (body.error && body.error.message) || `HTTP ${xhr.status}`), `uploading ${name}`);
    }
    refreshAdapters();
  };
  xhr.onerror = () => { status.textContent = `upload of ${name} failed: the connection broke`; };
  xhr.send(form);
}

async function startUpload(picked) {
  const name = $("upload-name").value.trim() || picked.folder.replace(/[^A-Za-z0-9._-]/g, "-");
  if (!picked.files.length) return;
  if (!name) { say("give the adapter a name first (the name field above the drop zone)", "error"); return; }
  upload(name, picked.files);
}

const drop = $("drop");
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", async (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  startUpload(await droppedFiles(e.dataTransfer));
});
$("upload-files").addEventListener("change", (e) => {
  startUpload({ folder: "", files: [...e.target.files].map((file) => ({ path: file.name, file })) });
  e.target.value = "";
});

// ------------------------------------------------------------------ main loop
async function refresh() {
  await refreshHealth();
  await Promise.all([refreshMetrics(), refreshAdapters()]);
}

showKeyState();
refresh();
setInterval(refresh, POLL_MS);
