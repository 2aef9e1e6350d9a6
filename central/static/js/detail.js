// The detail of one frame: the original with its regions, every stored field, the original's state and legal
// hold, a download, "request from edge" with its progress when central has no original, and the actions
// features add (find frames like this, like this region, ...).
import { api, getJson, imageUrl, sendJson } from "./api.js";
import { figure, itemRegions } from "./overlay.js";
import { fmt } from "./time.js";

const $ = (id) => document.getElementById(id);
// (ctx) => [{label, id, run}] (or a promise of them) for features (region search, anomaly, ...); a provider may add
// fields (ctx.addField) and regions (ctx.figure.addRegions) while ctx.current() says the detail still shows ctx's frame.
export const detailActions = [];
let me = { role: "viewer" };
let polling = null;
let shown = null;  // the ctx of the frame the detail shows

export function setMe(who) { me = who; }
export const role = () => me.role;

// A button that runs ``run`` on click; ``props`` are set on it (id, className, ...).
export function button(label, run, props = {}) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = label;
  Object.assign(b, props);
  b.addEventListener("click", run);
  return b;
}

function status(text, error) {
  const s = $("detail-status");
  s.textContent = text;
  s.className = "status" + (error ? " error" : "");
}

function fieldRows(doc, hit) {
  const rows = [];
  const f = doc.frame || {};
  const o = doc.original;
  const add = (k, v) => rows.push([k, v]);
  add("frame id", f.frame_id || hit.frame_id);
  for (const k of ["site", "line", "camera", "device", "model_id", "seq", "token_dtype", "k", "flags"]) {
    if (f[k] !== undefined) add(k, String(f[k]));
  }
  if (f.capture_us !== undefined) add("captured", fmt(f.capture_us));
  if (f.received_us !== undefined) add("received", fmt(f.received_us));
  for (const [k, v] of Object.entries(f)) {  // fields other modules add (labels, source, scores, ...)
    if (!["frame_id", "site", "line", "camera", "device", "model_id", "seq", "token_dtype", "k", "flags", "capture_us",
          "received_us", "centroids", "sizes", "legal_hold"].includes(k) && v !== null && v !== undefined) {
      add(k, typeof v === "object" ? JSON.stringify(v) : String(v));
    }
  }
  add("legal hold", (f.legal_hold || (o && o.legal_hold)) ? "held: kept until released" : "no");
  if (o) {
    add("original", o.state + (o.deleted_reason ? ` (${o.deleted_reason})` : ""));
    add("original bytes", o.bytes.toLocaleString("en"));
    add("stored at central", fmt(o.stored_us));
    add(o.state === "kept" ? "expires" : "was to expire", fmt(o.expires_us));
  } else {
    add("original", "not at central");
  }
  if (hit.score !== undefined) {
    add("score", `${hit.score.toFixed(4)} (global ${hit.global_score.toFixed(4)}` +
      (hit.maxsim === null || hit.maxsim === undefined ? ")" : `, MaxSim ${hit.maxsim.toFixed(4)})`));
    for (const m of hit.matches || []) add(`match: token ${m.token}`, `similarity ${m.sim}, centroid (${m.x}, ${m.y}), ${m.size} patches`);
  }
  return rows;
}

function addField(k, v) {
  const tr = document.createElement("tr");
  const th = document.createElement("th"); th.textContent = k;
  const td = document.createElement("td"); td.textContent = v;
  tr.append(th, td); $("detail-fields").appendChild(tr);
}

async function download(frameId) {
  const r = await api(`/v1/frames/${frameId}/original?download=true`);
  const cd = r.headers.get("content-disposition") || "";
  const name = (cd.match(/filename="([^"]+)"/) || [])[1] || `${frameId}.jpg`;
  const a = document.createElement("a");
  a.href = URL.createObjectURL(await r.blob());
  a.download = name;
  a.id = "download-link";
  document.body.appendChild(a);
  a.click();
  setTimeout(() => a.remove(), 1000);
}

const STATES = {
  requested: "command sent to the edge; waiting for the upload",
  queued_on_edge: "the edge queued the upload",
  stored: "the original arrived",
};

async function requestOriginal(ctx) {
  clearInterval(polling);
  const show = (p) => status(`request from edge: ${p.state} · ${p.detail || STATES[p.state] || ""}`,
    ["failed", "not_on_edge", "device_offline", "no_answer", "deleted"].includes(p.state));
  try {
    let p = await (await api(`/v1/frames/${ctx.frameId}/original/request`, { method: "POST" })).json();
    show(p);
    polling = setInterval(async () => {
      try {
        p = await getJson(`/v1/frames/${ctx.frameId}/original/request`);
        show(p);
        if (p.state === "stored") { clearInterval(polling); ctx.reload(); }
        else if (!["requested", "queued_on_edge"].includes(p.state)) clearInterval(polling);
      } catch (e) { clearInterval(polling); status(e.message, true); }
    }, 1000);
  } catch (e) { status(e.message, true); }
}

export async function openDetail(hit, model, hooks) {
  clearInterval(polling);
  const ctx = { frameId: hit.frame_id, hit, model, hooks, reload: () => openDetail(hit, model, hooks),
    current: () => shown === ctx, addField: (k, v) => { if (shown === ctx) addField(k, v); } };
  shown = ctx;
  $("detail-title").textContent = `${hit.site}/${hit.line}/${hit.camera} · ${fmt(hit.capture_us)}`;
  const fig = $("detail-figure"), actions = $("detail-actions"), fields = $("detail-fields");
  fig.textContent = ""; actions.textContent = ""; fields.textContent = ""; status("");
  if (!$("detail").open) $("detail").showModal();
  let doc = { frame: null, original: null };
  try { doc = await getJson(`/v1/frames/${hit.frame_id}`); } catch (e) { status(e.message, true); }
  ctx.doc = doc;
  for (const [k, v] of fieldRows(doc, hit)) ctx.addField(k, v);
  const o = doc.original;
  if (o && o.state === "kept") {
    try {
      const url = await imageUrl(`/v1/frames/${hit.frame_id}/original`);
      ctx.figure = figure(url, (w, h) => itemRegions(hit, model && model.input, w, h), "fig big");
      fig.appendChild(ctx.figure);
      actions.appendChild(button("Download", () => download(hit.frame_id).catch((e) => status(e.message, true)), { id: "download" }));
    } catch (e) { status(e.message, true); }
  } else {
    const p = document.createElement("p");
    p.className = "gone";
    p.textContent = o ? "The original is no longer kept (retention policy)." :
      "Central has no original of this frame. Edges with upload policy on_request keep it locally: request it.";
    fig.appendChild(p);
    if (!o) actions.appendChild(button("Request from edge", () => requestOriginal(ctx), { id: "request-original" }));
  }
  actions.appendChild(button("Find frames like this", () => { $("detail").close(); hooks.likeFrame(hit); }, { id: "find-like" }));
  if (me.role === "admin" && doc.frame) {
    const held = doc.frame.legal_hold;
    actions.appendChild(button(held ? "Release legal hold" : "Put on legal hold", async () => {
      try {
        await sendJson("PUT", `/v1/frames/${hit.frame_id}/hold`, { hold: !held });
        hit.legal_hold = !held;
        ctx.reload();
      } catch (e) { status(e.message, true); }
    }, { id: "hold" }));
  }
  for (const provider of detailActions) {
    const list = await provider(ctx);
    if (!ctx.current()) return;  // another frame was opened meanwhile
    for (const a of list) actions.appendChild(button(a.label, () => a.run(ctx), { id: a.id }));
  }
}

export function initDetail() {
  $("close").addEventListener("click", () => $("detail").close());
  $("detail").addEventListener("close", () => clearInterval(polling));
}
