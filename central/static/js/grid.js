// A grid of frames paged by the API's cursor: infinite scroll (and a "Load more" button), a card per frame with
// its thumbnail, the regions that matched, its place, capture time and scores. A new listing keeps the shown
// cards (dimmed, aria-busy) until its first page replaces them, so a refresh does not flicker; errors clear them.
import { imageUrl } from "./api.js";
import { figure, itemRegions } from "./overlay.js";
import { fmt } from "./time.js";

export const cardDecorators = [];  // (card, item) => void: features add badges (anomaly score, ...)

export class Pager {
  // fetchPage(cursor) -> {items, next_cursor, note}; render(item) -> element
  constructor(name, render) {
    this.name = name;
    this.grid = document.getElementById(`results-${name}`);
    this.status = document.getElementById(`status-${name}`);
    this.moreBtn = document.getElementById(`more-${name}`);
    this.render = render;
    this.generation = 0;
    this.busy = false;
    this.moreBtn.addEventListener("click", () => this.more());
    this.sentinel = new IntersectionObserver((es) => { if (es.some((e) => e.isIntersecting)) this.more(); });
    this.sentinel.observe(this.moreBtn);
  }

  setStatus(text, error) {
    this.status.textContent = text;
    this.status.className = "status" + (error ? " error" : "");
  }

  reset() {
    this.generation++;
    this.cursor = null;
    this.count = 0;
    this.moreBtn.hidden = true;
  }

  clear() {
    this.reset();
    this.grid.textContent = "";
    this.grid.removeAttribute("aria-busy");
  }

  async start(fetchPage, label) {
    this.reset();  // the shown cards stay until the first page replaces them
    this.grid.setAttribute("aria-busy", "true");
    this.fetchPage = fetchPage;
    this.label = label;
    this.setStatus("loading…");
    await this.load();
  }

  async more() {
    if (this.cursor && !this.busy && !this.moreBtn.hidden) await this.load();
  }

  async load() {
    const gen = this.generation;
    this.busy = true;
    try {
      const page = await this.fetchPage(this.cursor);
      if (gen !== this.generation) return;  // a newer listing started meanwhile
      const cards = page.items.map((item) => this.render(item));
      if (this.grid.hasAttribute("aria-busy")) {  // the listing's first page
        this.grid.replaceChildren(...cards);
        this.grid.removeAttribute("aria-busy");
      } else {
        this.grid.append(...cards);
      }
      this.count += page.items.length;
      this.cursor = page.next_cursor;
      this.moreBtn.hidden = !this.cursor;
      this.setStatus(`${this.count} ${this.label}${this.cursor ? " (more below)" : ""}${page.note ? " · " + page.note : ""}`);
    } catch (e) {
      if (gen !== this.generation) return;
      this.clear();  // an error never leaves the previous results under it
      this.setStatus(`${e.parameter ? e.parameter + ": " : ""}${e.message}`, true);
    } finally {
      this.busy = false;
    }
  }
}

async function fillThumb(box, item, model) {
  try {
    const url = await imageUrl(`/v1/frames/${item.frame_id}/thumbnail?size=256`);
    box.appendChild(figure(url, (w, h) => itemRegions(item, model && model.input, w, h)));
  } catch (e) {
    const d = document.createElement("div");
    d.className = "gone";
    d.textContent = e.status === 410 ? "original deleted (retention)" : e.status === 404 ? "no original at central" : e.message;
    box.appendChild(d);
  }
}

export function frameCard(item, model, onOpen) {
  const c = document.createElement("div");
  c.className = "card";
  c.dataset.frameId = item.frame_id;
  const box = document.createElement("div");
  box.className = "thumb";
  c.appendChild(box);
  const meta = document.createElement("div");
  meta.className = "meta";
  if (item.score !== undefined) {
    const s = document.createElement("span");
    s.className = "score";
    s.textContent = item.score.toFixed(3);
    meta.appendChild(s);
    meta.appendChild(document.createTextNode(` (global ${item.global_score.toFixed(3)}` +
      (item.maxsim === null || item.maxsim === undefined ? ")" : `, MaxSim ${item.maxsim.toFixed(3)})`)));
    meta.appendChild(document.createElement("br"));
  }
  const place = document.createElement("span");
  place.textContent = `${item.site}/${item.line}/${item.camera}`;
  meta.appendChild(place);
  meta.appendChild(document.createElement("br"));
  const when = document.createElement("time");
  when.className = "when";
  when.dataset.us = item.capture_us;
  when.textContent = fmt(item.capture_us);
  meta.appendChild(when);
  if (item.source || item.labels) {  // frame metadata: the file it came from and its labels (text, never HTML)
    const labels = Object.entries(item.labels || {}).map(([k, v]) => (v === "" ? k : `${k}=${v}`)).join(" ");
    const m = document.createElement("span");
    m.className = "labels";
    m.textContent = [item.source, labels].filter(Boolean).join(" · ");
    meta.appendChild(document.createElement("br"));
    meta.appendChild(m);
  }
  if (item.legal_hold) {
    const h = document.createElement("span");
    h.className = "badge hold";
    h.textContent = "hold";
    meta.appendChild(h);
  }
  c.appendChild(meta);
  for (const deco of cardDecorators) deco(c, item);
  c.addEventListener("click", () => onOpen(item));
  fillThumb(box, item, model);
  return c;
}

// Re-render every shown time after a time zone change.
export function retime() {
  for (const t of document.querySelectorAll("time[data-us]")) t.textContent = fmt(Number(t.dataset.us));
}
