// The API client of the page: the bearer token (kept in localStorage), errors with the API's reason and parameter.
const KEY = "tokenline.token";

export const token = {
  get: () => localStorage.getItem(KEY) || "",
  set: (t) => localStorage.setItem(KEY, t.trim()),
};

export class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.error)) || `HTTP ${status}`);
    this.status = status;
    this.reason = body && body.error;
    this.parameter = body && body.parameter;
  }
}

export async function api(path, opts = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token.get() }, opts.headers || {});
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  if (!r.ok) {
    let body = null;
    try { body = await r.json(); } catch (e) { /* not JSON */ }
    throw new ApiError(r.status, body);
  }
  return r;
}

export const getJson = async (path) => (await api(path)).json();

// A JSON request (POST, PATCH, PUT, DELETE); the answer's JSON, or null for an empty one (204).
export async function sendJson(method, path, body) {
  const opts = { method };
  if (body !== undefined) Object.assign(opts, { headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const r = await api(path, opts);
  return r.status === 204 ? null : r.json();
}

// Query parameters of an object: arrays repeat their key, empty values are left out.
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    for (const x of Array.isArray(v) ? v : [v]) if (x !== "" && x !== null && x !== undefined) q.append(k, x);
  }
  return q;
}

export async function postForm(path, fields) {
  const fd = new FormData();
  for (const [k, v] of Object.entries(fields)) {
    if (v === undefined || v === null || v === "") continue;
    if (Array.isArray(v)) v.forEach((x) => fd.append(k, x)); else fd.append(k, v);
  }
  return (await api(path, { method: "POST", body: fd })).json();
}

// An image of the API (the original, a thumbnail) as an object URL: <img> cannot send the bearer header.
// Central decodes images on a small pool and answers 503 "busy" beyond its queue, so the page asks for a few at a
// time and retries a busy answer after a pause.
const blobs = new Map();
const MAX_IMAGE_FETCHES = 4;
let fetching = 0;
const waiting = [];

async function slot(fn) {
  if (fetching >= MAX_IMAGE_FETCHES) await new Promise((resolve) => waiting.push(resolve));
  fetching++;
  try { return await fn(); } finally {
    fetching--;
    const next = waiting.shift();
    if (next) next();
  }
}

async function fetchImage(path) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await slot(() => api(path).then((r) => r.blob()));
    } catch (e) {
      if (e.status !== 503 || attempt >= 5) throw e;
      await new Promise((resolve) => setTimeout(resolve, 200 * 2 ** attempt));
    }
  }
}

export async function imageUrl(path) {
  if (blobs.has(path)) return blobs.get(path);
  const p = fetchImage(path).then((b) => URL.createObjectURL(b));
  blobs.set(path, p);
  p.catch(() => blobs.delete(path));
  return p;
}
