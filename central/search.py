"""Search: exact (SQLite, in memory) or HNSW (pgvector) kNN on the global embedding, then MaxSim re-rank.

A query is a global embedding plus optional query tokens with weights (from an example image, a stored
frame, or a text embedding as a single token); ``build_query`` makes one from what the API or the CLI
was given, and resolves the model it belongs to. Candidates come only from the query's model; filters by site,
line, camera, capture time and labels (the frame metadata's) apply before ranking. The re-rank score is
``(1 - w) * cosine(global) + w * MaxSim``, where MaxSim is the weighted mean over query tokens of the best
cosine with any of the frame's summary tokens (late interaction).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import Engine, LargeBinary, func, select, text, type_coerce
from sqlalchemy.orm import Session

from central import store
from central.config import SearchConfig
from central.errors import BadParameter, Internal, Invalid, NotFound, TooLarge
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


@dataclass
class Query:
    model_id: int
    global_embedding: np.ndarray  # [D], unit norm
    tokens: Optional[np.ndarray] = None  # [Q, D]
    weights: Optional[np.ndarray] = None  # [Q], any positive scale
    exclude_frame_id: Optional[str] = None  # a stored frame used as the example is not its own result

    @classmethod
    def from_summary(cls, model_id: int, summary: Summary, exclude_frame_id: Optional[str] = None) -> "Query":
        """An example's summary as a query: its summary tokens weighted by the patches each stands for."""
        return cls(model_id, summary.global_embedding, summary.tokens, summary.sizes, exclude_frame_id)

    @classmethod
    def from_text(cls, model_id: int, embedding: np.ndarray) -> "Query":
        """A text embedding as a query: the global embedding and a single query token."""
        return cls(model_id, embedding, embedding[None, :], np.ones(1, np.float32))


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
        meta.pop("centroids", None)
        meta.pop("sizes", None)
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
        fr = store.get_frame(session, like_frame.strip().lower())
        if fr is None:
            raise NotFound(f"unknown frame {like_frame!r}", reason=BAD_QUERY)
        if model_id is not None and model_id != fr.model_id:
            raise Invalid("like_frame belongs to another model; embeddings of different models are never compared",
                          reason=BAD_QUERY)
        model = resolve_model(session, fr.model_id)
        return model, Query.from_summary(model.id, fr.summary, exclude_frame_id=fr.frame_id)
    model = resolve_model(session, model_id)
    enc = encoders.get(model)
    if image is not None:
        if max_image_bytes is not None and len(image) > max_image_bytes:
            raise TooLarge("image too large", reason=BAD_QUERY)
        return model, Query.from_summary(model.id, enc.encode_image_bytes(image, max_image_pixels))
    return model, Query.from_text(model.id, enc.encode_text(query_text or ""))


def normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def maxsim_scores(q_tokens: np.ndarray, q_weights: np.ndarray, doc_tokens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """MaxSim of one query against C documents.

    ``q_tokens`` [Q, D], ``q_weights`` [Q], ``doc_tokens`` [C, K, D] -> (scores [C], per-doc-token best
    similarity [C, K]). Scores are the weighted mean over query tokens of the max cosine over doc tokens.
    """
    c, k, d = doc_tokens.shape
    sims = (doc_tokens.reshape(c * k, d) @ q_tokens.T).reshape(c, k, -1)  # [C, K, Q], one BLAS call
    w = np.asarray(q_weights, np.float32)
    w = w / max(float(w.sum()), 1e-12)
    scores = (sims.max(axis=1) * w[None, :]).sum(axis=1)
    return scores, sims.max(axis=2)


class MemoryIndex:
    """Exact index of one model's global embeddings for SQLite, kept in sync with the table by polling.

    ``sync()`` appends rows with a larger ``id`` (frames is append-only with AUTOINCREMENT ids) and reloads
    everything when the row count shows deletions (the sweeper).
    """

    def __init__(self, engine: Engine, model_id: int, dim: int) -> None:
        self.engine, self.model_id, self.dim = engine, model_id, dim
        self.ids = np.zeros(0, np.int64)
        self.emb = np.zeros((0, dim), np.float32)
        self.ts = np.zeros(0, np.int64)
        self.place: Dict[str, np.ndarray] = {k: np.zeros(0, np.int32) for k in ("site", "line", "camera")}
        self.codes: Dict[str, Dict[str, int]] = {k: {} for k in ("site", "line", "camera")}
        self.last_id = 0
        self.deletions = -1  # deletion counter seen at the last load; -1 = never loaded
        self.lock = threading.Lock()

    def _code(self, kind: str, value: str) -> int:
        c = self.codes[kind]
        if value not in c:
            c[value] = len(c)
        return c[value]

    def _load(self, after_id: int, chunk: int = 50_000, on_rows: Optional[Callable[[int], None]] = None) -> None:
        """Append the model's rows with ``id > after_id``, ``chunk`` rows per query (keyset pagination).

        Embeddings are read as the raw little-endian float32 bytes SQLite stores and converted with one
        ``np.frombuffer`` per chunk, not one array per row: 1M frames load in seconds rather than a minute.
        """
        raw = type_coerce(Frame.global_embedding, LargeBinary)
        need = self.dim * 4
        while True:
            with Session(self.engine) as s:
                q = (select(Frame.id, raw, Frame.capture_us, Frame.site, Frame.line, Frame.camera)
                     .where(Frame.model_id == self.model_id, Frame.id > after_id).order_by(Frame.id).limit(chunk))
                rows = s.execute(q).all()
            if not rows:
                return
            blobs = [r[1] for r in rows]
            bad = next(((r[0], len(b)) for r, b in zip(rows, blobs) if len(b) != need), None)
            if bad is not None:
                raise Internal(f"model {self.model_id}: frame row {bad[0]} has a {bad[1]}-byte embedding, "
                               f"expected {need} (dim {self.dim})", reason=BAD_QUERY)
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            emb = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(rows), self.dim).astype(np.float32)
            ts = np.fromiter((r[2] for r in rows), np.int64, len(rows))
            self.ids = np.concatenate([self.ids, ids])
            self.emb = np.concatenate([self.emb, emb])
            self.ts = np.concatenate([self.ts, ts])
            for j, kind in enumerate(("site", "line", "camera")):
                codes = np.fromiter((self._code(kind, r[3 + j]) for r in rows), np.int32, len(rows))
                self.place[kind] = np.concatenate([self.place[kind], codes])
            self.last_id = after_id = int(ids[-1])
            if on_rows is not None:
                on_rows(len(rows))
            if len(rows) < chunk:
                return

    def _prune(self) -> None:
        """Drop the rows that are no longer in the table (the sweeper deleted them): reads ids only."""
        with Session(self.engine) as s:
            alive = np.fromiter(s.scalars(select(Frame.id).where(Frame.model_id == self.model_id,
                                                                  Frame.id <= self.last_id)), np.int64)
        keep = np.isin(self.ids, alive, assume_unique=True)
        if not keep.all():
            self.ids, self.emb, self.ts = self.ids[keep], self.emb[keep], self.ts[keep]
            self.place = {k: v[keep] for k, v in self.place.items()}
            log.info("model %d: %d deleted frame(s) dropped from the index", self.model_id, int((~keep).sum()))

    def sync(self, on_rows: Optional[Callable[[int], None]] = None) -> None:
        """Cheap check per query: the largest id (appends) and the deletion counter the sweeper bumps in the
        transaction that deletes frames (deletions -> the index drops the ids no longer in the table). Rows
        deleted behind central's back (manual SQL) are noticed only at the sweeper's next deletion or a restart."""
        with self.lock:
            with Session(self.engine) as s:
                mx = int(s.scalar(select(func.max(Frame.id)).where(Frame.model_id == self.model_id)) or 0)
                gen = store.counter_total(s, FRAMES_DELETED)
            if gen != self.deletions:
                if self.deletions >= 0:
                    self._prune()
                self.deletions = gen
            if mx > self.last_id:
                self._load(self.last_id, on_rows=on_rows)

    def knn(self, q: np.ndarray, k: int, f: Filters) -> List[Tuple[int, float]]:
        self.sync()
        wanted = None
        if f.labels:  # one query over this model's frames, before the index is locked
            with Session(self.engine) as s:
                wanted = label_ids(s, self.model_id, f.labels)
        with self.lock:
            mask = np.ones(len(self.ids), bool)
            for kind in ("site", "line", "camera"):
                want = getattr(f, kind)
                if want is not None:
                    code = self.codes[kind].get(want)
                    mask &= (self.place[kind] == code) if code is not None else False
            if f.since_us is not None:
                mask &= self.ts >= f.since_us
            if f.until_us is not None:
                mask &= self.ts < f.until_us
            if wanted is not None:
                mask &= np.isin(self.ids, wanted)
            sel = np.flatnonzero(mask)
            if sel.size == 0:
                return []
            emb, ids = (self.emb, self.ids) if sel.size == len(self.ids) else (self.emb[sel], self.ids[sel])
        sims = emb @ q.astype(np.float32)
        k = min(k, sims.size)
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.lexsort((ids[top], -sims[top]))]  # by score, ties by id: deterministic
        return [(int(ids[i]), float(sims[i])) for i in top]


class Searcher:
    """Answers queries for any registered model; one instance per process (holds SQLite's memory indexes)."""

    def __init__(self, engine: Engine, cfg: SearchConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.pg = is_postgres(engine)
        self._indexes: Dict[int, MemoryIndex] = {}
        self._lock = threading.Lock()

    def _memindex(self, model: ModelInfo) -> MemoryIndex:
        with self._lock:
            idx = self._indexes.get(model.id)
            if idx is None:
                idx = self._indexes[model.id] = MemoryIndex(self.engine, model.id, model.embedding_dim)
            return idx

    def warm(self, model: ModelInfo, on_rows: Optional[Callable[[int], None]] = None) -> None:
        """Load ``model``'s index now (SQLite: every embedding into memory, ``on_rows(n)`` per chunk), so the first
        search does not pay for it; PostgreSQL's HNSW index lives in the server."""
        if not self.pg:
            self._memindex(model).sync(on_rows)

    def knn(self, model: ModelInfo, q: np.ndarray, k: int, f: Filters) -> List[Tuple[int, float]]:
        """Top ``k`` frames of ``model`` by cosine of the global embedding: ``[(row id, cosine)]``."""
        q = normalize(np.asarray(q, np.float32).reshape(-1))
        if q.shape[0] != model.embedding_dim:
            raise Invalid(f"query dimension {q.shape[0]} != model {model.name!r} dimension {model.embedding_dim}; "
                          "embeddings of different models are never compared", reason=BAD_QUERY)
        if not self.pg:
            return self._memindex(model).knn(q, k, f)
        d = int(model.embedding_dim)
        where = ["model_id = :m"]
        params: Dict[str, Any] = {"m": model.id, "q": "[" + ",".join(f"{x:.6g}" for x in q) + "]", "k": int(k)}
        for kind in ("site", "line", "camera"):
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
        sql = (f"SELECT id, (global_embedding::halfvec({d}) <=> CAST(:q AS halfvec({d}))) AS dist FROM frames "
               f"WHERE {' AND '.join(where)} ORDER BY global_embedding::halfvec({d}) <=> CAST(:q AS halfvec({d})) "
               f"LIMIT :k")
        with self.engine.connect() as conn, conn.begin():
            conn.execute(text(f"SET LOCAL hnsw.ef_search = {max(int(self.cfg.ef_search), int(k))}"))
            conn.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
            rows = conn.execute(text(sql), params).all()
        out = [(int(r[0]), 1.0 - float(r[1])) for r in rows]
        out.sort(key=lambda t: (-t[1], t[0]))
        return out

    def search(self, model: ModelInfo, query: Query, k: int, f: Filters = Filters(),
               rerank: Optional[bool] = None, rerank_weight: Optional[float] = None) -> List[Hit]:
        k = max(1, min(int(k), self.cfg.max_depth + 1))  # pages are cut from this ranking (central.paging)
        rerank = self.cfg.rerank if rerank is None else rerank
        w = self.cfg.rerank_weight if rerank_weight is None else float(rerank_weight)
        use_tokens = rerank and query.tokens is not None and len(query.tokens) > 0 and w > 0
        n_cand = max(k, self.cfg.candidates) if use_tokens else k
        extra = 1 if query.exclude_frame_id else 0
        cands = self.knn(model, query.global_embedding, n_cand + extra, f)
        with Session(self.engine) as s:
            frames = store.get_frames(s, [c[0] for c in cands], model.embedding_dim)
        cands = [c for c in cands if c[0] in frames and frames[c[0]].frame_id != query.exclude_frame_id]
        if not cands:
            return []
        gscore = np.array([c[1] for c in cands], np.float32)
        hits_tokens = None
        if use_tokens:
            qt = normalize(query.tokens)
            qw = np.ones(len(qt), np.float32) if query.weights is None else np.asarray(query.weights, np.float32)
            kmax = max(frames[c[0]].summary.k for c in cands)
            docs = np.zeros((len(cands), kmax, model.embedding_dim), np.float32)
            for i, c in enumerate(cands):
                t = frames[c[0]].summary.tokens
                docs[i, :len(t)] = t
            ms, best_per_token = maxsim_scores(qt, qw, docs)
            score = (1.0 - w) * gscore + w * ms
            hits_tokens = (ms, best_per_token)
        else:
            score = gscore
        order = sorted(range(len(cands)), key=lambda i: (-float(score[i]), cands[i][0]))[:k]
        hits = []
        for i in order:
            fr = frames[cands[i][0]]
            sm = fr.summary
            matches: List[Dict[str, Any]] = []
            if hits_tokens is not None:
                per = hits_tokens[1][i][: sm.k]
                for j in np.argsort(-per)[:3]:
                    matches.append({"token": int(j), "sim": round(float(per[j]), 4),
                                    "x": round(float(sm.centroids[j, 0]), 4), "y": round(float(sm.centroids[j, 1]), 4),
                                    "size": round(float(sm.sizes[j]), 2)})
            hits.append(Hit(cands[i][0], float(score[i]), float(gscore[i]),
                            None if hits_tokens is None else float(hits_tokens[0][i]), fr, matches))
        return hits
