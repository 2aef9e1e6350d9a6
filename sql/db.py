"""Engines for central's two backends: SQLite (WAL, the embedded default) and PostgreSQL via psycopg 3."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url


def normalize_url(url: str) -> str:
    """Pick the psycopg 3 driver for plain ``postgresql://`` URLs; other URLs pass through unchanged."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the pragmas and pool settings central relies on.

    SQLite: WAL journal (readers never block the single writer), ``synchronous=NORMAL`` (durable at
    checkpoints, safe against application crashes), foreign keys on, a 10 s busy timeout so concurrent
    writers (ingest, sweeper, API) wait rather than fail.
    """
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10.0}, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _rec: Any) -> None:  # pragma: no cover - exercised by every test
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def is_read_only(engine: Engine) -> bool:
    """PostgreSQL refuses writes on this connection's database: a hot-standby replica (a search-only ``serve``,
    docs/deployment.md) or a database or role set read-only. SQLite: False."""
    if not is_postgres(engine):
        return False
    with engine.connect() as c:
        return c.execute(text("SHOW transaction_read_only")).scalar() == "on"
