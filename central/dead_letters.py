"""Dead letters after a fix: replay them through the ingest's own validation and drop those that now commit.

A dead letter whose whole payload was kept (its reason is one a fix can cure: ``store.REPLAYABLE``, e.g.
``unknown_model`` until the model is registered) is fed to ``central.ingest.Ingestor.process`` exactly as if it
had just arrived on its topic, under the worker name ``dead-letter-replay``: a frame that commits (or was
already stored) removes the dead letter; one that fails again keeps a single dead letter, its reason and detail
refreshed. Truncated dead letters (garbage) cannot be replayed and are left to the retention sweep.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from sqlalchemy import Engine, and_, case, delete, func, select, update
from sqlalchemy.orm import Session

from central.config import IngestConfig
from central.ingest import Incoming, Ingestor
from sql.models import DeadLetter

WORKER = "dead-letter-replay"


def _whole():
    """A dead letter that kept its whole (non-empty) payload: it can be replayed."""
    return and_(DeadLetter.payload_len > 0, func.length(DeadLetter.payload) == DeadLetter.payload_len)


@dataclass
class ReplayReport:
    committed: int = 0  # now stored
    duplicates: int = 0  # were stored meanwhile (e.g. the edge sent the frame again)
    status: int = 0  # status/stats messages applied
    not_replayable: int = 0  # truncated: only their head was kept
    still_failing: Dict[str, int] = field(default_factory=dict)  # by the reason they fail with now

    def replayed(self) -> int:
        return self.committed + self.duplicates + self.status + sum(self.still_failing.values())


def replay(engine: Engine, cfg: IngestConfig, reason: Optional[str] = None, ids: Sequence[int] = (),
           limit: Optional[int] = None) -> ReplayReport:
    """Replay the dead letters selected by ``reason`` and/or ``ids`` (all when neither), oldest first."""
    ingestor = Ingestor(engine, cfg, WORKER)
    report = ReplayReport()
    failing: Counter = Counter()
    last, done = 0, 0
    while limit is None or done < limit:
        q = select(DeadLetter.id, DeadLetter.topic, DeadLetter.payload, DeadLetter.payload_len,
                   DeadLetter.payload_sha256).where(DeadLetter.id > last).order_by(DeadLetter.id).limit(100)
        if reason is not None:
            q = q.where(DeadLetter.reason == reason)
        if ids:
            q = q.where(DeadLetter.id.in_(list(ids)))
        with Session(engine) as s:
            rows = s.execute(q).all()
        if not rows:
            break
        for rid, topic, payload, length, sha in rows:
            last = rid
            if limit is not None and done >= limit:
                break
            done += 1
            if not length or len(payload) != length:
                report.not_replayable += 1
                continue
            res = ingestor.process([Incoming(0, 0, topic, bytes(payload))])
            if res.dead:
                failing[_keep_one(engine, rid, sha)] += 1
                continue
            report.committed += res.stored
            report.duplicates += res.duplicates
            report.status += res.status
            with Session(engine) as s, s.begin():
                s.execute(delete(DeadLetter).where(DeadLetter.id == rid))
    report.still_failing = dict(failing)
    return report


def _keep_one(engine: Engine, old_id: int, sha: str) -> str:
    """The replay failed and wrote a new dead letter for the payload: fold it into the old one (its reason and
    detail), so that replaying never multiplies dead letters. Returns the reason it fails with now."""
    with Session(engine) as s, s.begin():
        new = s.execute(select(DeadLetter.id, DeadLetter.reason, DeadLetter.detail)
                        .where(DeadLetter.payload_sha256 == sha, DeadLetter.id > old_id)
                        .order_by(DeadLetter.id.desc()).limit(1)).first()
        if new is None:
            return "unknown"
        s.execute(update(DeadLetter).where(DeadLetter.id == old_id).values(reason=new.reason, detail=new.detail))
        s.execute(delete(DeadLetter).where(DeadLetter.id == new.id))
        return str(new.reason)


def counts_by_reason(engine: Engine) -> List[tuple]:
    """``[(reason, count, replayable count)]`` of the dead letters kept."""
    whole = func.sum(case((_whole(), 1), else_=0))
    with Session(engine) as s:
        return [(r, int(n), int(w or 0)) for r, n, w in s.execute(
            select(DeadLetter.reason, func.count(), whole).group_by(DeadLetter.reason).order_by(DeadLetter.reason))]
