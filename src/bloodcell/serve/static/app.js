// The bloodcell page: upload images to /v1/predict, show a filterable table, Grad-CAM on click, CSV download.
// Plain JavaScript, no framework, no build step; every server string is inserted as text, never as HTML.
"use strict";

const state = { rows: [], uploaded: 0, model: null, token: sessionStorage.getItem("bloodcell-token") || "", selected: null };
const $ = (id) => document.getElementById(id);

function headers() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (res.status === 401) {
    askToken(state.token ? "wrong token" : "");
    throw new Error("the server needs its token");
  }
  if (!res.ok) {
    let msg = res.status + " " + res.statusText;
    try { msg = (await res.json()).detail || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return res;
}

function askToken(message) {
  $("token-form").hidden = false;
  $("token-error").textContent = message || "";
  $("token-input").focus();
}

async function loadModel() {
  try {
    state.model = await (await api("/v1/model")).json();
  } catch (e) {
    $("model-info").textContent = e.message;
    return;
  }
  $("token-form").hidden = true;
  const m = state.model;
  $("model-info").textContent = `${m.name} · ${m.classes.length} classes · ${m.engine}` +
    (m.calibrated ? " · calibrated" : "");
  const sel = $("filter-class");
  const ex = $("explain-class");
  sel.length = 1;
  ex.length = 0;
  ex.add(new Option("predicted class", ""));
  for (const c of m.classes) { sel.add(new Option(c, c)); ex.add(new Option(c, c)); }
}

async function upload(files) {
  files = [...files];
  if (!files.length) return;
  if (!state.model) { await loadModel(); if (!state.model) return; }
  const maxBytes = state.model.limits.max_file_bytes;
  for (const f of files.filter((x) => x.size > maxBytes)) {  // refused here rather than failing a whole request
    addRow(f, { filename: f.name, error: `over the server's limit of ${(maxBytes / 1048576).toFixed(1)} MB per file`,
      top: [] });
  }
  files = files.filter((x) => x.size <= maxBytes);
  files.forEach((f) => { f.order = state.uploaded++; });
  render();
  if (!files.length) return;
  const per = Math.max(1, Math.min(16, state.model.limits.max_files));
  let done = 0;
  $("progress").textContent = `classifying ${files.length} image(s)…`;
  const chunks = [];
  for (let i = 0; i < files.length; i += per) chunks.push(files.slice(i, i + per));
  const send = async (chunk) => {
    const form = new FormData();
    for (const f of chunk) form.append("files", f, f.name);
    let out;
    try {
      out = await (await api("/v1/predict?top_k=3", { method: "POST", body: form })).json();
    } catch (e) {
      out = { results: chunk.map((f, i) => ({ index: i, filename: f.name, error: e.message, top: [] })) };
    }
    out.results.forEach((r, i) => addRow(chunk[i], r));
    done += chunk.length;
    $("progress").textContent = `classified ${done} of ${files.length}`;
    render();
  };
  const queue = chunks.slice();
  const lanes = Array.from({ length: Math.min(2, queue.length) }, async () => {
    while (queue.length) await send(queue.shift());
  });
  await Promise.all(lanes);
  $("progress").textContent = `classified ${done} image(s)`;
  $("results").dataset.ready = "true";
}

function addRow(file, r) {
  state.rows.push({ file, r, url: URL.createObjectURL(file), id: state.rows.length, order: file.order ?? 1e12 });
  state.rows.sort((a, b) => a.order - b.order);  // upload order, whichever request answers first
}

function needsReview(r) {
  return !r.error && (r.review === true || r.out_of_distribution === true);
}

function visibleRows() {
  const cls = $("filter-class").value;
  const review = $("filter-review").checked;
  return state.rows.filter(({ r }) => (!cls || r.class === cls) && (!review || needsReview(r) || r.error));
}

function flagSpan(text, kind, title) {
  const s = document.createElement("span");
  s.className = "flag " + kind;
  s.textContent = text;
  if (title) s.title = title;
  return s;
}

function render() {
  const body = $("results").tBodies[0];
  body.replaceChildren();
  const rows = visibleRows();
  for (const row of rows) {
    const { r } = row;
    const tr = body.insertRow();
    tr.dataset.id = row.id;
    tr.dataset.class = r.class || "";
    if (state.selected === row.id) tr.className = "selected";
    const img = document.createElement("img");
    img.src = row.url;
    img.alt = "";
    const t = tr.insertCell(); t.className = "thumb"; t.append(img);
    const f = tr.insertCell(); f.className = "file"; f.textContent = r.filename; f.title = r.filename;
    const c = tr.insertCell(); c.className = "cls";
    const p = tr.insertCell(); p.className = "prob";
    const fl = tr.insertCell(); fl.className = "flags";
    if (r.error) {
      c.textContent = "—";
      fl.append(flagSpan("error", "ood", r.error));
      const e = document.createElement("span"); e.className = "error"; e.textContent = " " + r.error; fl.append(e);
      continue;
    }
    c.textContent = r.class;
    const bar = document.createElement("span"); bar.className = "bar";
    const fill = document.createElement("span"); fill.style.width = (100 * r.probability).toFixed(1) + "%";
    bar.append(fill);
    p.append(bar, document.createTextNode(r.probability.toFixed(3)));
    p.title = r.top.map((x) => `${x.class} ${x.probability.toFixed(3)}`).join(", ");
    if (r.out_of_distribution === true) fl.append(flagSpan("not a cell?", "ood", "unlike the training images"));
    if (r.review === true) fl.append(flagSpan("review", "review", "confidence below the review threshold"));
    if (r.conformal_set && r.conformal_set.length > 1) fl.append(flagSpan("set: " + r.conformal_set.join(" / "), "warn"));
    for (const w of r.warnings || []) fl.append(flagSpan("warning", "warn", w));
  }
  const total = state.rows.length;
  const review = state.rows.filter(({ r }) => needsReview(r)).length;
  const errors = state.rows.filter(({ r }) => r.error).length;
  $("summary").textContent = `${rows.length} shown of ${total} · ${review} need review · ${errors} error(s)`;
  $("controls").hidden = total === 0;
  $("results").hidden = total === 0;
}

async function explain(id) {
  const row = state.rows.find((x) => x.id === id);
  if (!row || row.r.error) return;
  state.selected = id;
  render();
  const aside = $("explain");
  aside.hidden = false;
  $("explain-title").textContent = row.r.filename;
  if (!state.model.explain) { $("explain-status").textContent = "Grad-CAM needs the run folder (this is a bundle)"; return; }
  $("explain-status").textContent = "computing Grad-CAM…";
  $("explain-img").removeAttribute("src");
  const form = new FormData();
  form.append("file", row.file, row.file.name);
  const cls = $("explain-class").value;
  if (cls) form.append("class", cls);
  try {
    const res = await api("/v1/explain", { method: "POST", body: form });
    const blob = await res.blob();
    $("explain-img").src = URL.createObjectURL(blob);
    $("explain-status").textContent = `Grad-CAM for ${res.headers.get("X-Bloodcell-Class")} ` +
      `(p = ${Number(res.headers.get("X-Bloodcell-Probability")).toFixed(3)})`;
  } catch (e) {
    $("explain-status").textContent = e.message;
  }
}

function csvCell(v) {
  const s = v === null || v === undefined ? "" : String(v);
  const safe = /^[=+\-@\t\r]/.test(s) ? "'" + s : s;  // a spreadsheet must not run a file name as a formula
  return /[",\n\r]/.test(safe) ? '"' + safe.replace(/"/g, '""') + '"' : safe;
}

function downloadCsv() {
  const k = Math.max(1, ...state.rows.map(({ r }) => (r.top || []).length));
  const head = ["filename", "class", "probability", "status", "review", "out_of_distribution", "error", "warnings"];
  for (let i = 1; i <= k; i++) head.push(`class${i}`, `prob${i}`);
  const lines = [head.join(",")];
  for (const { r } of visibleRows()) {
    const cells = [r.filename, r.class, r.probability, r.status, r.review, r.out_of_distribution, r.error,
      (r.warnings || []).join("; ")];
    for (let i = 0; i < k; i++) { const t = (r.top || [])[i]; cells.push(t ? t.class : "", t ? t.probability : ""); }
    lines.push(cells.map(csvCell).join(","));
  }
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }));
  a.download = "bloodcell-results.csv";
  document.body.append(a);
  a.click();
  a.remove();
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files); });
  $("file-input").addEventListener("change", (e) => { upload(e.target.files); e.target.value = ""; });
  $("filter-class").addEventListener("change", render);
  $("filter-review").addEventListener("change", render);
  $("download-csv").addEventListener("click", downloadCsv);
  $("clear").addEventListener("click", () => {
    state.rows.forEach((x) => URL.revokeObjectURL(x.url));
    state.rows = []; state.selected = null; $("explain").hidden = true; render();
  });
  $("results").tBodies[0].addEventListener("click", (e) => {
    const tr = e.target.closest("tr");
    if (tr) explain(Number(tr.dataset.id));
  });
  $("explain-class").addEventListener("change", () => { if (state.selected !== null) explain(state.selected); });
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value.trim();
    sessionStorage.setItem("bloodcell-token", state.token);
    loadModel();
  });
  loadModel();
});
