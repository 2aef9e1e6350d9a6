"""Retention sweeper: deletes originals past their age or over the size cap, expired tokens and dead letters (by age
and over their size cap, oldest first), crash-safely.

Deleting an original is three steps, each durable before the next: (1) the row is marked ``deleting`` and
committed (reads answer 410 from here on), (2) the blob is unlinked unless another kept row shares it
(content addressing), (3) the row becomes a ``deleted`` tombstone. A sweep that dies anywhere is finished by
the next one, which first completes every ``deleting`` row; blobs no row references (an upload that died
before its commit) are removed after a grace period. Legal holds exempt a frame's original and tokens.
On PostgreSQL, tokens go a whole segment (partition) at a time (``_drop_segments``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from sqlalchemy import Engine, and_, delete, func, select, text, tuple_, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from central import segments
from central.anomaly.refsets import prune_scores
from central.blobs import BlobStore
from central.config import RetentionConfig
from central.originals import DAY_US
from central.store import FRAMES_DELETED, add_counters, now_us
from sql.db import is_postgres
from sql.models import DeadLetter, Frame, Original

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    resumed: int = 0  # 'deleting' rows left by an interrupted sweep and finished now
    expired: int = 0  # originals deleted by age
    capped: int = 0  # originals deleted to get under the size cap
    bytes_freed: int = 0
    blobs_unlinked: int = 0
    tokens_deleted: int = 0
    scores_deleted: int = 0  # anomaly scores of frames no longer stored
    orphans_removed: int = 0
    dead_letters_deleted: int = 0
    kept_bytes: int = 0
    errors: List[str] = field(default_factory=list)


def _orig_free():  # not under legal hold (portable boolean test)
    return Original.legal_hold.is_not(True)


def _frame_free():
    return Frame.legal_hold.is_not(True)


def _overrides(cfg: RetentionConfig, attr: str) -> list:
    return [(o.site, o.line, getattr(o, attr)) for o in cfg.lines if getattr(o, attr) is not None]


def refresh_expiry(engine: Engine, cfg: RetentionConfig) -> None:
    """Re-derive ``expires_us`` of kept originals from the current policy (per-line overrides included)."""
    ovr = _overrides(cfg, "originals_days")
    with Session(engine) as s, s.begin():
        overridden = [(si, li) for si, li, _ in ovr]
        place = select(Frame.frame_id).where(tuple_(Frame.site, Frame.line).in_(overridden)) if overridden else None
        default = int(cfg.originals_days * DAY_US)
        q = update(Original).where(Original.state == "kept", Original.expires_us != Original.stored_us + default)
        if place is not None:
            q = q.where(Original.frame_id.not_in(place))
        s.execute(q.values(expires_us=Original.stored_us + default), execution_options={"synchronize_session": False})
        for site, line, days in ovr:
            age = int(days * DAY_US)
            ids = select(Frame.frame_id).where(Frame.site == site, Frame.line == line)
            s.execute(update(Original).where(Original.state == "kept", Original.frame_id.in_(ids),
                                             Original.expires_us != Original.stored_us + age)
                      .values(expires_us=Original.stored_us + age), execution_options={"synchronize_session": False})


def _mark_deleting(engine: Engine, frame_ids: Sequence[str], reason: str) -> int:
    with Session(engine) as s, s.begin():
        return s.execute(update(Original).where(Original.frame_id.in_(list(frame_ids)), Original.state == "kept",
                                                _orig_free())
                         .values(state="deleting", deleted_reason=reason),
                         execution_options={"synchronize_session": False}).rowcount


def _finish_deleting(engine: Engine, blobs: BlobStore, report: SweepReport, limit: int) -> int:
    """Unlink blobs of ``deleting`` rows (unless a kept row shares them) and tombstone the rows."""
    done = 0
    while True:
        with Session(engine) as s:
            rows = s.execute(select(Original.frame_id, Original.location, Original.sha256, Original.bytes)
                             .where(Original.state == "deleting").limit(limit)).all()
        if not rows:
            return done
        with blobs.lock():
            with Session(engine) as s:
                shas = {r.sha256 for r in rows}
                shared = set(s.scalars(select(Original.sha256).where(Original.sha256.in_(shas),
                                                                     Original.state == "kept")))
            for r in rows:
                if r.sha256 not in shared and blobs.delete(r.location, sync=False):
                    report.blobs_unlinked += 1
            # No directory fsync here: a deletion lost to a power cut brings back a blob no kept row
            # references, which the orphan pass removes; the tombstone is what must be durable.
            with Session(engine) as s, s.begin():
                s.execute(update(Original).where(Original.frame_id.in_([r.frame_id for r in rows]),
                                                 Original.state == "deleting")
                          .values(state="deleted", deleted_us=now_us()),
                          execution_options={"synchronize_session": False})
        report.bytes_freed += sum(int(r.bytes) for r in rows)
        done += len(rows)
        log.debug("tombstoned %d originals", len(rows))


def sweep(engine: Engine, blobs: BlobStore, cfg: RetentionConfig, now: Optional[int] = None) -> SweepReport:
    """One full pass; safe to run concurrently with ingest and uploads, and to interrupt at any point."""
    now = now_us() if now is None else now
    rep = SweepReport()
    rep.resumed = _finish_deleting(engine, blobs, rep, cfg.batch)
    refresh_expiry(engine, cfg)

    # 1. age
    while True:
        with Session(engine) as s:
            ids = list(s.scalars(select(Original.frame_id).where(
                Original.state == "kept", _orig_free(), Original.expires_us <= now)
                .order_by(Original.stored_us).limit(cfg.batch)))
        if not ids:
            break
        rep.expired += _mark_deleting(engine, ids, "age")
        _finish_deleting(engine, blobs, rep, cfg.batch)

    # 2. size cap, oldest first
    if cfg.originals_max_bytes is not None:
        while True:
            with Session(engine) as s:
                total = int(s.scalar(select(func.coalesce(func.sum(Original.bytes), 0))
                                     .where(Original.state == "kept")) or 0)
                excess = total - cfg.originals_max_bytes
                if excess <= 0:
                    break
                pick, acc = [], 0
                for fid, b in s.execute(select(Original.frame_id, Original.bytes).where(
                        Original.state == "kept", _orig_free())
                        .order_by(Original.stored_us, Original.frame_id).limit(cfg.batch)):
                    pick.append(fid)
                    acc += int(b)
                    if acc >= excess:
                        break
            if not pick:
                rep.errors.append(f"size cap exceeded by {excess} bytes but every remaining original is on hold")
                log.warning(rep.errors[-1])
                break
            rep.capped += _mark_deleting(engine, pick, "size_cap")
            _finish_deleting(engine, blobs, rep, cfg.batch)

    # 3. tokens (longer retention), never a held frame
    rep.tokens_deleted = _sweep_tokens(engine, cfg, now)
    with Session(engine) as s, s.begin():
        rep.scores_deleted = prune_scores(s)

    # 4. orphans: blobs that no kept/deleting row references (an upload died before commit)
    rep.orphans_removed = _sweep_orphans(engine, blobs, cfg, now)

    # 5. dead letters: by age, then the oldest while over the size cap
    rep.dead_letters_deleted = sweep_dead_letters(engine, cfg, now)

    with Session(engine) as s:
        rep.kept_bytes = int(s.scalar(select(func.coalesce(func.sum(Original.bytes), 0))
                                      .where(Original.state == "kept")) or 0)
    log.info("sweep: %s", rep)
    return rep


def _sweep_tokens(engine: Engine, cfg: RetentionConfig, now: int) -> int:
    """Delete token rows past their line's ``tokens_days``, never a held frame.

    SQLite: row by row. PostgreSQL: a sealed segment whose newest frame is past the default retention is
    dropped whole (``_drop_segments``); rows are deleted one by one only in the hot and kept segments, and
    for lines whose override is shorter than the default (wherever they are), so a frame under the default
    policy lives at most one segment's span past ``tokens_days``."""
    ovr = _overrides(cfg, "tokens_days")
    deleted = 0
    open_only = None
    if is_postgres(engine):
        deleted += _drop_segments(engine, cfg, now)
        with engine.connect() as c:
            closed = [s.id for s in segments.list_segments(c) if s.state in segments.CLOSED_STATES]
        open_only = text(f"segment NOT IN ({', '.join(str(i) for i in closed)})") if closed else None
    default_cut = now - int(cfg.tokens_days * DAY_US)
    rules = []
    for si, li, d in ovr:
        cut = now - int(d * DAY_US)
        cond = and_(Frame.site == si, Frame.line == li, Frame.capture_us < cut)
        rules.append(and_(cond, open_only) if open_only is not None and cut <= default_cut else cond)
    default_where = [Frame.capture_us < default_cut]
    overridden = [(si, li) for si, li, _ in ovr]
    if overridden:
        default_where.append(tuple_(Frame.site, Frame.line).not_in(overridden))
    if open_only is not None:
        default_where.append(open_only)
    rules.append(and_(*default_where))
    for where in rules:
        while True:
            with Session(engine) as s, s.begin():
                ids = list(s.scalars(select(Frame.id).where(where, _frame_free()).limit(cfg.batch)))
                if not ids:
                    break
                n = s.execute(delete(Frame).where(Frame.id.in_(ids)),
                              execution_options={"synchronize_session": False}).rowcount
                # same transaction: search's vector indexes watch this counter to notice deletions
                add_counters(s, "retention", {FRAMES_DELETED: n})
                deleted += n
    return deleted


def _drop_segments(engine: Engine, cfg: RetentionConfig, now: int) -> int:
    """PostgreSQL: drop every sealed segment whose newest frame is past the default ``tokens_days``.

    In the same transaction, frames that must stay move to the kept segment first: held ones, and those of
    lines whose override keeps them longer and whose own cutoff they have not reached. Returns the frames
    dropped."""
    default_cut = now - int(cfg.tokens_days * DAY_US)
    longer = [(si, li, now - int(d * DAY_US)) for si, li, d in _overrides(cfg, "tokens_days")
              if now - int(d * DAY_US) < default_cut]
    with engine.connect() as c:
        due = [s for s in segments.list_segments(c) if s.state in segments.CLOSED_STATES and s.rows is not None
               and (s.rows == 0 or (s.max_capture_us is not None and s.max_capture_us < default_cut))]
    dropped = 0
    for seg in due:
        try:
            with Session(engine) as s, s.begin():
                s.execute(text("SET LOCAL lock_timeout = '10s'"))
                keep = "legal_hold"
                params: dict = {"seg": seg.id, "kept": segments.KEPT}
                for i, (si, li, cut) in enumerate(longer):
                    keep += f" OR (site = :s{i} AND line = :l{i} AND capture_us >= :c{i})"
                    params.update({f"s{i}": si, f"l{i}": li, f"c{i}": cut})
                moved = s.execute(text(f"UPDATE frames SET segment = :kept WHERE segment = :seg AND ({keep})"),
                                  params).rowcount
                n = int(s.execute(text(f"SELECT count(*) FROM {segments.partition(seg.id)}")).scalar_one())
                s.execute(text(f"DROP TABLE {segments.partition(seg.id)}"))
                s.execute(text("DELETE FROM frame_segments WHERE id = :i"), {"i": seg.id})
                add_counters(s, "retention", {FRAMES_DELETED: n})
            log.info("segment %d dropped: %d frames deleted, %d kept (held or longer retention)", seg.id, n, moved)
            dropped += n
        except OperationalError as exc:  # lock timeout behind a long query: the next sweep tries again
            log.warning("segment %d not dropped this time: %s", seg.id, exc.__class__.__name__)
    return dropped


def _dead_letter_size():
    """What a dead letter weighs against ``dead_letters_max_bytes``: its stored payload, detail and topic."""
    return (func.length(DeadLetter.payload) + func.length(DeadLetter.detail) + func.length(DeadLetter.topic))


def sweep_dead_letters(engine: Engine, cfg: RetentionConfig, now: Optional[int] = None) -> int:
    """Delete dead letters older than ``dead_letters_days``, then the oldest until the rest weigh at most
    ``dead_letters_max_bytes``; returns how many. Counted as ``dead_letters_deleted``."""
    now = now_us() if now is None else now
    deleted = 0
    cut = now - int(cfg.dead_letters_days * DAY_US)
    while True:
        with Session(engine) as s, s.begin():
            ids = list(s.scalars(select(DeadLetter.id).where(DeadLetter.received_us < cut)
                                 .order_by(DeadLetter.id).limit(cfg.batch)))
            if not ids:
                break
            deleted += _delete_dead_letters(s, ids)
    with Session(engine) as s:
        total = int(s.scalar(select(func.coalesce(func.sum(_dead_letter_size()), 0))) or 0)
    excess = total - cfg.dead_letters_max_bytes
    last_id = 0
    while excess > 0:
        with Session(engine) as s, s.begin():
            rows = s.execute(select(DeadLetter.id, _dead_letter_size()).where(DeadLetter.id > last_id)
                             .order_by(DeadLetter.id).limit(cfg.batch)).all()
            if not rows:
                break
            pick = []
            for rid, size in rows:
                if excess <= 0:
                    break
                pick.append(rid)
                excess -= int(size)
            last_id = pick[-1]
            deleted += _delete_dead_letters(s, pick)
    if deleted:
        log.info("dead letters: %d deleted (older than %s days or over %d bytes)", deleted, cfg.dead_letters_days,
                 cfg.dead_letters_max_bytes)
    return deleted


def _delete_dead_letters(session: Session, ids: List[int]) -> int:
    n = session.execute(delete(DeadLetter).where(DeadLetter.id.in_(ids)),
                        execution_options={"synchronize_session": False}).rowcount
    add_counters(session, "retention", {"dead_letters_deleted": n})
    return n


def _sweep_orphans(engine: Engine, blobs: BlobStore, cfg: RetentionConfig, now: int) -> int:
    cutoff_s = now / 1e6 - cfg.orphan_grace_s
    removed = 0
    for p, mtime in list(blobs.iter_temporaries()):
        if mtime < cutoff_s:
            p.unlink(missing_ok=True)
            removed += 1
    candidates = [k for k, m in blobs.iter_blobs() if m < cutoff_s]
    for i in range(0, len(candidates), 500):
        chunk = candidates[i:i + 500]
        with blobs.lock():
            with Session(engine) as s:
                live = set(s.scalars(select(Original.location).where(
                    Original.location.in_(chunk), Original.state.in_(("kept", "deleting")))))
            for k in chunk:
                if k not in live and blobs.delete(k):
                    removed += 1
    return removed
