"""Search: kNN on the global embedding (SQLite: vector files; PostgreSQL: segments), then MaxSim re-rank.

A query is a global embedding plus optional query tokens with weights (from an example image, a stored
frame, or a text embedding as a single token); ``build_query`` makes one from what the API or the CLI
was given, and resolves the model it belongs to. Candidates come only from the query's model; filters by site,
line, camera, capture time and labels (the frame metadata's) apply before ranking. The re-rank score is
``(1 - w) * cosine(global) + w * MaxSim``, where MaxSim is the weighted mean over query tokens of the best
cosine with any of the frame's summary tokens (late interaction); w is the configuration's, else the model's
summary method's default (``DEFAULT_RERANK_WEIGHT``, measured in BENCHMARKS.md). Tokens that stand for no
footprint cell take no part. Region search (a crop, or a box on a stored frame) is ``central.regions``;
``build_region_query`` makes its query.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import Engine, LargeBinary, func, select, text, type_coerce
from sqlalchemy.orm import Session

from central import exact, hot, kmeans, regions, segments, store
from central.config import SearchConfig
from central.errors import BadParameter, Internal, Invalid, NotFound, TooLarge
from central.regions import RegionQuery
from central.store import FRAMES_DELETED, FrameData, ModelInfo
from sql.db import is_postgres
from sql.models import Frame
from tokenline.preprocess import DEFAULT_MAX_PIXELS
from tokenline.summary import Summary
from tokenline.topics import NAME_RE, NAME_RULE
from tokenline.wire.common import MAX_LABEL_VALUE

if TYPE_CHECKING:  # pragma: no cover
    from central.encoder import EncoderPool

log = logging.getLogger(__name__)

BAD_QUERY = "bad_query"  # the reason of every error raised here (the API's "error" field)
# Weight of MaxSim in the whole-image ranking per summary method (BENCHMARKS.md: central_rerank_neu, through
# central with make demo's slic export: P@10 0.906 global, 0.962 at 0.5; the informativity tokens of 2026-11-24
# did not improve on the global ranking, so they keep a light 0.25).
DEFAULT_RERANK_WEIGHT = {"informativity": 0.25, "slic": 0.5}


LabelFilter = Tuple[str, Optional[str]]  # (name, value): the frame has this label with this value (any value: None)


@dataclass(frozen=True)
class Filters:
    site: Optional[str] = None
    line: Optional[str] = None
    camera: Optional[str] = None
    since_us: Optional[int] = None
    until_us: Optional[int] = None  # exclusive
    labels: Tuple[LabelFilter, ...] = ()  # all must hold


def parse_labels(items: Optional[Sequence[str]]) -> Tuple[LabelFilter, ...]:
    """``["lot=17", "rework"]`` -> ``(("lot", "17"), ("rework", None))``: ``name=value`` or a bare ``name`` (the
    label is present, whatever its value). ``BadParameter("label")`` (422) for a name outside the label name rule."""
    out: List[LabelFilter] = []
    for item in items or ():
        name, eq, value = item.partition("=")
        name = name.strip()
        if not NAME_RE.match(name):
            raise BadParameter("label", f"{item!r:.80}: the name must match {NAME_RULE}")
        if len(value) > MAX_LABEL_VALUE:
            raise BadParameter("label", f"{name}: the value is longer than {MAX_LABEL_VALUE}")
        out.append((name, value if eq else None))
    return tuple(out)


def label_ids(session: Session, model_id: int, labels: Sequence[LabelFilter]) -> np.ndarray:
    """Row ids of the model's frames that carry every label in ``labels`` (SQLite: json_extract / json_type)."""
    q = select(Frame.id).where(Frame.model_id == model_id, *store.label_clauses(labels, postgres=False))
    return np.fromiter(session.scalars(q), np.int64)


def frame_conditions(model_id: int, f: Filters, postgres: bool) -> list:
    """SQL conditions on ``frames`` selecting the frames of ``model_id`` that pass the filters ``f``."""
    where = [Frame.model_id == model_id, *store.label_clauses(f.labels, postgres)]
    for kind in exact.PLACES:
        if getattr(f, kind) is not None:
            where.append(getattr(Frame, kind) == getattr(f, kind))
    if f.since_us is not None:
        where.append(Frame.capture_us >= f.since_us)
    if f.until_us is not None:
        where.append(Frame.capture_us < f.until_us)
    return where


@dataclass
class Query:
    model_id: int
    global_embedding: np.ndarray  # [D], unit norm
    tokens: Optional[np.ndarray] = None  # [Q, D]
    weights: Optional[np.ndarray] = None  # [Q], any positive scale
    exclude_frame_id: Optional[str] = None  # a stored frame used as the example is not its own result

    @classmethod
    def from_summary(cls, model_id: int, summary: Summary, exclude_frame_id: Optional[str] = None) -> "Query":
        """An example's summary as a query: its summary tokens weighted by the patches (cells) each stands for."""
        return cls(model_id, summary.global_embedding, summary.tokens, summary.sizes, exclude_frame_id)

    @classmethod
    def from_text(cls, model: ModelInfo, embedding: np.ndarray) -> "Query":
        """A text embedding as a query: the global embedding and, when the summary tokens share its space (the
        informativity summary), a single query token."""
        if model.has_footprint or model.token_dim != model.embedding_dim:
            return cls(model.id, embedding)
        return cls(model.id, embedding, embedding[None, :], np.ones(1, np.float32))


@dataclass
class Hit:
    id: int
    score: float
    global_score: float
    maxsim: Optional[float]
    frame: FrameData
    matches: List[Dict[str, Any]] = field(default_factory=list)  # best-matching summary tokens (centroids)

    @property
    def frame_id(self) -> str:
        return self.frame.frame_id

    def public(self) -> Dict[str, Any]:
        meta = self.frame.meta()
        for key in ("centroids", "sizes", "footprint"):
            meta.pop(key, None)
        return {"frame_id": self.frame_id, "score": round(self.score, 6), "global_score": round(self.global_score, 6),
                "maxsim": None if self.maxsim is None else round(self.maxsim, 6), "matches": self.matches, **meta}


def resolve_model(session: Session, model_id: Optional[int]) -> ModelInfo:
    """The model a query is for: ``model_id``'s, or the only one registered.

    ``NotFound`` when none is registered or ``model_id`` is unknown; ``Invalid`` when several are registered
    and ``model_id`` is None (embeddings of different models are never compared, so central does not guess).
    """
    models = store.list_models(session)
    if not models:
        raise NotFound("no model is registered", reason=BAD_QUERY)
    if model_id is None:
        if len(models) > 1:
            raise Invalid("several models are registered; say which with model_id", reason=BAD_QUERY)
        return models[0]
    for m in models:
        if m.id == model_id:
            return m
    raise NotFound(f"unknown model_id {model_id}", reason=BAD_QUERY)


def build_query(session: Session, encoders: "EncoderPool", *, image: Optional[bytes] = None,
                query_text: Optional[str] = None, like_frame: Optional[str] = None, model_id: Optional[int] = None,
                max_image_bytes: Optional[int] = None,
                max_image_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[ModelInfo, Query]:
    """The model and the query for exactly one of: an example ``image`` (an encoded file: JPEG, PNG, ...),
    a ``query_text`` (the model's text tower), or a stored frame (``like_frame``, its own model; never its own hit).

    The one implementation behind the API's ``POST /v1/search`` and ``tokenline-central search``.
    """
    given = [x for x in (image, query_text, like_frame) if x not in (None, "")]
    if len(given) != 1:
        raise Invalid("give exactly one of: image (file), q (text), like_frame (frame id)", reason=BAD_QUERY)
    if like_frame:
        fr, model = stored_frame(session, like_frame, model_id, "like_frame")
        return model, Query.from_summary(model.id, fr.summary, exclude_frame_id=fr.frame_id)
    model = resolve_model(session, model_id)
    enc = encoders.get(model)
    if image is not None:
        if max_image_bytes is not None and len(image) > max_image_bytes:
            raise TooLarge("image too large", reason=BAD_QUERY)
        return model, Query.from_summary(model.id, enc.encode_image_bytes(image, max_image_pixels))
    return model, Query.from_text(model, enc.encode_text(query_text or ""))


def build_region_query(session: Session, encoders: "EncoderPool", *, image: Optional[bytes] = None,
                       frame_id: Optional[str] = None, box: Optional[Tuple[float, float, float, float]] = None,
                       model_id: Optional[int] = None, max_image_bytes: Optional[int] = None,
                       max_image_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[ModelInfo, RegionQuery]:
    """The model and the region query for exactly one of: a crop (``image``, an encoded file) or a ``box`` on a
    stored frame (``frame_id``; the box as fractions of the frame, x0, y0, x1, y1). The one implementation
    behind the API's ``POST /v1/search/region``."""
    if (image is None) == (frame_id in (None, "")):
        raise Invalid("give exactly one of: image (a crop), frame_id with box", reason=BAD_QUERY)
    if image is not None:
        if max_image_bytes is not None and len(image) > max_image_bytes:
            raise TooLarge("image too large", reason=BAD_QUERY)
        model = resolve_model(session, model_id)
        return model, regions.crop_query(encoders, model, image, max_image_pixels)
    if box is None:
        raise Invalid("a region query on a frame needs box=x0,y0,x1,y1 (fractions of the frame)", reason=BAD_QUERY)
    fr, model = stored_frame(session, frame_id or "", model_id, "frame_id")
    return model, regions.box_query(fr, model, box)


def stored_frame(session: Session, frame_id: str, model_id: Optional[int], field: str) -> Tuple[FrameData, ModelInfo]:
    """A stored frame used as a query (``field`` names the form field) and its model; ``model_id``, when given,
    must be that model (embeddings of different models are never compared)."""
    fr = store.get_frame(session, frame_id.strip().lower())
    if fr is None:
        raise NotFound(f"unknown frame {frame_id!r}", reason=BAD_QUERY)
    if model_id is not None and model_id != fr.model_id:
        raise Invalid(f"{field} belongs to another model; embeddings of different models are never compared",
                      reason=BAD_QUERY)
    return fr, resolve_model(session, fr.model_id)


def normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def maxsim_scores(q_tokens: np.ndarray, q_weights: np.ndarray, doc_tokens: np.ndarray,
                  doc_mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """MaxSim of one query against C documents.

    ``q_tokens`` [Q, D], ``q_weights`` [Q], ``doc_tokens`` [C, K, D] -> (scores [C], per-doc-token best
    similarity [C, K]). Scores are the weighted mean over query tokens of the max cosine over doc tokens;
    ``doc_mask`` [C, K] (False: a token that takes no part, e.g. one that stands for no footprint cell).
    """
    c, k, d = doc_tokens.shape
    sims = (doc_tokens.reshape(c * k, d) @ q_tokens.T).reshape(c, k, -1)  # [C, K, Q], one BLAS call
    if doc_mask is not None:
        sims = np.where(doc_mask[:, :, None], sims, -1.0)  # the lowest cosine: never a best match
    w = np.asarray(q_weights, np.float32)
    w = w / max(float(w.sum()), 1e-12)
    scores = (sims.max(axis=1) * w[None, :]).sum(axis=1)
    return scores, sims.max(axis=2)


def binary_codes(emb: np.ndarray) -> np.ndarray:
    """1-bit codes of embeddings [N, D] (bit = value > 0, pgvector's ``binary_quantize``): uint64 [N, ceil(D/64)]."""
    e = np.asarray(emb, np.float32).reshape(-1, emb.shape[-1])
    words = -(-e.shape[1] // 64)
    packed = np.zeros((e.shape[0], words * 8), np.uint8)
    packed[:, : -(-e.shape[1] // 8)] = np.packbits(e > 0, axis=1)
    return packed.view(np.uint64)


def hamming(codes_t: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hamming distances of column-major codes ``codes_t`` [W, N] to one code ``q`` [W] (one pass per word)."""
    h = np.bitwise_count(codes_t[0] ^ q[0]).astype(np.uint16)
    for j in range(1, codes_t.shape[0]):
        h += np.bitwise_count(codes_t[j] ^ q[j])
    return h


_COLUMNS = {"ids": np.int64, "ts": np.int64, "site": np.int32, "line": np.int32, "camera": np.int32,
            "lists": np.int32}
FILES_VERSION = 2  # 2: the inverted lists (``lists`` column, ``centroids``)
LISTS_MIN = 64  # an index of n rows gets about sqrt(n) lists, at least this many
KMEANS_SAMPLE = 65_536  # rows the lists are trained on (evenly spaced over the files)


class VectorIndex:
    """SQLite's index of one model's global embeddings, in files next to the database, kept in sync by polling.

    Files (``<db>.vectors/m<model>/``): float32 embeddings, 1-bit codes, row ids, capture times, site/line/
    camera codes and inverted-list numbers, appended as rows arrive, plus ``alive`` (rows the sweeper deleted),
    ``centroids`` and ``meta.json`` (rows written, last id, deletion generation, lists). Embeddings are
    memory-mapped and the rest is small, so a restart reads no frame rows. A query scores every row passing the
    filters exactly when there are at most ``exact_max_rows``. Beyond that, once the files hold more than
    ``exact_max_rows`` rows, they are grouped into about sqrt(n) inverted lists (spherical k-means on a sample,
    retrained when the rows have grown fourfold; appended rows join their nearest list) and a query scores
    exactly the rows passing the filters in the lists nearest to it, about ``ivf_rows`` rows (more lists when
    the filters leave fewer); before the lists exist it takes the ``binary_candidates`` nearest by Hamming
    distance of the codes and scores those exactly (frames is append-only with AUTOINCREMENT ids, so
    ``id > last_id`` finds appends;
    the sweeper's deletion counter says when to re-read which ids are still alive). Writers of the files
    (several processes on one database) serialize on a ``flock``; a file set that does not match the database
    (another database, another width) is rebuilt.
    """

    def __init__(self, engine: Engine, model_id: int, dim: int, directory: Path,
                 train_above: Optional[int] = None) -> None:
        self.engine, self.model_id, self.dim = engine, model_id, dim
        self.train_above = train_above  # rows beyond which the files get inverted lists (None: never)
        self.dir = Path(directory)
        self.words = -(-dim // 64)
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.last_id = 0
        self.last_frame_id = ""
        self.deletions = -1
        self.codes: Dict[str, Dict[str, int]] = exact.new_codes()
        self.cols = {k: np.zeros(0, t) for k, t in _COLUMNS.items()}
        self.alive = np.zeros(0, bool)
        self._bits_buf = np.zeros((self.words, 0), np.uint64)
        self.bits_t = self._bits_buf
        self.emb: np.ndarray = np.zeros((0, self.dim), np.float32)
        self.centroids: Optional[np.ndarray] = None  # [C, dim] of the inverted lists, None before training
        self.trained_rows = 0  # rows when the lists were trained
        self.seen_max = -1  # the largest frame id (any model) when the files were last brought up to date
        self.stamp: Optional[float] = None  # meta.json's mtime when read

    # -- files ---------------------------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.dir / name

    def _read_meta(self) -> Optional[dict]:
        try:
            return json.loads(self._path("meta.json").read_text())
        except (OSError, ValueError):
            return None

    def _write_meta(self) -> None:
        meta = {"version": FILES_VERSION, "dim": self.dim, "count": self.n, "last_id": self.last_id,
                "last_frame_id": self.last_frame_id, "deletions": self.deletions, "codes": self.codes,
                "lists": 0 if self.centroids is None else len(self.centroids), "trained_rows": self.trained_rows}
        tmp = self._path("meta.json.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self._path("meta.json"))
        self.stamp = self._path("meta.json").stat().st_mtime

    def _open_files(self, meta: dict) -> bool:
        """Map the files as ``meta`` describes them; False when they are missing or too short."""
        n, d = int(meta["count"]), self.dim
        try:
            cols = {k: np.fromfile(self._path(k), t, count=n) for k, t in _COLUMNS.items()}
            alive = np.fromfile(self._path("alive"), np.uint8, count=n).astype(bool)
            bits = np.fromfile(self._path("bits"), np.uint64, count=n * self.words).reshape(n, self.words)
            size = self._path("emb").stat().st_size
        except OSError:
            return False
        if any(len(v) != n for v in cols.values()) or len(alive) != n or bits.shape[0] != n or size < n * d * 4:
            return False
        centroids = None
        if int(meta.get("lists", 0)):
            centroids = np.fromfile(self._path("centroids"), np.float32)
            if centroids.size != int(meta["lists"]) * d:
                return False
            centroids = centroids.reshape(-1, d)
        self.centroids, self.trained_rows = centroids, int(meta.get("trained_rows", 0))
        self.n, self.cols, self.alive = n, cols, alive
        self._bits_buf = np.ascontiguousarray(bits.T)
        self.bits_t = self._bits_buf
        self._map_emb()
        self.last_id, self.last_frame_id = int(meta["last_id"]), str(meta["last_frame_id"])
        self.deletions, self.codes = int(meta["deletions"]), meta["codes"]
        return True

    def _matches_db(self, meta: dict) -> bool:
        if meta.get("version") != FILES_VERSION or int(meta.get("dim", -1)) != self.dim:
            return False
        if int(meta.get("count", 0)) == 0:
            return True
        with Session(self.engine) as s:
            fid = s.scalar(select(Frame.frame_id).where(Frame.id == int(meta["last_id"]),
                                                        Frame.model_id == self.model_id))
        return fid == meta.get("last_frame_id")

    def _truncate_files(self) -> None:
        """Cut every file to ``self.n`` rows (a writer that died after appending, before its meta.json)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        sizes = {**{k: np.dtype(t).itemsize for k, t in _COLUMNS.items()}, "alive": 1, "bits": 8 * self.words,
                 "emb": 4 * self.dim}
        for name, size in sizes.items():
            with open(self._path(name), "ab") as fh:
                fh.truncate(self.n * size)

    def _append(self, ids, ts, place: Dict[str, np.ndarray], emb: np.ndarray, frame_id: str) -> None:
        """Append rows to the files and to the arrays in memory (codes grow with spare capacity)."""
        bits = binary_codes(emb)
        lists = (kmeans.assign(emb, self.centroids) if self.centroids is not None
                 else np.full(len(ids), -1, np.int32))
        for name, arr in (("ids", ids), ("ts", ts), *place.items(), ("lists", lists),
                          ("alive", np.ones(len(ids), np.uint8)), ("bits", bits), ("emb", emb.astype(np.float32))):
            with open(self._path(name), "ab") as fh:
                fh.write(np.ascontiguousarray(arr).tobytes())
        n, m = self.n, len(ids)
        for k, v in (("ids", ids), ("ts", ts), *place.items(), ("lists", lists)):
            self.cols[k] = np.concatenate([self.cols[k], v])
        self.alive = np.concatenate([self.alive, np.ones(m, bool)])
        cap = self._bits_buf.shape[1]
        if n + m > cap:
            buf = np.zeros((self.words, max(2 * cap, n + m, 1024)), np.uint64)
            buf[:, :n] = self.bits_t
            self._bits_buf = buf
        self._bits_buf[:, n:n + m] = bits.T
        self.bits_t = self._bits_buf[:, :n + m]
        self.n = n + m
        self.last_id, self.last_frame_id = int(ids[-1]), frame_id
        self._map_emb()

    def _map_emb(self) -> None:
        d = self.dim
        self.emb = np.memmap(self._path("emb"), np.float32, "r", shape=(self.n, d)) if self.n else np.zeros((0, d), np.float32)

    def _load_rows(self, chunk: int = 50_000, on_rows: Optional[Callable[[int], None]] = None) -> int:
        """Append the model's rows with ``id > last_id`` to the files (keyset pagination, one ``frombuffer`` per
        chunk of raw float32 embedding bytes; ``on_rows(n)`` after each); returns how many."""
        raw = type_coerce(Frame.global_embedding, LargeBinary)
        need, added = self.dim * 4, 0
        while True:
            with Session(self.engine) as s:
                rows = s.execute(select(Frame.id, raw, Frame.capture_us, Frame.site, Frame.line, Frame.camera,
                                        Frame.frame_id)
                                 .where(Frame.model_id == self.model_id, Frame.id > self.last_id)
                                 .order_by(Frame.id).limit(chunk)).all()
            if not rows:
                return added
            bad = next(((r[0], len(r[1])) for r in rows if len(r[1]) != need), None)
            if bad is not None:
                raise Internal(f"model {self.model_id}: frame row {bad[0]} has a {bad[1]}-byte embedding, "
                               f"expected {need} (dim {self.dim})", reason=BAD_QUERY)
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            emb = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), self.dim)
            ts = np.fromiter((r[2] for r in rows), np.int64, len(rows))
            place = {kind: np.fromiter((exact.code(self.codes, kind, r[3 + j]) for r in rows), np.int32, len(rows))
                     for j, kind in enumerate(exact.PLACES)}
            self._append(ids, ts, place, emb, rows[-1][6])
            added += len(rows)
            if on_rows is not None:
                on_rows(len(rows))
            if len(rows) < chunk:
                return added

    def _prune(self) -> None:
        """Mark the rows the sweeper deleted (reads ids only); rewrite the files once a quarter are dead."""
        with Session(self.engine) as s:
            alive_ids = np.fromiter(s.scalars(select(Frame.id).where(Frame.model_id == self.model_id,
                                                                      Frame.id <= self.last_id)), np.int64)
        alive = np.isin(self.cols["ids"], alive_ids, assume_unique=True)
        dead = int((~alive).sum())
        if dead and dead * 4 >= self.n:
            keep = np.flatnonzero(alive)
            data = {**{k: v[keep] for k, v in self.cols.items()}, "alive": np.ones(len(keep), np.uint8),
                    "bits": np.ascontiguousarray(self.bits_t.T[keep]), "emb": np.asarray(self.emb[keep], np.float32)}
            for name, arr in data.items():
                tmp = self._path(name + ".tmp")
                np.ascontiguousarray(arr).tofile(tmp)
                os.replace(tmp, self._path(name))
            self.n = len(keep)
            self.cols = {k: v[keep] for k, v in self.cols.items()}
            self._bits_buf = np.ascontiguousarray(self.bits_t[:, keep])
            self.bits_t, self.alive = self._bits_buf, np.ones(self.n, bool)
            self._map_emb()
            log.info("model %d: vector files compacted (%d deleted frames dropped)", self.model_id, dead)
        else:
            alive.astype(np.uint8).tofile(self._path("alive"))
            self.alive = alive
            if dead:
                log.info("model %d: %d deleted frame(s) masked in the index", self.model_id, dead)

    def _train(self) -> None:
        """Group the rows into about sqrt(n) inverted lists: spherical k-means on an evenly spaced sample of the
        alive rows, then every row's nearest list (the ``lists`` file rewritten, ``centroids`` written)."""
        alive = np.flatnonzero(self.alive)
        c = max(LISTS_MIN, int(round(np.sqrt(alive.size))))
        sample = alive[np.linspace(0, alive.size - 1, min(alive.size, KMEANS_SAMPLE)).astype(np.int64)]
        x = np.asarray(self.emb[sample], np.float32)
        seeds = np.linspace(0, len(x) - 1, c).astype(np.int64)
        _, cent = kmeans.kmeans(x, c, seeds)
        lists = kmeans.assign(self.emb, cent, chunk=65_536)
        for name, arr in (("centroids", cent.astype(np.float32)), ("lists", lists)):
            tmp = self._path(name + ".tmp")
            np.ascontiguousarray(arr).tofile(tmp)
            os.replace(tmp, self._path(name))
        self.centroids, self.trained_rows = cent.astype(np.float32), self.n
        self.cols["lists"] = lists
        log.info("model %d: %d rows grouped into %d inverted lists", self.model_id, self.n, c)

    def _needs_training(self) -> bool:
        if self.train_above is None or self.n <= self.train_above:
            return False
        return self.centroids is None or self.n >= 4 * max(1, self.trained_rows)

    def sync(self, on_rows: Optional[Callable[[int], None]] = None) -> None:
        """Cheap check per query: the largest frame id (appends) and the sweeper's deletion counter; the files are
        brought up to date under their ``flock`` only when either moved (``on_rows``: progress of the rows read)."""
        with self.lock:
            with Session(self.engine) as s:
                # the largest id of any model: SQLite reads it from the end of the rowid tree, while the largest of
                # one model would scan that model's index entries (170 ms at 1M frames)
                mx = int(s.scalar(select(func.max(Frame.id))) or 0)
                gen = store.counter_total(s, FRAMES_DELETED)
            if mx == self.seen_max and gen == self.deletions and not self._needs_training():
                return
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self._path("lock"), "a+") as lockf:
                fcntl.flock(lockf, fcntl.LOCK_EX)
                meta = self._read_meta()
                try:
                    stamp = self._path("meta.json").stat().st_mtime
                except OSError:
                    stamp = None
                if meta is None or not self._matches_db(meta):
                    self._reset()
                    self._truncate_files()
                elif stamp != self.stamp or int(meta["count"]) != self.n:
                    if not self._open_files(meta):
                        self._reset()
                    self.stamp = stamp
                    self._truncate_files()
                if self.deletions < 0:
                    self.deletions = gen
                elif gen != self.deletions:
                    self._prune()
                    self.deletions = gen
                added = self._load_rows(on_rows=on_rows)
                self.seen_max = mx
                if self._needs_training():
                    self._train()
                self._write_meta()
                if added:
                    log.debug("model %d: %d frame(s) added to the index", self.model_id, added)

    def _probe(self, q: np.ndarray, mask: np.ndarray, passing: int, k: int, ivf_rows: int) -> np.ndarray:
        """Positions passing ``mask`` (``passing`` of them) in the lists nearest to ``q``: as many lists as hold
        about ``ivf_rows`` passing rows on average, doubled until at least ``k`` pass; sorted."""
        n, c = self.n, len(self.centroids)
        order = np.argsort(-(self.centroids @ q))
        lists = self.cols["lists"][:n] + 1  # 0: a row appended before the lists (none once trained)
        upto = min(c, -(-max(ivf_rows, k) * c // max(1, passing)))
        while True:
            table = np.zeros(c + 1, bool)
            table[0] = True
            table[order[:upto] + 1] = True
            sel = np.flatnonzero(mask & table[lists])
            if sel.size >= k or upto >= c:
                return sel
            upto = min(c, 2 * upto)

    def knn(self, q: np.ndarray, k: int, f: Filters, exact_max_rows: int, binary_candidates: int,
            ivf_rows: int = 0) -> List[Tuple[int, float]]:
        self.sync()
        wanted = None
        if f.labels:  # one query over this model's frames, before the index is locked
            with Session(self.engine) as s:
                wanted = label_ids(s, self.model_id, f.labels)
        with self.lock:
            n, ids, ts = self.n, self.cols["ids"], self.cols["ts"]
            mask = exact.filter_mask(self.alive.copy(), self.codes, self.cols, ts, f.site, f.line, f.camera,
                                     f.since_us, f.until_us)
            if wanted is not None:
                mask &= np.isin(ids[:n], wanted)
            sel = np.flatnonzero(mask)
            if sel.size == 0:
                return []
            q = q.astype(np.float32)
            if sel.size > max(exact_max_rows, k) and self.centroids is not None and ivf_rows:
                sel = self._probe(q, mask, sel.size, k, ivf_rows)
            elif sel.size > max(exact_max_rows, binary_candidates, k):
                qb = binary_codes(q[None, :])[0]
                h = hamming(self.bits_t if sel.size == n else self.bits_t[:, sel], qb)
                sel = sel[np.argpartition(h, binary_candidates - 1)[:binary_candidates]]
                sel.sort()  # sequential reads of the mapped embeddings
            sims = (self.emb if sel.size == n else self.emb[sel]) @ q
            rows = ids[sel]
        return exact.top_k(sims, rows, k)


def vector_dir(engine: Engine) -> Path:
    """Where a SQLite database's vector files live: ``<database file>.vectors`` (a temporary directory for an
    in-memory database)."""
    db = engine.url.database
    if not db or db == ":memory:":
        return Path(tempfile.mkdtemp(prefix="tokenline-vectors-"))
    return Path(db).resolve().parent / (Path(db).name + ".vectors")


FIRST_ROUND_OVERSAMPLE = 1.5  # a sealed segment's first-round LIMIT: this many times its share of k, plus the pad
FIRST_ROUND_PAD = 10


def first_limits(k: int, rows: Sequence[int]) -> List[int]:
    """First-round LIMIT of each sealed segment (``rows`` frames each): ``FIRST_ROUND_OVERSAMPLE`` times its share
    of the top ``k`` plus ``FIRST_ROUND_PAD`` (a filtered iterative HNSW scan reads rows until that many pass, so
    its cost grows with the LIMIT), never more than ``k``."""
    total = max(1, sum(rows))
    return [min(int(k), int(np.ceil(FIRST_ROUND_OVERSAMPLE * k * n / total)) + FIRST_ROUND_PAD) for n in rows]


def may_hold_more(found: Sequence[Tuple[int, float, int]], segment: int, limit: int, k: int) -> bool:
    """Whether a segment that was asked for its best ``limit`` rows may hold more of the top ``k``: it returned
    all ``limit`` and the worst of them still ranks within the top ``k`` of everything found (or fewer than
    ``k`` were found). Rows are ``(id, cosine, segment)``."""
    mine = [c for _, c, sg in found if sg == segment]
    if len(mine) < limit:
        return False  # the segment has no more rows passing the filters
    if len(found) < k:
        return True
    kth = sorted((c for _, c, _ in found), reverse=True)[k - 1]
    return min(mine) >= kth


class Searcher:
    """Answers queries for any registered model; one instance per process (holds SQLite's vector indexes)."""

    def __init__(self, engine: Engine, cfg: SearchConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.pg = is_postgres(engine)
        self._indexes: Dict[int, VectorIndex] = {}
        self._hot: Dict[int, hot.HotMirror] = {}
        self._lock = threading.Lock()
        self._dir: Optional[Path] = None
        self._threads: Optional[ThreadPoolExecutor] = None

    def _pool(self) -> ThreadPoolExecutor:
        """Threads for work that overlaps a query's SQL (PostgreSQL: the hot mirror's scan)."""
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="search")
            return self._threads

    def _vindex(self, model: ModelInfo) -> VectorIndex:
        with self._lock:
            idx = self._indexes.get(model.id)
            if idx is None:
                if self._dir is None:
                    self._dir = vector_dir(self.engine)
                idx = self._indexes[model.id] = VectorIndex(
                    self.engine, model.id, model.embedding_dim, self._dir / f"m{model.id}",
                    train_above=self.cfg.exact_max_rows if self.cfg.ivf_rows else None)
            return idx

    def warm(self, model: ModelInfo, on_rows: Optional[Callable[[int], None]] = None) -> None:
        """Bring ``model``'s vector files up to date now (SQLite: the rows not in them yet, ``on_rows(n)`` per
        chunk), so the first search does not pay for it; PostgreSQL's indexes live in the server."""
        if not self.pg:
            self._vindex(model).sync(on_rows)

    def rerank_weight(self, model: ModelInfo) -> float:
        """w of the whole-image ranking: the configuration's, else the model's summary method's default."""
        if self.cfg.rerank_weight is not None:
            return float(self.cfg.rerank_weight)
        return DEFAULT_RERANK_WEIGHT[model.manifest.summary.method]

    def region_search(self, model: ModelInfo, query: RegionQuery, k: int, f: Filters = Filters()) -> List[regions.RegionHit]:
        """Region search (``central.regions``): the top ``k`` frames by their best-matching summary token."""
        return regions.region_search(self.engine, model, query, k,
                                     frame_conditions(model.id, f, self.pg), self.cfg.max_results)

    def knn(self, model: ModelInfo, q: np.ndarray, k: int, f: Filters) -> List[Tuple[int, float]]:
        """Top ``k`` frames of ``model`` by cosine of the global embedding: ``[(row id, cosine)]``."""
        return [(i, c) for i, c, _ in self.candidates(model, q, k, f)]

    def candidates(self, model: ModelInfo, q: np.ndarray, k: int,
                   f: Filters) -> List[Tuple[int, float, Optional[int]]]:
        """``knn`` with where each row lives: ``[(row id, cosine, segment)]`` (segment None on SQLite), so that
        PostgreSQL reads each candidate from its own partition (``store.candidate_tokens``)."""
        q = normalize(np.asarray(q, np.float32).reshape(-1))
        if q.shape[0] != model.embedding_dim:
            raise Invalid(f"query dimension {q.shape[0]} != model {model.name!r} dimension {model.embedding_dim}; "
                          "embeddings of different models are never compared", reason=BAD_QUERY)
        if not self.pg:
            return [(i, c, None) for i, c in self._vindex(model).knn(q, k, f, self.cfg.exact_max_rows,
                                                                     self.cfg.binary_candidates, self.cfg.ivf_rows or 0)]
        return self._pg_knn(model, q, k, f)

    def _pg_knn(self, model: ModelInfo, q: np.ndarray, k: int, f: Filters) -> List[Tuple[int, float, int]]:
        """PostgreSQL: exact over the hot, sealing and kept segments (the hot and sealing ones from the serving
        process's mirror, ``central.hot``, unless label filters or ``search.hot_rows`` say SQL), HNSW over each
        sealed segment's index (binary codes re-scored exactly for ``bit`` indexes); one statement, a branch per
        sealed segment, all merged by distance (a second statement when a segment may hold more). Sealed segments
        whose capture range misses the time filter are not searched.

        Two rounds (halfvec indexes): first each sealed segment is asked for a little more than its share of the top
        ``k`` (``first_limits``), not all ``k``: with filters an iterative HNSW scan reads rows until that many pass, so
        this costs a fraction (at 1M frames, 1/8 passing, k = 201: 27 ms instead of 62 for the kNN).
        A segment that filled its first LIMIT with rows that all rank within the top ``k`` of everything found may
        hold more of it (``may_hold_more``): a second statement reads those segments' whole top ``k``, as one round
        with LIMIT ``k`` would have."""
        d = int(model.embedding_dim)
        where = ["model_id = :m"]
        params: Dict[str, Any] = {"m": model.id, "q": "[" + ",".join(f"{x:.6g}" for x in q) + "]",
                                  "c": max(int(k), int(self.cfg.binary_candidates))}
        for kind in exact.PLACES:
            if getattr(f, kind) is not None:
                where.append(f"{kind} = :{kind}")
                params[kind] = getattr(f, kind)
        if f.since_us is not None:
            where.append("capture_us >= :since")
            params["since"] = int(f.since_us)
        if f.until_us is not None:
            where.append("capture_us < :until")
            params["until"] = int(f.until_us)
        valued = {n: v for n, v in f.labels if v is not None}
        if valued:  # the GIN index on labels answers containment
            where.append("labels @> CAST(:labels AS jsonb)")
            params["labels"] = json.dumps(valued)
        for i, (name, value) in enumerate(f.labels):
            if value is None:
                where.append(f"(labels -> :label{i}) IS NOT NULL")
                params[f"label{i}"] = name
        cond = " AND ".join(where)
        dist = f"global_embedding::halfvec({d}) <=> CAST(:q AS halfvec({d}))"
        with self.engine.connect() as conn, conn.begin():
            segs = [s for s in segments.list_segments(conn) if s.may_hold(f.since_us, f.until_us)]
        # the mirror syncs on a connection of its own: not while this one is held (threads holding one connection
        # each and waiting for a second could drain the pool)
        open_ids = [s.id for s in segs if s.exact and s.id != segments.KEPT]
        use_mirror = bool(open_ids) and not f.labels and self._mirror_synced(model, open_ids)
        if use_mirror:
            segs = [s for s in segs if s.id not in open_ids]
        exact_ids = [s.id for s in segs if s.exact]
        sealed = [s for s in segs if not s.exact]
        kinds = {str(s.index_kind) for s in sealed}
        ef = min(1000, max(int(self.cfg.ef_search), int(k), params["c"] if "bit" in kinds else 0))
        exact_part = []
        if exact_ids:
            exact_part = [f"(SELECT id, {dist} AS dist, segment FROM frames WHERE segment IN "
                          f"({', '.join(str(i) for i in exact_ids)}) AND {cond} ORDER BY dist LIMIT {int(k)})"]

        def branch(sg: segments.Segment, limit: int) -> str:
            # one branch per sealed segment, each with its own LIMIT: one branch over several partitions is a
            # Merge Append of their index scans, which trusts them to return rows in distance order, and an
            # iterative HNSW scan (relaxed order) does not: it lost neighbours (recall@10 0.93 at 1M frames)
            i, kind = int(sg.id), str(sg.index_kind)
            if kind == "bit":
                return (f"(SELECT id, dist, {i} FROM (SELECT id, {dist} AS dist FROM frames WHERE segment = {i} "
                        f"AND {cond} ORDER BY {segments.ann_order('bit', d)} LIMIT :c) b ORDER BY dist "
                        f"LIMIT {int(limit)})")
            return (f"(SELECT id, {dist} AS dist, {i} FROM frames WHERE segment = {i} AND {cond} "
                    f"ORDER BY {segments.ann_order(kind, d)} LIMIT {int(limit)})")

        def run(parts: List[str]) -> List[Tuple[int, float, int]]:
            if not parts:
                return []
            with self.engine.connect() as conn, conn.begin():
                conn.exec_driver_sql(f"SET LOCAL hnsw.ef_search = {ef}; SET LOCAL hnsw.iterative_scan = relaxed_order")
                rows = conn.execute(text(" UNION ALL ".join(parts)), params).all()
            return [(int(r[0]), 1.0 - float(r[1]), int(r[2])) for r in rows]

        # the mirror's exact scan (numpy, no connection) runs while the server answers the first round
        hot_rows = self._pool().submit(self._hot[model.id].knn, q, k, open_ids, f.site, f.line, f.camera,
                                       f.since_us, f.until_us) if use_mirror else None
        # bit branches read their binary_candidates whatever the LIMIT: one round, all k
        first = [int(k) if sg.index_kind == "bit" else n
                 for sg, n in zip(sealed, first_limits(k, [int(sg.rows or 0) for sg in sealed]))]
        found = run(exact_part + [branch(sg, n) for sg, n in zip(sealed, first)])
        if hot_rows is not None:
            found += hot_rows.result()
        more = [sg for sg, n in zip(sealed, first) if n < k and may_hold_more(found, sg.id, n, k)]
        if more:  # second round: these segments' whole top k (what one round with LIMIT k reads)
            again = {sg.id for sg in more}
            found = [t for t in found if t[2] not in again] + run([branch(sg, k) for sg in more])
        return sorted(found, key=lambda t: (-t[1], t[0]))[:k]

    def _mirror_synced(self, model: ModelInfo, open_ids: List[int]) -> bool:
        """True when ``model``'s open-segment mirror (``central.hot``) is up to date and may answer for them."""
        if not self.cfg.hot_rows:
            return False
        with self._lock:
            mirror = self._hot.get(model.id)
            if mirror is None:
                mirror = self._hot[model.id] = hot.HotMirror(self.engine, model.id, model.embedding_dim,
                                                             self.cfg.hot_rows)
        return mirror.sync(open_ids)

    def search(self, model: ModelInfo, query: Query, k: int, f: Filters = Filters(),
               rerank: Optional[bool] = None, rerank_weight: Optional[float] = None) -> List[Hit]:
        k = max(1, min(int(k), self.cfg.max_depth + 1))  # pages are cut from this ranking (central.paging)
        rerank = self.cfg.rerank if rerank is None else rerank
        w = self.rerank_weight(model) if rerank_weight is None else float(rerank_weight)
        use_tokens = rerank and query.tokens is not None and len(query.tokens) > 0 and w > 0
        n_cand = max(k, self.cfg.candidates) if use_tokens else k
        extra = 1 if query.exclude_frame_id else 0
        cands = self.candidates(model, query.global_embedding, n_cand + extra, f)
        where = {c[0]: c[2] for c in cands if c[2] is not None}  # PostgreSQL: each row's segment
        hits_tokens = None
        with Session(self.engine) as s:
            if use_tokens:  # the candidates' tokens only; whole frames for the hits below
                light = store.candidate_tokens(s, [c[0] for c in cands], model, where)
                cands = [c for c in cands if c[0] in light and light[c[0]][0] != query.exclude_frame_id]
            else:
                frames = store.get_frames(s, [c[0] for c in cands], model, where)
                cands = [c for c in cands if c[0] in frames and frames[c[0]].frame_id != query.exclude_frame_id]
            if not cands:
                return []
            gscore = np.array([c[1] for c in cands], np.float32)
            if use_tokens:
                qt = normalize(query.tokens)
                qw = np.ones(len(qt), np.float32) if query.weights is None else np.asarray(query.weights, np.float32)
                if qt.shape[1] != model.token_dim:
                    raise Invalid(f"query tokens of dim {qt.shape[1]} != model {model.name!r} token dimension "
                                  f"{model.token_dim}", reason=BAD_QUERY)
                kmax = max(len(light[c[0]][1]) for c in cands)
                docs = np.zeros((len(cands), kmax, model.token_dim), np.float32)
                mask = np.zeros((len(cands), kmax), bool)
                for i, c in enumerate(cands):
                    _, toks, valid = light[c[0]]
                    docs[i, :len(toks)] = toks
                    mask[i, :len(toks)] = valid
                ms, best_per_token = maxsim_scores(qt, qw, docs, mask)
                score = (1.0 - w) * gscore + w * ms
                hits_tokens = (ms, best_per_token)
            else:
                score = gscore
            order = sorted(range(len(cands)), key=lambda i: (-float(score[i]), cands[i][0]))[:k]
            if use_tokens:
                frames = store.get_frames(s, [cands[i][0] for i in order], model, where)
                order = [i for i in order if cands[i][0] in frames]  # a frame deleted meanwhile drops out
        hits = []
        for i in order:
            fr = frames[cands[i][0]]
            sm = fr.summary
            matches: List[Dict[str, Any]] = []
            if hits_tokens is not None:
                per = hits_tokens[1][i][: sm.k]
                for j in np.argsort(-per, kind="stable")[:3]:
                    if sm.footprint is None or sm.sizes[j] > 0:
                        matches.append(regions.match_json(fr, int(j), float(per[j]), model.manifest.input))
            hits.append(Hit(cands[i][0], float(score[i]), float(gscore[i]),
                            None if hits_tokens is None else float(hits_tokens[0][i]), fr, matches))
        return hits
