// tokenline search page: plain JS, no build step. Talks to /v1/* with the bearer token kept in localStorage.
"use strict";
const $ = (id) => document.getElementById(id);
const tokenInput = $("token");
tokenInput.value = localStorage.getItem("tokenline.token") || "";
tokenInput.addEventListener("change", () => { localStorage.setItem("tokenline.token", tokenInput.value.trim()); loadModels(); });

function auth() { return { Authorization: "Bearer " + tokenInput.value.trim() }; }
function setStatus(text, error) { const s = $("status"); s.textContent = text; s.className = error ? "error" : ""; }
function toUs(v) { return v ? String(Date.parse(v) * 1000) : ""; }

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ headers: auth() }, opts || {}));
  if (!r.ok) {
    let detail = r.statusText;
    try { const j = await r.json(); detail = j.detail || j.error || detail; } catch (e) { /* not JSON */ }
    const err = new Error(detail); err.status = r.status; throw err;
  }
  return r;
}

async function loadModels() {
  if (!tokenInput.value.trim()) { setStatus("enter an API token (viewer role)"); return; }
  try {
    const j = await (await api("/v1/models")).json();
    const sel = $("model"); sel.innerHTML = "";
    for (const m of j.models) {
      const o = document.createElement("option");
      o.value = m.id; o.textContent = `${m.name} (D=${m.embedding_dim}, K=${m.k}${m.has_text ? ", text" : ""})`;
      sel.appendChild(o);
    }
    setStatus(`${j.models.length} model(s)`);
  } catch (e) { setStatus("models: " + e.message, true); }
}

async function thumbnail(frameId, box) {
  try {
    const r = await api(`/v1/frames/${frameId}/thumbnail?size=256`);
    const img = document.createElement("img");
    img.src = URL.createObjectURL(await r.blob()); img.alt = frameId;
    box.prepend(img);
  } catch (e) {
    const d = document.createElement("div"); d.className = "gone";
    d.textContent = e.status === 410 ? "original deleted (retention)" : e.status === 404 ? "no original kept" : e.message;
    box.prepend(d);
  }
}

function card(hit) {
  const c = document.createElement("div"); c.className = "card"; c.dataset.frameId = hit.frame_id;
  const box = document.createElement("div"); box.className = "thumb";
  for (const m of hit.matches || []) {   // where on the part it matched: summary-token centroids
    const dot = document.createElement("span"); dot.className = "dot";
    dot.style.left = (100 * m.x) + "%"; dot.style.top = (100 * m.y) + "%";
    dot.title = `token ${m.token}: similarity ${m.sim}`;
    box.appendChild(dot);
  }
  c.appendChild(box);
  const when = new Date(hit.capture_us / 1000).toISOString().replace("T", " ").slice(0, 19);
  const meta = document.createElement("div"); meta.className = "meta";
  meta.innerHTML = `<span class="score">${hit.score.toFixed(3)}</span> (global ${hit.global_score.toFixed(3)}` +
    (hit.maxsim === null ? "" : `, MaxSim ${hit.maxsim.toFixed(3)}`) + `)<br>`;
  meta.appendChild(document.createTextNode(`${hit.site}/${hit.line}/${hit.camera} · ${when} UTC`));
  if (hit.source || hit.labels) {   // frame metadata: the file it came from and its labels (text, never HTML)
    const labels = Object.entries(hit.labels || {}).map(([k, v]) => v === "" ? k : `${k}=${v}`).join(" ");
    meta.appendChild(document.createElement("br"));
    meta.appendChild(document.createTextNode([hit.source, labels].filter(Boolean).join(" · ")));
  }
  c.appendChild(meta);
  c.addEventListener("click", () => showDetail(hit));
  thumbnail(hit.frame_id, box);
  return c;
}

async function showDetail(hit) {
  const body = $("detail-body"); body.textContent = "";
  const h = document.createElement("h3"); h.textContent = hit.frame_id; body.appendChild(h);
  try {
    const r = await api(`/v1/frames/${hit.frame_id}/original`);
    const img = document.createElement("img"); img.src = URL.createObjectURL(await r.blob()); body.appendChild(img);
  } catch (e) {
    const p = document.createElement("p");
    p.textContent = e.status === 410 ? "The original is no longer kept (retention policy)." : "No original: " + e.message;
    body.appendChild(p);
  }
  const like = document.createElement("button"); like.textContent = "Find frames like this";
  like.onclick = () => { $("detail").close(); $("like").value = hit.frame_id; $("q").value = ""; $("image").value = ""; runSearch(); };
  body.appendChild(like);
  $("detail").showModal();
}

async function runSearch(ev) {
  if (ev) ev.preventDefault();
  const fd = new FormData();
  const file = $("image").files[0], q = $("q").value.trim(), like = $("like").value.trim();
  if (file) fd.append("image", file); else if (q) fd.append("q", q); else if (like) fd.append("like_frame", like);
  else { setStatus("choose an image, type a text or give a frame id", true); return; }
  if ($("model").value && !like) fd.append("model_id", $("model").value);
  for (const [key, id] of [["site", "site"], ["line", "line"], ["camera", "camera"], ["k", "k"]]) {
    if ($(id).value.trim()) fd.append(key, $(id).value.trim());
  }
  for (const l of $("labels").value.trim().split(/\s+/)) if (l) fd.append("label", l);
  if ($("since").value) fd.append("since_us", toUs($("since").value));
  if ($("until").value) fd.append("until_us", toUs($("until").value));
  fd.append("rerank", $("rerank").checked ? "true" : "false");
  setStatus("searching…");
  try {
    const j = await (await api("/v1/search", { method: "POST", body: fd })).json();
    const res = $("results"); res.innerHTML = "";
    for (const hit of j.results) res.appendChild(card(hit));
    setStatus(`${j.results.length} results in ${j.took_ms} ms (${j.model.name})`);
  } catch (e) { setStatus("search failed: " + e.message, true); }
}

$("search").addEventListener("submit", runSearch);
$("close").addEventListener("click", () => $("detail").close());
loadModels();
