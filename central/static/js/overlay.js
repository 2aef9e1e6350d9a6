// Regions drawn over a frame, in the original frame's coordinates (0..1 of its width and height).
//
// A region is {kind: "box", x0, y0, x1, y1, label} or {kind: "point", x, y, size, label}. Summary-token centroids
// come in model-input coordinates: inputToFrame maps them back through the manifest's resize (stretch, centre
// crop, letterbox), the inverse of tokenline/preprocess.py. A camera ROI is applied on the edge and not known
// here; routes that answer regions in frame coordinates (footprints, boxes) are drawn as they come.
const SVG = "http://www.w3.org/2000/svg";

export function inputToFrame(x, y, input, frameW, frameH) {
  if (!input || !frameW || !frameH || input.resize === "resize") return [x, y];
  const tw = input.width, th = input.height;
  let s, nw, nh, ox, oy;
  if (input.resize === "resize_center_crop") {
    s = Math.max(th / frameH, tw / frameW);
    nw = Math.max(tw, Math.round(frameW * s)); nh = Math.max(th, Math.round(frameH * s));
    ox = -Math.floor((nw - tw) / 2); oy = -Math.floor((nh - th) / 2);
  } else {  // letterbox
    s = Math.min(th / frameH, tw / frameW);
    nw = Math.max(1, Math.round(frameW * s)); nh = Math.max(1, Math.round(frameH * s));
    ox = Math.floor((tw - nw) / 2); oy = Math.floor((th - nh) / 2);
  }
  return [(x * tw - ox) / nw, (y * th - oy) / nh];
}

// Token matches of a search hit as point regions in frame coordinates.
export function matchRegions(matches, input, frameW, frameH) {
  return (matches || []).map((m) => {
    const [fx, fy] = inputToFrame(m.x, m.y, input, frameW, frameH);
    return { kind: "point", x: fx, y: fy, size: m.size, label: `token ${m.token}: similarity ${m.sim}` };
  }).filter((r) => r.x >= 0 && r.x <= 1 && r.y >= 0 && r.y <= 1);
}

// The regions a result item brings in frame coordinates: its own (fixed, or a function of the model input and the
// frame's size), else the points of its token matches.
export function itemRegions(item, input, frameW, frameH) {
  if (typeof item.regions === "function") return item.regions(input, frameW, frameH);
  return item.regions || matchRegions(item.matches, input, frameW, frameH);
}

// A summary token's region as the API gives it ({box, mask?} in model-input coordinates) as boxes in frame
// coordinates: its box, and one box per footprint cell when it has a mask. Both corners of each box are mapped.
export function tokenRegions(region, input, frameW, frameH, label, cls = "anomaly") {
  const toFrame = (x0, y0, x1, y1, kind) => {
    const [fx0, fy0] = inputToFrame(x0, y0, input, frameW, frameH);
    const [fx1, fy1] = inputToFrame(x1, y1, input, frameW, frameH);
    const c = (v) => Math.min(1, Math.max(0, v));
    return { kind: "box", x0: c(fx0), y0: c(fy0), x1: c(fx1), y1: c(fy1), label, cls: `${cls} ${kind}` };
  };
  if (!region || !region.box) return [];
  const out = [toFrame(...region.box, "box")];
  const mask = region.mask;
  if (mask && mask.grid) {
    const [gh, gw] = mask.grid;
    mask.rows.forEach((row, y) => [...row].forEach((bit, x) => {
      if (bit === "1") out.push(toFrame(x / gw, y / gh, (x + 1) / gw, (y + 1) / gh, "cell"));
    }));
  }
  return out;
}

// A figure: the image and an SVG layer sized to it (viewBox 0..1), so regions land on the image at any size.
// fig.addRegions(fn) draws one more layer, fn(frameW, frameH) -> regions, now or once the image has loaded.
export function figure(url, regions, cls = "fig") {
  const fig = document.createElement("div");
  fig.className = cls;
  const img = document.createElement("img");
  img.src = url;
  img.alt = "frame";
  fig.appendChild(img);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 1 1");
  svg.setAttribute("preserveAspectRatio", "none");
  fig.appendChild(svg);
  const draw = (rs) => {
    svg.textContent = "";
    for (const r of rs) svg.appendChild(shape(r));
  };
  const layers = [typeof regions === "function" ? regions : () => regions || []];
  const redraw = () => draw(layers.flatMap((fn) => fn(img.naturalWidth, img.naturalHeight)));
  img.addEventListener("load", redraw);
  if (typeof regions !== "function") draw(regions || []);
  fig.addRegions = (fn) => {
    layers.push(fn);
    if (img.complete && img.naturalWidth) redraw();
  };
  fig.draw = draw;
  fig.img = img;
  return fig;
}

function shape(r) {
  let el;
  if (r.kind === "box") {
    el = document.createElementNS(SVG, "rect");
    el.setAttribute("x", r.x0); el.setAttribute("y", r.y0);
    el.setAttribute("width", Math.max(0.002, r.x1 - r.x0)); el.setAttribute("height", Math.max(0.002, r.y1 - r.y0));
    el.setAttribute("class", "region " + (r.cls || ""));
  } else {
    el = document.createElementNS(SVG, "ellipse");
    const rad = 0.035;
    el.setAttribute("cx", r.x); el.setAttribute("cy", r.y); el.setAttribute("rx", rad); el.setAttribute("ry", rad);
    el.setAttribute("class", "ring " + (r.cls || ""));
  }
  el.setAttribute("vector-effect", "non-scaling-stroke");
  const t = document.createElementNS(SVG, "title");
  t.textContent = r.label || "";
  el.appendChild(t);
  return el;
}

// Let the user draw a box on a figure; resolves {x0, y0, x1, y1} in frame coordinates (0..1), or null (Esc).
export function drawBox(fig) {
  return new Promise((resolve) => {
    fig.classList.add("drawing");
    const svg = fig.querySelector("svg");
    let start = null, rect = null;
    const pos = (ev) => {
      const b = svg.getBoundingClientRect();
      return [Math.min(1, Math.max(0, (ev.clientX - b.left) / b.width)), Math.min(1, Math.max(0, (ev.clientY - b.top) / b.height))];
    };
    const done = (box) => {
      fig.classList.remove("drawing");
      svg.removeEventListener("pointerdown", down); svg.removeEventListener("pointermove", move);
      svg.removeEventListener("pointerup", up); document.removeEventListener("keydown", key);
      resolve(box);
    };
    const down = (ev) => {
      start = pos(ev);
      rect = shape({ kind: "box", x0: start[0], y0: start[1], x1: start[0], y1: start[1], cls: "drawn" });
      svg.appendChild(rect);
      svg.setPointerCapture && svg.setPointerCapture(ev.pointerId);
    };
    const move = (ev) => {
      if (!start) return;
      const [x, y] = pos(ev);
      rect.setAttribute("x", Math.min(x, start[0])); rect.setAttribute("y", Math.min(y, start[1]));
      rect.setAttribute("width", Math.abs(x - start[0])); rect.setAttribute("height", Math.abs(y - start[1]));
    };
    const up = (ev) => {
      if (!start) return;
      const [x, y] = pos(ev);
      const box = { x0: Math.min(x, start[0]), y0: Math.min(y, start[1]), x1: Math.max(x, start[0]), y1: Math.max(y, start[1]) };
      done(box.x1 - box.x0 > 0.01 && box.y1 - box.y0 > 0.01 ? box : null);
    };
    const key = (ev) => { if (ev.key === "Escape") { if (rect) rect.remove(); done(null); } };
    svg.addEventListener("pointerdown", down); svg.addEventListener("pointermove", move);
    svg.addEventListener("pointerup", up); document.addEventListener("keydown", key);
  });
}
