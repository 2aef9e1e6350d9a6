// The page's anomaly views: the Flagged view (each camera's latest flagged frames), the anomalous region drawn over
// frames, anomaly scores on result cards, and "find frames like this region" from a scored frame's detail.
import { getJson, query } from "./api.js";
import { detailActions } from "./detail.js";
import { filterParams } from "./filters.js";
import { Pager, cardDecorators, frameCard } from "./grid.js";
import { tokenRegions } from "./overlay.js";

const $ = (id) => document.getElementById(id);
const PER_CAMERA = 24;   // flagged frames shown per camera
const MAX_IDS = 200;     // frame ids per /v1/anomalies request (the API's limit)
const REGION_HITS = 48;  // frames like a region (the route answers one page, k of them)
let hasSets = false;     // central has a reference set: frames may be scored

const scoreText = (a) => `anomaly ${a.score.toFixed(3)} ${a.flagged ? ">" : "≤"} ${a.threshold.toFixed(3)}`;

// A scored frame (ScoredFrameOut) as a card item: its anomalous region drawn over the thumbnail.
function scoredItem(a) {
  return { frame_id: a.frame_id, model_id: a.model_id, site: a.site, line: a.line, camera: a.camera,
    capture_us: a.capture_us, anomaly: a,
    regions: (input, w, h) => tokenRegions(a.region, input, w, h, `token ${a.token}: ${scoreText(a)}`) };
}

// A hit of "frames like this region" as a card item: the frame's best-matching token region drawn.
function regionHitItem(h, modelId) {
  return { frame_id: h.frame_id, model_id: modelId, site: h.site, line: h.line, camera: h.camera,
    capture_us: h.capture_us, region_sim: h.sim,
    regions: (input, w, ht) => tokenRegions(h.region, input, w, ht, `token ${h.token}: similarity ${h.sim}`, "match") };
}

function badge(card, a) {
  const meta = card.querySelector(".meta");
  if (!meta || card.querySelector(".ascore")) return;
  const b = document.createElement("span");
  b.className = "badge ascore" + (a.flagged ? " anomaly" : "");
  b.dataset.score = a.score;
  b.title = `anomaly score against reference set ${a.set_id} (v${a.set_version}); flagged above the threshold`;
  b.textContent = scoreText(a);
  meta.prepend(b, document.createElement("br"));
}

// Card decorator: a scored frame's score. Cards of one page are collected and their scores read in one request.
const waiting = new Map();  // frame id -> cards waiting for its score
let scheduled = false;

function decorate(card, item) {
  if (item.region_sim !== undefined) {
    const s = document.createElement("span");
    s.className = "score";
    s.textContent = `region similarity ${item.region_sim.toFixed(3)}`;
    card.querySelector(".meta").prepend(s, document.createElement("br"));
  }
  if (item.anomaly) { badge(card, item.anomaly); return; }
  if (!hasSets || !item.frame_id) return;
  if (!waiting.has(item.frame_id)) waiting.set(item.frame_id, []);
  waiting.get(item.frame_id).push(card);
  if (!scheduled) { scheduled = true; setTimeout(fetchScores, 0); }
}

async function fetchScores() {
  scheduled = false;
  const batch = new Map(waiting);
  waiting.clear();
  const ids = [...batch.keys()];
  for (let i = 0; i < ids.length; i += MAX_IDS) {
    try {
      const j = await getJson(`/v1/anomalies?${query({ frame_id: ids.slice(i, i + MAX_IDS), limit: MAX_IDS })}`);
      for (const a of j.results) for (const card of batch.get(a.frame_id) || []) badge(card, a);
    } catch (e) {
      console.warn("anomaly scores:", e.message);  // scores are extra: the cards stay as they are
    }
  }
}

// The Flagged view: every camera's latest flagged frames, newest (or highest score) first, with the filter bar.
async function flaggedPage() {
  const f = filterParams();
  const j = await getJson(`/v1/anomalies/latest?${query({ per_camera: PER_CAMERA, model_id: f.model_id,
    site: f.site, line: f.line, camera: f.camera, since_us: f.since_us, until_us: f.until_us })}`);
  const frames = j.cameras.flatMap((c) => c.frames);
  const key = $("flagged-sort").value === "score" ? "score" : "capture_us";
  frames.sort((a, b) => b[key] - a[key] || (a.frame_id < b.frame_id ? -1 : 1));
  const note = j.cameras.length ? `${j.cameras.length} camera(s) with a reference set, the latest ${PER_CAMERA} of each`
    : "no camera with a reference set matches the filters";
  return { items: frames.map(scoredItem), next_cursor: null, note };
}

// "Find frames like this region": the frame's anomalous token against every frame of its model, in the search view.
function regionQuery(a) {
  return {
    like: a.frame_id, likeItem: scoredItem(a), label: "frames like this region",
    caption: `like the anomalous region (token ${a.token}) of frame ${a.frame_id}`,
    fetchPage: async (f) => {
      const j = await getJson(`/v1/frames/${a.frame_id}/similar-region?${query({ k: REGION_HITS, site: f.site,
        line: f.line, camera: f.camera, since_us: f.since_us, until_us: f.until_us })}`);
      return { items: j.results.map((h) => regionHitItem(h, a.model_id)), next_cursor: null,
        note: `token ${j.query.token} of the query frame` };
    },
  };
}

// Detail of a scored frame: its score, its region (box and footprint cells) over the original, the region search.
async function anomalyDetail(ctx) {
  let a;
  try {
    a = await getJson(`/v1/frames/${ctx.frameId}/anomaly`);
  } catch (e) {
    if (e.status !== 404) ctx.addField("anomaly", e.message);  // 404: not scored
    return [];
  }
  ctx.addField("anomaly score", `${a.score.toFixed(4)}, threshold ${a.threshold.toFixed(4)}: ` +
    `${a.flagged ? "flagged" : "not flagged"} · ` +
    `reference set ${a.set_id} v${a.set_version}` + (a.edge_score === null ? "" : ` · edge ${a.edge_score.toFixed(3)}`));
  if (a.token < 0) return [];
  ctx.addField("anomalous region", `token ${a.token}, box [${a.region.box.join(", ")}] of the model input`);
  if (ctx.figure && ctx.current()) {
    ctx.figure.addRegions((w, h) => tokenRegions(a.region, ctx.model && ctx.model.input, w, h, `token ${a.token}`));
  }
  return [{ label: "Find frames like this region", id: "find-region", run: () => {
    $("detail").close();
    ctx.hooks.searchWith(regionQuery(a));
  } }];
}

async function start() {
  try {
    hasSets = (await getJson("/v1/reference-sets")).reference_sets.length > 0;
  } catch (e) {
    hasSets = false;
  }
  $("nav-flagged").hidden = !hasSets;
}

// Wires the view, the decorator and the detail action; returns the hooks main.js calls (start, show).
export function initAnomaly(modelOf, open) {
  const openScored = (item) => open(Object.assign({}, item, { regions: [] }));  // the detail draws region and mask
  const pager = new Pager("flagged", (item) => frameCard(item, modelOf(item), openScored));
  const show = (active) => { if (active) pager.start(flaggedPage, "flagged frames"); };
  $("flagged-sort").addEventListener("change", () => show(true));
  $("flagged-bar").addEventListener("submit", (ev) => ev.preventDefault());
  cardDecorators.push(decorate);
  detailActions.push(anomalyDetail);
  return { start, show };
}
