"""Reference sets as rows: create, change, delete, list and read them; their banks built apart from the change.

A set belongs to one camera (site, line, camera) and one model, at most one set per camera and model. Its frames
are given as frame ids or as "everything from this camera between these times"; they must be stored frames of
that camera and model. ``create_set``, ``update_set`` and ``delete_set`` take the caller's ``Session`` and never
commit (as ``central.store``); a change raises the set's ``version`` and leaves its bank to ``build_set``, which
builds the current version's bank from committed rows without holding a write transaction (a bank of thousands of
frames takes tens of seconds; SQLite has one writer, and ingest must not wait for it) and stores it only if the set
is still at that version. Until then the scorer keeps scoring with the bank built before (``bank_version``); a set
that never had a bank scores nothing yet. States: ``ready`` (the bank is the current version's), ``building``,
``failed`` (``build_error`` says why; the next change builds again). A change of the threshold by hand or of the
name alone re-labels the current bank in the change's transaction, with no build. One process at a time builds a set
(``build_lock``: an advisory lock on PostgreSQL, a file lock beside an SQLite file): several central processes on
one database (API processes, the CLI) never build the same set twice over.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: SQLite builds go without the file lock
    fcntl = None  # type: ignore[assignment]

import numpy as np
from sqlalchemy import Engine, delete, exists, func, select, text, update
from sqlalchemy.orm import Session

from central import store
from central.anomaly.bank import SetFrames, build_bank, with_threshold
from central.config import AnomalyConfig
from central.errors import Conflict, Invalid, NotFound
from sql.db import is_postgres
from sql.models import Frame, FrameScore, Model, ReferenceFrame, ReferenceSet
from sql.types import unpack_f32_rows, unpack_footprints, unpack_token_rows
from tokenline.anomaly import MODES, Bank, BankInfo
from tokenline.manifest import Manifest, SummarySpec
from tokenline.summary import Summary

REASON = "bad_reference_set"  # the reason of every Invalid raised here
BUILD_LOCK = 0x746B6C70  # PostgreSQL: a process building set n holds the session advisory lock (BUILD_LOCK, n)
MIXED_K = "the set's frames have different token counts (K)"


@dataclass(frozen=True)
class SetInfo:
    """A reference set as the API and the CLI show it (its bank's figures included)."""

    id: int
    name: str
    model_id: int
    site: str
    line: str
    camera: str
    mode: str
    metric: Optional[str]  # the bank's (None before the first build)
    threshold_mode: str
    quantile: float
    threshold: float
    version: int
    frame_count: int
    bank_tokens: int
    pool_tokens: int
    lists: int
    nprobe: int
    created_us: int
    updated_us: int
    state: str  # ready | building | failed
    bank_version: int  # the set version the bank (and threshold, bank_tokens, ...) was built for; 0: none yet
    build_error: Optional[str]

    def public(self) -> Dict[str, Any]:
        return dict(self.__dict__)


STATES = ("ready", "building", "failed")


def _state(row: ReferenceSet) -> str:
    if row.bank_version == row.version:
        return "ready"
    return "failed" if row.build_error else "building"


def _row_bank(row: ReferenceSet) -> Optional[Bank]:
    """The set's stored bank (None before its first build)."""
    return Bank.from_bytes(bytes(row.bank), where=f"reference_sets[{row.id}].bank") if row.bank else None


def _info(row: ReferenceSet, bank: Optional[Bank] = None) -> SetInfo:
    bank = bank or _row_bank(row)
    return SetInfo(row.id, row.name, row.model_id, row.site, row.line, row.camera, row.mode,
                   bank.info.metric if bank else None, row.threshold_mode, float(row.quantile), float(row.threshold),
                   row.version, row.frame_count, row.bank_tokens, bank.info.pool_tokens if bank else 0,
                   bank.lists if bank else 0, bank.info.nprobe if bank else 0, row.created_us, row.updated_us,
                   _state(row), row.bank_version, row.build_error)


# -- frames of a set -------------------------------------------------------------------------------------------
def frame_summaries(rows: Sequence[Any], spec: SummarySpec, with_global: bool) -> Summary:
    """The summaries of ``frames`` rows of one model whose manifest's summary is ``spec`` (``k``, ``tokens``,
    ``sizes``, ``centroids``, ``footprint`` and, when ``with_global``, ``global_embedding``) as one batch, in the
    rows' order. Ingest stores a footprint with every frame of a model that has a footprint grid and none
    otherwise; rows that break that are read without footprints (regions from the centroids)."""
    k, n = int(rows[0].k), len(rows)
    fp = None
    if spec.footprint_grid is not None and all(r.footprint is not None for r in rows):
        fp = unpack_footprints([r.footprint for r in rows], spec.footprint_grid)
    g = (np.stack([np.asarray(r.global_embedding, np.float32) for r in rows]) if with_global
         else np.zeros((n, 1), np.float32))
    return Summary(g, unpack_token_rows([r.tokens for r in rows], k, spec.dim),
                   unpack_f32_rows([r.sizes for r in rows], (k,)), unpack_f32_rows([r.centroids for r in rows], (k, 2)),
                   fp)


def load_frames(session: Session, frame_ids: Sequence[str], token_dim: int, with_globals: bool
                ) -> Tuple[List[str], SetFrames]:
    """The stored frames among ``frame_ids`` (in that order; frames of one model, whose tokens have dimension
    ``token_dim``) as arrays; frames retention deleted are skipped."""
    rows: Dict[str, Any] = {}
    cols = [Frame.frame_id, Frame.k, Frame.tokens, Frame.sizes] + ([Frame.global_embedding] if with_globals else [])
    ids = list(frame_ids)
    for i in range(0, len(ids), 500):
        for r in session.execute(select(*cols).where(Frame.frame_id.in_(ids[i: i + 500]))):
            rows[r.frame_id] = r
    found = [f for f in ids if f in rows]
    if not found:
        empty = np.zeros((0, 1), np.float32)
        return [], SetFrames(np.zeros((0, 1, 1), np.float32), empty, empty)
    k = int(rows[found[0]].k)
    if len({int(rows[f].k) for f in found}) != 1:
        raise Invalid(MIXED_K, reason=REASON)
    tokens = unpack_token_rows([rows[f].tokens for f in found], k, token_dim)
    sizes = unpack_f32_rows([rows[f].sizes for f in found], (k,))
    globals_ = (np.stack([np.asarray(rows[f].global_embedding, np.float32) for f in found]) if with_globals
                else np.zeros((len(found), 0), np.float32))
    return found, SetFrames(tokens, sizes, globals_)


def _select_frames(session: Session, model_id: int, place: Tuple[str, str, str], frame_ids: Sequence[str],
                   since_us: Optional[int], until_us: Optional[int], limit: int) -> List[str]:
    """Frame ids given, plus every frame of the camera and model in [since_us, until_us); each checked."""
    out: List[str] = []
    ids = sorted({store.check_frame_id(f.strip().lower()) for f in frame_ids})
    if ids:
        found: Dict[str, Tuple[int, str, str, str]] = {}
        for i in range(0, len(ids), 500):
            for r in session.execute(select(Frame.frame_id, Frame.model_id, Frame.site, Frame.line, Frame.camera)
                                     .where(Frame.frame_id.in_(ids[i: i + 500]))):
                found[r[0]] = (int(r[1]), r[2], r[3], r[4])
        missing = [f for f in ids if f not in found]
        if missing:
            raise NotFound(f"{len(missing)} frame(s) are not stored, e.g. {missing[0]}", reason=REASON)
        other = [f for f in ids if found[f] != (model_id, *place)]
        if other:
            raise Invalid(f"{len(other)} frame(s) are not from {'/'.join(place)} with model {model_id}, e.g. "
                          f"{other[0]} ({'/'.join(found[other[0]][1:])}, model {found[other[0]][0]})", reason=REASON)
        out += ids
    if since_us is not None or until_us is not None:
        q = select(Frame.frame_id).where(Frame.model_id == model_id, Frame.site == place[0], Frame.line == place[1],
                                         Frame.camera == place[2])
        if since_us is not None:
            q = q.where(Frame.capture_us >= since_us)
        if until_us is not None:
            q = q.where(Frame.capture_us < until_us)
        out += list(session.scalars(q.order_by(Frame.capture_us).limit(limit + 1)))
    out = sorted(set(out))
    if len(out) > limit:
        raise Invalid(f"more than anomaly.max_set_frames={limit} frames; choose a shorter time range", reason=REASON)
    return out


# -- building --------------------------------------------------------------------------------------------------
def _check_frames(session: Session, frame_ids: Sequence[str]) -> None:
    """A set's frames can make a bank: at least two of them stored, all with one token count (K)."""
    stored, ks = 0, set()
    ids = list(frame_ids)
    for i in range(0, len(ids), 500):
        for k, n in session.execute(select(Frame.k, func.count()).where(Frame.frame_id.in_(ids[i: i + 500]))
                                    .group_by(Frame.k)):
            stored += int(n)
            ks.add(int(k))
    if stored < 2:
        raise _too_few(stored)
    if len(ks) > 1:
        raise Invalid(MIXED_K, reason=REASON)


def _too_few(found: int) -> Invalid:
    return Invalid(f"a reference set needs at least two stored frames, {found} found", reason=REASON)


class Busy(Exception):
    """Another central process is building this set's bank; look again later."""


LOCKS_SUFFIX = ".build-locks"  # SQLite: a process building set n holds flock on <database file>.build-locks/<n>


@contextmanager
def build_lock(engine: Engine, set_id: int, wait: bool = True) -> Iterator[None]:
    """Held while this process builds the set's bank; ``wait`` False: ``Busy`` at once when another process holds
    it. Released after the build, or by the server or kernel when the process dies.
    PostgreSQL: the session advisory lock (``BUILD_LOCK``, set id) on a connection of its own, taken and committed
    before the build (no transaction stays open meanwhile). SQLite file: an exclusive ``flock`` on the file
    ``<n>`` in the directory ``<database file>.build-locks`` (API processes and the CLI share a host with their
    SQLite file; each file says who holds it: pid, host, since when); an in-memory database (one process) or a
    ``file:`` URI gets none. ``Busy`` names the holder (PostgreSQL: its database session's pid and address)."""
    if is_postgres(engine):
        lock = _advisory_lock(engine, set_id, wait)
    else:
        path = _lock_file(engine, set_id)
        lock = _file_lock(path, set_id, wait) if path is not None else nullcontext()
    with lock:
        yield


def _lock_file(engine: Engine, set_id: int) -> Optional[str]:
    """The file ``build_lock`` flocks for the set on a SQLite file database (None: PostgreSQL, or no file lock)."""
    if is_postgres(engine) or fcntl is None:
        return None
    database = engine.url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return os.path.join(database + LOCKS_SUFFIX, str(int(set_id)))


def _remove_lock_file(engine: Engine, set_id: int) -> None:
    """Remove a deleted set's lock file, unless a build holds it (that build then finds the set gone)."""
    path = _lock_file(engine, set_id)
    if path is None:
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:  # held by a build (BlockingIOError), or gone meanwhile
        pass
    finally:
        os.close(fd)


@contextmanager
def _file_lock(path: str, set_id: int, wait: bool) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(set_id, os.pread(fd, 200, 0).decode("utf-8", "replace").strip()) from None
        os.ftruncate(fd, 0)  # who holds it, for the others' Busy
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_utc_now()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _busy(set_id: int, holder: str) -> Busy:
    return Busy(f"reference set {set_id} is being built by another central process"
                + (f" ({holder})" if holder else ""))


_HOLDER = text("SELECT a.pid, a.client_addr FROM pg_locks l JOIN pg_stat_activity a "
               "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :c AND l.objid = :k "
               "AND l.objsubid = 2")


@contextmanager
def _advisory_lock(engine: Engine, set_id: int, wait: bool) -> Iterator[None]:
    key = {"c": BUILD_LOCK, "k": int(set_id)}
    with engine.connect() as c:
        if wait:
            c.execute(text("SELECT pg_advisory_lock(:c, :k)"), key)
        elif not c.execute(text("SELECT pg_try_advisory_lock(:c, :k)"), key).scalar():
            who = c.execute(_HOLDER, key).first()
            c.rollback()
            raise _busy(set_id, "" if who is None else f"database session pid {who.pid}"
                        + (f" from {who.client_addr}" if who.client_addr else ""))
        c.commit()
        try:
            yield
        finally:
            c.execute(text("SELECT pg_advisory_unlock(:c, :k)"), key)
            c.commit()


def build_set(engine: Engine, cfg: AnomalyConfig, set_id: int, wait: bool = True) -> SetInfo:
    """Build the bank of the set's current version and store it if the set is still at that version; the set as
    it is then. Reads in one session, builds with no transaction open, writes in a short one (the write matches
    the version read, so a change meanwhile keeps its own build pending). ``Invalid`` when the version cannot make
    a bank (its frames deleted by retention meanwhile, no token large enough, ...), recorded as ``build_error``.
    Under ``build_lock``: a set another process is building is waited for (then found built, unless it changed
    meanwhile), or with ``wait`` False ``Busy``."""
    with build_lock(engine, set_id, wait):
        return _build_set(engine, cfg, set_id)


def _build_set(engine: Engine, cfg: AnomalyConfig, set_id: int) -> SetInfo:
    with Session(engine) as s:
        row = s.get(ReferenceSet, set_id)
        if row is None:
            raise NotFound(f"unknown reference set {set_id}", reason=REASON)
        if row.bank_version == row.version:
            return _info(row)
        version = row.version
        model = s.get(Model, row.model_id)
        metric = cfg.metric
        manual = float(row.threshold) if row.threshold_mode == "manual" else None
        if manual is not None and row.bank:  # a number set by hand is in its bank's metric: keep it
            metric = _row_bank(row).info.metric
        info = BankInfo(set_id=row.id, set_version=version, name=row.name, site=row.site, line=row.line,
                        camera=row.camera, manifest_hash=model.hash16, mode=row.mode, metric=metric,
                        nprobe=cfg.nprobe, min_token_size=cfg.min_token_size, created_us=store.now_us())
        quantile = float(row.quantile)
        error = None
        try:
            found, frames = load_frames(s, _frame_ids(s, set_id), Manifest.from_json(model.manifest_json).summary.dim,
                                        with_globals=row.mode != "tokens")
            if len(found) < 2:  # frames deleted by retention since the change
                raise _too_few(len(found))
        except Invalid as exc:
            error = str(exc)
    built = None
    where = (ReferenceSet.id == set_id) & (ReferenceSet.version == version)
    if error is None:
        try:
            built = build_bank(frames, info, cfg.max_bank_tokens, quantile, manual)
        except ValueError as exc:
            error = str(exc)
        except Exception as exc:  # a defect: recorded on this version's set (not a newer one), then raised
            with Session(engine) as s, s.begin():
                s.execute(update(ReferenceSet).where(where).values(
                    build_error=f"internal error: {exc.__class__.__name__}: {exc}"[:500]))
            raise
    with Session(engine) as s, s.begin():
        if built is None:
            s.execute(update(ReferenceSet).where(where).values(build_error=error))
        else:
            s.execute(update(ReferenceSet).where(where).values(
                bank=built.bank.to_bytes(), bank_version=version, threshold=built.bank.info.threshold,
                frame_count=len(found), bank_tokens=built.bank.size, build_error=None))
    if built is None:
        raise Invalid(error, reason=REASON)
    with Session(engine) as s:
        return get_set(s, set_id)


def request_build(session: Session, set_id: int) -> SetInfo:
    """Ask for the set's bank to be built again: a failed build's error is cleared (state ``building``, for
    ``build_set``); a set building or ready is left as it is. The set then."""
    row = session.get(ReferenceSet, set_id)
    if row is None:
        raise NotFound(f"unknown reference set {set_id}", reason=REASON)
    if row.build_error is not None and row.bank_version != row.version:
        row.build_error = None
        session.flush()
    return _info(row)


def pending_sets(session: Session) -> List[int]:
    """Ids of the sets whose current version has no bank yet and no failed build."""
    return list(session.scalars(select(ReferenceSet.id).where(ReferenceSet.bank_version != ReferenceSet.version,
                                                              ReferenceSet.build_error.is_(None))
                                .order_by(ReferenceSet.id)))


def _frame_ids(session: Session, set_id: int) -> List[str]:
    return list(session.scalars(select(ReferenceFrame.frame_id).where(ReferenceFrame.set_id == set_id)
                                .order_by(ReferenceFrame.frame_id)))


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise Invalid(f"mode must be one of {MODES}, got {mode!r}", reason=REASON)
    return mode


def create_set(session: Session, cfg: AnomalyConfig, *, name: str, model_id: Optional[int] = None,
               site: Optional[str] = None, line: Optional[str] = None, camera: Optional[str] = None,
               frame_ids: Sequence[str] = (), since_us: Optional[int] = None, until_us: Optional[int] = None,
               mode: str = "tokens", quantile: Optional[float] = None, threshold: Optional[float] = None) -> SetInfo:
    """A new set from frame ids and/or a time range of one camera; the camera and model follow from the frames
    when not given. ``Conflict`` when the camera already has a set for that model."""
    _check_mode(mode)
    if not frame_ids and since_us is None and until_us is None:
        raise Invalid("give frame ids or a time range (since_us / until_us)", reason=REASON)
    frame_ids = [store.check_frame_id(str(f).strip().lower()) for f in frame_ids]
    if frame_ids and None in (model_id, site, line, camera):
        first = session.execute(select(Frame.model_id, Frame.site, Frame.line, Frame.camera)
                                .where(Frame.frame_id == frame_ids[0])).first()
        if first is None:
            raise NotFound(f"frame {frame_ids[0]} is not stored", reason=REASON)
        model_id = first[0] if model_id is None else model_id
        site, line, camera = site or first[1], line or first[2], camera or first[3]
    if None in (site, line, camera):
        raise Invalid("a time range needs site, line and camera", reason=REASON)
    if model_id is None:
        models = store.list_models(session)
        if len(models) != 1:
            raise Invalid("give model_id (several models are registered, or none)", reason=REASON)
        model_id = models[0].id
    elif session.get(Model, model_id) is None:
        raise NotFound(f"unknown model_id {model_id}", reason=REASON)
    place = (str(site), str(line), str(camera))
    if session.scalar(select(ReferenceSet.id).where(ReferenceSet.model_id == model_id, ReferenceSet.site == place[0],
                                                    ReferenceSet.line == place[1], ReferenceSet.camera == place[2])):
        raise Conflict(f"{'/'.join(place)} already has a reference set for model {model_id}; change or delete it",
                       reason="reference_set_exists")
    ids = _select_frames(session, model_id, place, frame_ids, since_us, until_us, cfg.max_set_frames)
    _check_frames(session, ids)
    now = store.now_us()
    row = ReferenceSet(name=name, model_id=model_id, site=place[0], line=place[1], camera=place[2], mode=mode,
                       threshold_mode="manual" if threshold is not None else "quantile",
                       quantile=cfg.quantile if quantile is None else float(quantile),
                       threshold=0.0 if threshold is None else float(threshold), version=1, frame_count=len(ids),
                       bank_tokens=0, bank=b"", created_us=now, updated_us=now, bank_version=0, build_error=None)
    session.add(row)
    session.flush()
    session.add_all([ReferenceFrame(set_id=row.id, frame_id=f) for f in ids])
    session.flush()
    return _info(row)


def update_set(session: Session, cfg: AnomalyConfig, set_id: int, *, add_frame_ids: Sequence[str] = (),
               remove_frame_ids: Sequence[str] = (), since_us: Optional[int] = None, until_us: Optional[int] = None,
               mode: Optional[str] = None, quantile: Optional[float] = None, threshold: Optional[float] = None,
               name: Optional[str] = None) -> SetInfo:
    """Add frames (ids or a time range), remove frames, change the mode or the threshold (a manual value, or
    back to a ``quantile``) or the name: the version rises and the bank waits for ``build_set``, except that a
    threshold set by hand or a new name on a current bank re-labels it at once."""
    row = session.get(ReferenceSet, set_id)
    if row is None:
        raise NotFound(f"unknown reference set {set_id}", reason=REASON)
    place = (row.site, row.line, row.camera)
    current = set(_frame_ids(session, set_id))
    add: Set[str] = set()
    if add_frame_ids or since_us is not None or until_us is not None:
        add = set(_select_frames(session, row.model_id, place, add_frame_ids, since_us, until_us,
                                 cfg.max_set_frames)) - current
    remove = {f.strip().lower() for f in remove_frame_ids} & current
    frames = sorted((current | add) - remove)
    if len(frames) > cfg.max_set_frames:
        raise Invalid(f"more than anomaly.max_set_frames={cfg.max_set_frames} frames", reason=REASON)
    if add or remove:
        _check_frames(session, frames)
    was_current = row.bank_version == row.version and bool(row.bank)
    if name is not None:
        row.name = name
    rebuild = bool(add or remove) or (mode is not None and mode != row.mode)
    if mode is not None:
        row.mode = _check_mode(mode)
    if threshold is not None:
        row.threshold_mode, row.threshold = "manual", float(threshold)
    elif quantile is not None:
        row.threshold_mode, row.quantile = "quantile", float(quantile)
        rebuild = True
    row.version += 1
    row.updated_us = store.now_us()
    row.build_error = None
    row.frame_count = len(frames)
    if add:
        session.add_all([ReferenceFrame(set_id=row.id, frame_id=f) for f in sorted(add)])
    if remove:
        session.execute(delete(ReferenceFrame).where(ReferenceFrame.set_id == set_id,
                                                     ReferenceFrame.frame_id.in_(sorted(remove))))
    bank = None
    if not rebuild and was_current:  # only the threshold or the name: the same bank under the new version
        old = _row_bank(row)
        bank = with_threshold(replace(old, info=replace(old.info, set_version=row.version, name=row.name)),
                              float(row.threshold) if row.threshold_mode == "manual" else old.info.threshold)
        row.bank, row.bank_version = bank.to_bytes(), row.version
        row.threshold = bank.info.threshold
    session.flush()
    return _info(row, bank)


def delete_set(session: Session, set_id: int) -> bool:
    """Delete a set, its frame list and every score made against it (SQLite: and its build lock file)."""
    if session.get(ReferenceSet, set_id) is None:
        return False
    session.execute(delete(FrameScore).where(FrameScore.set_id == set_id))
    session.execute(delete(ReferenceFrame).where(ReferenceFrame.set_id == set_id))
    session.execute(delete(ReferenceSet).where(ReferenceSet.id == set_id))
    _remove_lock_file(session.get_bind().engine, set_id)  # made again by the next build should this roll back
    return True


# -- reading ---------------------------------------------------------------------------------------------------
def list_sets(session: Session, model_id: Optional[int] = None, site: Optional[str] = None,
              line: Optional[str] = None, camera: Optional[str] = None) -> List[SetInfo]:
    q = select(ReferenceSet).order_by(ReferenceSet.site, ReferenceSet.line, ReferenceSet.camera, ReferenceSet.id)
    for col, v in ((ReferenceSet.model_id, model_id), (ReferenceSet.site, site), (ReferenceSet.line, line),
                   (ReferenceSet.camera, camera)):
        if v is not None:
            q = q.where(col == v)
    return [_info(r) for r in session.scalars(q)]


def get_set(session: Session, set_id: int) -> SetInfo:
    row = session.get(ReferenceSet, set_id)
    if row is None:
        raise NotFound(f"unknown reference set {set_id}", reason=REASON)
    return _info(row)


def set_frame_ids(session: Session, set_id: int) -> List[str]:
    get_set(session, set_id)
    return _frame_ids(session, set_id)


def bank_bytes(session: Session, set_id: int) -> Tuple[SetInfo, bytes]:
    """A set and its bank file's bytes (what ``reference-set export`` writes for the edge): the last bank built,
    of set version ``bank_version``; ``Conflict`` before the first build."""
    row = session.get(ReferenceSet, set_id)
    if row is None:
        raise NotFound(f"unknown reference set {set_id}", reason=REASON)
    if not row.bank:
        raise Conflict(f"reference set {set_id} has no bank yet ({_state(row)}"
                       f"{': ' + row.build_error if row.build_error else ''})", reason="bank_not_built")
    return _info(row), bytes(row.bank)


def active_versions(session: Session) -> Dict[Tuple[int, str, str, str], Tuple[int, int]]:
    """``{(model_id, site, line, camera): (set id, bank version)}`` of every set with a bank: what scorers poll per
    batch (a set's bank changes when a build stores a new one)."""
    return {(int(m), s, li, c): (int(i), int(v)) for i, v, m, s, li, c in session.execute(
        select(ReferenceSet.id, ReferenceSet.bank_version, ReferenceSet.model_id, ReferenceSet.site,
               ReferenceSet.line, ReferenceSet.camera).where(ReferenceSet.bank_version > 0))}


def load_bank(session: Session, set_id: int) -> Optional[Bank]:
    """The set's last built bank (None for an unknown set or before its first build)."""
    raw = session.scalar(select(ReferenceSet.bank).where(ReferenceSet.id == set_id))
    return None if not raw else Bank.from_bytes(bytes(raw), where=f"reference_sets[{set_id}].bank")


def prune_scores(session: Session, batch: int = 5000) -> int:
    """Delete scores whose frames are gone (retention); returns how many."""
    total = 0
    while True:
        ids = list(session.scalars(select(FrameScore.frame_id).where(
            ~exists().where(Frame.frame_id == FrameScore.frame_id)).limit(batch)))
        if not ids:
            return total
        total += session.execute(delete(FrameScore).where(FrameScore.frame_id.in_(ids))).rowcount or 0
        if len(ids) < batch:
            return total
