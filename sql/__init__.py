"""Central's SQL store: SQLAlchemy 2.x models and Alembic migrations (SQLite default, PostgreSQL+pgvector).

``sql.models`` declares the tables, ``sql.db`` makes engines (SQLite in WAL mode, PostgreSQL via psycopg 3)
and ``sql.migrate`` runs the Alembic scripts that ship inside this package (``sql/migrations``).
"""

from __future__ import annotations
