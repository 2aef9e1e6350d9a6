// The shared filter bar: model, site, line, camera as menus filled from what central stores; the time range in
// the page's one time zone. Search and the latest-frames view read the same filters.
import { getJson } from "./api.js";
import { fmt, toUs, zone } from "./time.js";

const $ = (id) => document.getElementById(id);
let cameras = [];
export let models = [];

const shortDate = (us) => fmt(us).slice(0, 10);

// "name · 1a2b3c4d · 2026-03-01 · 1,234 frames": two exports of one checkpoint share a name, not a hash.
export function modelLabel(m) {
  return `${m.name} · ${m.short_hash} · ${shortDate(m.registered_us)} · ${m.frames.toLocaleString("en")} frames` +
    (m.has_text ? " · text" : "");
}

function fill(sel, values, keep) {
  const prev = keep ? sel.value : "";
  sel.textContent = "";
  const all = document.createElement("option");
  all.value = ""; all.textContent = "all";
  sel.appendChild(all);
  for (const [value, label] of values) {
    const o = document.createElement("option");
    o.value = value; o.textContent = label;
    sel.appendChild(o);
  }
  sel.value = values.some(([v]) => v === prev) ? prev : "";
}

export function refreshPlaces() {
  const site = $("site").value, line = $("line").value;
  const uniq = (xs) => [...new Set(xs)].sort();
  fill($("site"), uniq(cameras.map((c) => c.site)).map((s) => [s, s]), true);
  const inSite = cameras.filter((c) => !$("site").value || c.site === $("site").value);
  fill($("line"), uniq(inSite.map((c) => c.line)).map((l) => [l, l]), site === $("site").value);
  const inLine = inSite.filter((c) => !$("line").value || c.line === $("line").value);
  fill($("camera"), uniq(inLine.map((c) => c.camera)).map((c) => [c, `${c} (${inLine.filter((x) => x.camera === c)
    .reduce((n, x) => n + x.frames, 0).toLocaleString("en")})`]), line === $("line").value);
}

export async function loadFilters() {
  const [m, c] = await Promise.all([getJson("/v1/models"), getJson("/v1/cameras")]);
  models = m.models;
  cameras = c.cameras;
  const sel = $("model");
  const prev = sel.value;
  sel.textContent = "";
  for (const x of models) {
    const o = document.createElement("option");
    o.value = x.id; o.textContent = modelLabel(x);
    sel.appendChild(o);
  }
  // default: the model whose frames are the newest (a fresh export answers "0 results" for older frames)
  const newest = [...models].sort((a, b) => (b.last_capture_us || 0) - (a.last_capture_us || 0))[0];
  sel.value = models.some((x) => String(x.id) === prev) ? prev : newest ? String(newest.id) : "";
  refreshPlaces();
}

export function selectedModel() {
  return models.find((m) => String(m.id) === $("model").value) || null;
}

// The filters as API parameters (empty ones left out).
export function filterParams() {
  return {
    model_id: $("model").value, site: $("site").value, line: $("line").value, camera: $("camera").value,
    since_us: toUs($("since").value), until_us: toUs($("until").value),
    label: $("labels").value.trim().split(/\s+/).filter(Boolean),
  };
}

// The camera the menus name, {site, line, camera}: the camera menu's choice, its site and line from the menus or,
// when they say "all", from the one place that has a camera of that name (null when none is chosen or it is ambiguous).
export function chosenCamera() {
  const site = $("site").value, line = $("line").value, camera = $("camera").value;
  if (!camera) return null;
  const at = cameras.filter((c) => c.camera === camera && (!site || c.site === site) && (!line || c.line === line));
  const places = new Set(at.map((c) => `${c.site}/${c.line}`));
  return places.size === 1 ? { site: at[0].site, line: at[0].line, camera } : null;
}

export function showZone() {
  $("tzname").textContent = zone.name();
  $("tz-local").textContent = `local (${zone.localName})`;
  $("tz").value = zone.get();
}
