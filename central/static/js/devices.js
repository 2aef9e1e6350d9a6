// The devices page: what each edge publishes (status, stats) as central last received it, refreshed every 5 s.
import { getJson } from "./api.js";
import { ago, fmt } from "./time.js";

const $ = (id) => document.getElementById(id);
let timer = null;

const num = (v, digits = 1, unit = "") => (v === null || v === undefined ? "–" : `${Number(v).toFixed(digits)}${unit}`);

function row(d, nowUs) {
  const tr = document.createElement("tr");
  tr.dataset.device = d.device;
  tr.className = d.online ? "online" : "offline";
  const cams = Object.entries(d.cameras || {}).map(([n, c]) => `${n}: ${c.state}, ${num(c.fps)} fps`).join("; ");
  const stale = d.stats_ts_us ? ` (stats ${ago(d.stats_ts_us, nowUs)})` : "";
  const cells = [
    d.device, d.site, d.online ? "online" : d.status,
    `${ago(d.last_seen_us, nowUs)}`, num(d.frames_per_s), num(d.inference_ms_p50, 1, " ms"),
    d.backlog === null ? "–" : String(d.backlog), num(d.oldest_unconfirmed_s, 1, " s"),
    d.drops === null ? "–" : String(d.drops), cams || "–", (d.problems || []).join("; ") || "–",
  ];
  cells.forEach((text, i) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (i === 2) { td.className = "state"; td.title = stale; }
    if (i === 3) td.title = fmt(d.last_seen_us) + stale;
    tr.appendChild(td);
  });
  return tr;
}

async function refresh() {
  const s = $("status-devices");
  try {
    const j = await getJson("/v1/devices");
    const body = $("devices").querySelector("tbody");
    body.textContent = "";
    for (const d of j.devices) body.appendChild(row(d, j.now_us));
    const on = j.devices.filter((d) => d.online).length;
    s.textContent = `${j.devices.length} device(s), ${on} online · as of ${fmt(j.now_us)}`;
    s.className = "status";
  } catch (e) {
    $("devices").querySelector("tbody").textContent = "";
    s.textContent = e.message; s.className = "status error";
  }
}

export function showDevices(active) {
  clearInterval(timer);
  if (!active) return;
  refresh();
  timer = setInterval(refresh, 5000);
}
