// One time zone for everything the page shows and takes: UTC or this browser's zone, chosen in the header.
const KEY = "tokenline.tz";
const LOCAL = Intl.DateTimeFormat().resolvedOptions().timeZone || "local";

export const zone = {
  get: () => localStorage.getItem(KEY) || "UTC",
  set: (z) => localStorage.setItem(KEY, z),
  name: () => (zone.get() === "UTC" ? "UTC" : LOCAL),
  localName: LOCAL,
};

const pad = (n, w = 2) => String(n).padStart(w, "0");

// "2026-03-01 14:05:09.123 UTC" (or the local zone's name)
export function fmt(us) {
  if (us === null || us === undefined) return "–";
  const d = new Date(us / 1000);
  const utc = zone.get() === "UTC";
  const parts = utc
    ? [d.getUTCFullYear(), d.getUTCMonth() + 1, d.getUTCDate(), d.getUTCHours(), d.getUTCMinutes(), d.getUTCSeconds(), d.getUTCMilliseconds()]
    : [d.getFullYear(), d.getMonth() + 1, d.getDate(), d.getHours(), d.getMinutes(), d.getSeconds(), d.getMilliseconds()];
  const [y, mo, da, h, mi, s, ms] = parts;
  return `${y}-${pad(mo)}-${pad(da)} ${pad(h)}:${pad(mi)}:${pad(s)}.${pad(ms, 3)} ${zone.name()}`;
}

// A datetime-local input's value ("2026-03-01T14:05[:09]") in the chosen zone -> Unix microseconds ("" if empty).
export function toUs(value) {
  if (!value) return "";
  const v = value.length === 16 ? value + ":00" : value;
  const ms = zone.get() === "UTC" ? Date.parse(v + "Z") : Date.parse(v);
  return Number.isNaN(ms) ? "" : String(ms * 1000);
}

// Unix microseconds -> a datetime-local value in the chosen zone (to carry a filter across a zone change).
export function fromUs(us) {
  if (!us) return "";
  const t = fmt(Number(us));
  return t.slice(0, 10) + "T" + t.slice(11, 19);
}

export function ago(us, nowUs) {
  const s = Math.max(0, (nowUs - us) / 1e6);
  if (s < 90) return `${s.toFixed(0)} s ago`;
  if (s < 5400) return `${(s / 60).toFixed(0)} min ago`;
  if (s < 129600) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}
