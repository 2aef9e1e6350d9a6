// Reference sets on the page: the Reference sets view (every set, its bank and threshold), frames marked as good by
// ticking result cards (or from a frame's detail), and "everything from this camera between these times" from the
// filter bar. Marking adds the frames to their camera's set for their model, or creates it; central builds the bank
// after the request, and the page follows the set until it is built. Changing sets needs the admin role; viewers see
// the list.
import { getJson, sendJson } from "./api.js";
import { button, detailActions, role } from "./detail.js";
import { chosenCamera, filterParams, models } from "./filters.js";
import { cardDecorators } from "./grid.js";
import { fmt } from "./time.js";

const $ = (id) => document.getElementById(id);
const selected = new Map();  // frame id -> card item, across views and pages
let sets = [];
let onChange = () => {};     // after a set changed: the Flagged view's hook (central now scores frames)
let busy = false;
const BUILD_POLL_MS = 500;   // how often a set central is building is read again

const place = (x) => `${x.site}/${x.line}/${x.camera}`;
const modelName = (id) => { const m = models.find((x) => x.id === id); return m ? `${m.name} · ${m.short_hash}` : `model ${id}`; };
const thresholdText = (s) => `${s.threshold.toFixed(4)} (${s.threshold_mode === "manual" ? "set by hand" :
  `quantile ${s.quantile}`} · ${s.metric})`;

function setStatus(id, text, error) {
  $(id).textContent = text;
  $(id).className = "status" + (error ? " error" : "");
}

async function loadSets() {
  sets = (await getJson("/v1/reference-sets")).reference_sets;
  return sets;
}

function renderSets() {
  const body = $("sets").querySelector("tbody");
  body.textContent = "";
  for (const s of sets) {
    const tr = document.createElement("tr");
    tr.dataset.setId = s.id;
    const kept = s.bank_version ? `bank of v${s.bank_version} in use` : "no bank yet";
    const state = s.state === "ready" ? "ready" : s.state === "building" ? `building (${kept})` :
      `failed: ${s.build_error} (${kept})`;
    const cells = [s.id, s.name, place(s), modelName(s.model_id), s.frame_count.toLocaleString("en"),
      s.bank_tokens.toLocaleString("en"), s.bank_version ? thresholdText(s) : "–", `v${s.version}`, state,
      fmt(s.updated_us)];
    for (const v of cells) { const td = document.createElement("td"); td.textContent = v; tr.appendChild(td); }
    tr.classList.toggle("failed", s.state === "failed");
    const td = document.createElement("td");
    if (role() === "admin") {
      if (s.state === "failed") td.appendChild(button("Build again", () => buildAgain(s), { className: "build-set" }));
      td.appendChild(button("Delete", () => deleteSet(s), { className: "delete-set" }));
    }
    tr.appendChild(td);
    body.appendChild(tr);
  }
  setStatus("status-sets", sets.length ? `${sets.length} reference set(s)` :
    "no reference set yet: tick good frames in the results, or mark a camera's time range below");
}

async function showSets() {
  try { await loadSets(); renderSets(); } catch (e) { setStatus("status-sets", e.message, true); }
  const admin = role() === "admin";
  $("range-form").hidden = !admin;
  if (admin) rangeHint();
}

async function buildAgain(s) {
  try {
    const built = await whenBuilt(await sendJson("POST", `/v1/reference-sets/${s.id}/build`), (t) => setStatus("status-sets", t));
    await loadSets(); renderSets();
    setStatus("status-sets", `set ${built.id}: bank of ${built.bank_tokens.toLocaleString("en")} tokens built`);
  } catch (e) {
    await loadSets().then(renderSets, () => {});
    setStatus("status-sets", e.message, true);
  }
}

async function deleteSet(s) {
  if (!window.confirm(`Delete reference set ${s.id} “${s.name}” (${place(s)}) and every score made against it?`)) return;
  try {
    await sendJson("DELETE", `/v1/reference-sets/${s.id}`);
    await loadSets(); renderSets(); onChange();
    setStatus("status-sets", `deleted reference set ${s.id} “${s.name}”`);
  } catch (e) { setStatus("status-sets", e.message, true); }
}

// A set central is building a bank for, once built (polled): the set, or an error saying why its build failed.
async function whenBuilt(s, progress) {
  const t0 = Date.now();
  while (s.state === "building") {
    progress(`${place(s)}: building the bank of ${s.frame_count.toLocaleString("en")} frames… ` +
      `${Math.round((Date.now() - t0) / 1000)} s`);
    await new Promise((resolve) => setTimeout(resolve, BUILD_POLL_MS));
    s = await getJson(`/v1/reference-sets/${s.id}`);
  }
  if (s.state === "failed") throw new Error(`set ${s.id}: ${s.build_error}`);
  return s;
}

// Add frames (ids, or a time range) to the camera's set for the model, or create it; central builds its bank,
// and the line for the status comes once it is built.
async function markGood(key, body, count, progress = () => {}) {
  const existing = sets.find((s) => s.model_id === key.model_id && s.site === key.site && s.line === key.line &&
    s.camera === key.camera);
  if (existing) {
    const s = await whenBuilt(await sendJson("PATCH", `/v1/reference-sets/${existing.id}`,
      body.frame_ids ? { add_frame_ids: body.frame_ids } : { since_us: body.since_us, until_us: body.until_us }), progress);
    return `${place(s)}: ${count} added to set ${s.id} “${s.name}” (v${s.version}, ${s.frame_count} frames)`;
  }
  const s = await whenBuilt(await sendJson("POST", "/v1/reference-sets", Object.assign({ name: `${place(key)} good`,
    model_id: key.model_id, site: key.site, line: key.line, camera: key.camera }, body)), progress);
  return `${place(s)}: new set ${s.id} “${s.name}” (${s.frame_count} frames, threshold ${s.threshold.toFixed(4)})`;
}

// The ticked frames, grouped by camera and model: one request each; a camera's error does not stop the others.
async function markSelected() {
  if (busy || !selected.size) return;
  busy = true;
  $("sel-good").disabled = true;
  const groups = new Map();
  for (const item of selected.values()) {
    const k = JSON.stringify([item.model_id, item.site, item.line, item.camera]);
    if (!groups.has(k)) groups.set(k, []);
    groups.get(k).push(item.frame_id);
  }
  setStatus("sel-status", `marking ${selected.size} frame(s) as good (central builds each bank)…`);
  const lines = [];
  let failed = false;
  try {
    await loadSets();
    for (const [k, ids] of groups) {
      const [model_id, site, line, camera] = JSON.parse(k);
      try {
        lines.push(await markGood({ model_id, site, line, camera }, { frame_ids: ids }, `${ids.length} frame(s)`,
          (text) => setStatus("sel-status", [...lines, text].join(" · "))));
        for (const id of ids) unselect(id);
      } catch (e) {
        failed = true;
        lines.push(`${site}/${line}/${camera}: ${e.message}`);
      }
    }
    await loadSets();
    if (!$("view-sets").hidden) renderSets();
  } catch (e) {
    failed = true;
    lines.push(e.message);
  } finally {
    busy = false;
    $("sel-good").disabled = false;
    setStatus("sel-status", lines.join(" · "), failed);
    showBar();
    onChange();
  }
}

// "Everything from this camera between these times": the filter bar's model, camera and time range.
function rangeHint() {
  const f = filterParams(), cam = chosenCamera();
  const ok = f.model_id && cam && (f.since_us || f.until_us);
  $("range-good").disabled = !ok;
  $("range-what").textContent = ok ? `${place(cam)}, ${f.since_us ? fmt(f.since_us) : "the first frame"} ` +
    `to ${f.until_us ? fmt(f.until_us) : "now"}, ${modelName(Number(f.model_id))}` :
    "choose a model, a camera and a time range (From / To) in the filter bar";
}

async function markRange() {
  if (busy) return;
  const f = filterParams(), cam = chosenCamera();
  if (!cam) return;
  busy = true;
  $("range-good").disabled = true;
  setStatus("status-sets", "marking the time range as good (central builds the bank)…");
  try {
    await loadSets();
    const body = {};
    if (f.since_us) body.since_us = f.since_us;
    if (f.until_us) body.until_us = f.until_us;
    const text = await markGood(Object.assign({ model_id: Number(f.model_id) }, cam), body, "the range's frames",
      (t) => setStatus("status-sets", t));
    await loadSets(); renderSets();
    setStatus("status-sets", text);
    onChange();
  } catch (e) {
    setStatus("status-sets", e.message, true);
  } finally {
    busy = false;
    rangeHint();
  }
}

function showBar() {
  $("sel-count").textContent = selected.size ? `${selected.size} frame(s) ticked as good` : "";
  $("sel-good").hidden = $("sel-clear").hidden = !selected.size;
  $("selection").hidden = !selected.size && !$("sel-status").textContent;
}

function unselect(id) {
  selected.delete(id);
  for (const box of document.querySelectorAll(`.card[data-frame-id="${id}"] input.good`)) box.checked = false;
}

// Card decorator (admins): a "good" tick box; ticking never opens the detail.
function decorate(card, item) {
  if (role() !== "admin" || !item.frame_id || item.model_id === undefined) return;
  const label = document.createElement("label");
  label.className = "good";
  label.title = "tick frames of normal production, then “Mark as good” adds them to their camera's reference set";
  const box = document.createElement("input");
  box.type = "checkbox"; box.className = "good"; box.checked = selected.has(item.frame_id);
  box.addEventListener("change", () => {
    if (box.checked) selected.set(item.frame_id, item); else selected.delete(item.frame_id);
    for (const b of document.querySelectorAll(`.card[data-frame-id="${item.frame_id}"] input.good`)) b.checked = box.checked;
    setStatus("sel-status", "");
    showBar();
  });
  label.addEventListener("click", (ev) => ev.stopPropagation());
  label.append(box, " good");
  card.querySelector(".meta").appendChild(label);
}

// Detail action (admins): this one frame as good.
function detailAction(ctx) {
  if (role() !== "admin" || ctx.hit.model_id === undefined) return [];
  return [{ label: "Mark as good", id: "mark-good", run: async () => {
    const h = ctx.hit;
    try {
      await loadSets();
      ctx.addField("reference set", await markGood(h, { frame_ids: [h.frame_id] }, "this frame",
        (t) => { $("detail-status").textContent = t; }));
      $("detail-status").textContent = "";
      onChange();
    } catch (e) { ctx.addField("reference set", e.message); }
  } }];
}

// Wires the view, the tick boxes and the detail action; returns the hooks main.js calls (show).
export function initSets(changed) {
  onChange = changed;
  cardDecorators.push(decorate);
  detailActions.push(detailAction);
  $("sel-good").addEventListener("click", markSelected);
  $("sel-clear").addEventListener("click", () => { for (const id of [...selected.keys()]) unselect(id); setStatus("sel-status", ""); showBar(); });
  $("range-good").addEventListener("click", markRange);
  $("range-form").addEventListener("submit", (ev) => ev.preventDefault());
  $("filters").addEventListener("change", () => { if (!$("view-sets").hidden) rangeHint(); });
  return { show: (active) => { if (active) showSets(); } };
}
