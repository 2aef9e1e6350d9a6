// tokenline's page: vanilla ES modules, no build step, served by central, nothing from the internet.
// Views (#search, #latest, #sets, #devices, and #flagged when central scores frames) share the filter bar and the detail.
import { getJson, postForm, query, token } from "./api.js";
import { openDetail, initDetail, setMe } from "./detail.js";
import { showDevices } from "./devices.js";
import { filterParams, loadFilters, models, refreshPlaces, selectedModel, showZone } from "./filters.js";
import { Pager, frameCard, retime } from "./grid.js";
import { initAnomaly } from "./anomaly.js";
import { initSets } from "./sets.js";
import { fromUs, zone } from "./time.js";

const $ = (id) => document.getElementById(id);
const views = ["search", "latest", "flagged", "sets", "devices"];
export const state = { view: "search", query: null };

const modelOf = (item) => models.find((m) => m.id === item.model_id) || selectedModel();
const open = (item) => openDetail(item, modelOf(item), { likeFrame, searchWith });
const search = new Pager("search", (hit) => frameCard(hit, modelOf(hit), open));
const latest = new Pager("latest", (f) => frameCard(f, modelOf(f), open));

function setQueryPanel(q) {
  const panel = $("query-panel"), view = $("query-view"), text = $("query-text");
  view.textContent = ""; text.textContent = "";
  if (!q) { panel.hidden = true; return; }
  panel.hidden = false;
  if (q.image) {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(q.image); img.alt = "query image"; img.id = "query-image";
    view.appendChild(img);
    text.textContent = q.image.name;
  } else if (q.like) {
    view.appendChild(frameCard(q.likeItem || { frame_id: q.like, site: "", line: "", camera: "", capture_us: null },
      q.likeItem ? modelOf(q.likeItem) : null, open));
    text.textContent = q.caption || `like frame ${q.like}`;
  } else if (q.text) {
    text.textContent = `“${q.text}”`;
  }
  for (const extra of queryRenderers) extra(q, view, text);
}
export const queryRenderers = [];  // features draw their query (a region, a crop) beside the results

// The current query: exactly one of an image, a text, a stored frame (plus what features add, e.g. a region).
function readQuery() {
  const file = $("image").files[0], q = $("q").value.trim(), like = $("like").value.trim();
  if (file) return { image: file };
  if (q) return { text: q };
  if (like) return { like };
  return null;
}

export async function runSearch(query) {
  const q = query || readQuery();
  state.query = q;
  setQueryPanel(q);
  if (!q) { search.clear(); search.setStatus("choose an image, type a text or give a frame id", true); return; }
  const f = filterParams();
  if (q.fetchPage) { await search.start((cursor) => q.fetchPage(f, cursor), q.label || "results"); return; }
  const fields = Object.assign({ k: 24, rerank: $("rerank").checked ? "true" : "false" }, f, q.fields || {});
  if (q.image) fields.image = q.image; else if (q.text) fields.q = q.text; else if (q.like) { fields.like_frame = q.like; delete fields.model_id; }
  for (const hook of searchHooks) hook(fields);
  await search.start(async (cursor) => {
    const j = await postForm(q.route || "/v1/search", Object.assign({}, fields, cursor ? { cursor } : {}));
    return { items: j.results, next_cursor: j.next_cursor, note: `${j.took_ms} ms · ${j.model.name} ${j.model.short_hash}` };
  }, "results");
}
export const searchHooks = [];  // (fields) => void: features add parameters (sort, score filter, ...)

// Show a query's results in the search view. A feature's query brings its own fetchPage(filters, cursor) (frames
// like a region, ...) and a label; its query frame is shown beside the results as "like" is.
function searchWith(q) {
  $("image").value = ""; $("q").value = ""; $("like").value = q.like || "";
  go("search");
  runSearch(q);
}

const likeFrame = (item) => searchWith({ like: item.frame_id, likeItem: item });

export async function runLatest() {
  const f = filterParams();
  await latest.start(async (cursor) => {
    const j = await getJson(`/v1/frames?${query(Object.assign({ limit: 48 }, f, cursor ? { cursor } : {}))}`);
    return { items: j.frames, next_cursor: j.next_cursor };
  }, "frames, newest first");
}

export const viewHooks = {};  // name -> (active) => void for views features add (flagged)

let shown = 0;   // views shown so far (go)
let starts = 0;  // start() runs: the latest one finishes, an earlier one stops at its next step
let startedWith = null;  // the token the last finished start() ran with

function go(view) {
  shown++;
  if (!views.includes(view)) view = "search";
  state.view = view;
  for (const v of views) $(`view-${v}`).hidden = v !== view;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
  $("filters").hidden = view === "devices";
  showDevices(view === "devices");
  for (const [name, hook] of Object.entries(viewHooks)) hook(view === name);
  if (location.hash !== `#${view}`) history.replaceState(null, "", `#${view}`);
  if (view === "latest") runLatest();
}

async function start() {
  const run = ++starts, seen = shown;
  $("token").value = token.get();
  showZone();
  if (!token.get()) { search.setStatus("enter an API token (viewer role)"); return; }
  try {
    const who = await getJson("/v1/me");
    if (run !== starts) return;  // the token changed meanwhile: the newer start does the rest
    setMe(who);
    $("me").textContent = `${who.name} (${who.role})`;
    await loadFilters();
    for (const hook of startHooks) await hook();
    if (run !== starts) return;
    startedWith = token.get();
    search.setStatus(`${models.length} model(s); search by an image, a text or a frame id`);
    if (shown === seen) go(location.hash.slice(1) || "search");  // a view opened meanwhile is not listed again
  } catch (e) {
    if (run !== starts) return;
    startedWith = null;  // entering the same token again retries
    $("me").textContent = "";
    search.setStatus(`token: ${e.message}`, true);
  }
}
export const startHooks = [];

// the same token again (the field's change event when it loses focus after an entry) does not start over: that
// rebuilt the filter menus under a user already picking from them
$("token").addEventListener("change", () => {
  if ($("token").value === startedWith) return;
  token.set($("token").value);
  start();
});
$("tz").addEventListener("change", () => {
  const since = filterParams().since_us, until = filterParams().until_us;  // the same instants, shown in the new zone
  zone.set($("tz").value);
  $("since").value = fromUs(since); $("until").value = fromUs(until);
  showZone(); retime();
});
$("query").addEventListener("submit", (ev) => { ev.preventDefault(); runSearch(); });
for (const id of ["site", "line"]) $(id).addEventListener("change", refreshPlaces);
$("filters").addEventListener("change", () => {
  if (state.view === "latest") runLatest();
  else if (state.view === "search" && state.query) runSearch(state.query);
  else if (viewHooks[state.view]) viewHooks[state.view](true);
});
$("filters").addEventListener("submit", (ev) => ev.preventDefault());
for (const a of document.querySelectorAll("nav a")) a.addEventListener("click", (ev) => { ev.preventDefault(); go(a.dataset.view); });
window.addEventListener("hashchange", () => go(location.hash.slice(1)));
initDetail();
const anomaly = initAnomaly(modelOf, open);
startHooks.push(anomaly.start);
viewHooks.flagged = anomaly.show;
viewHooks.sets = initSets(anomaly.start).show;
start();
