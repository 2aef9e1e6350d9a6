"""Bearer-token authentication: who is calling (a cached token lookup) and whether their role may do it."""

from __future__ import annotations

import threading
import time
from typing import Dict, Iterable, Optional, Tuple

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from central import store
from central.errors import Forbidden, Unauthorized


class Principal(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    role: str


class TokenCache:
    """Bearer-token lookups cached for a few seconds (revocation takes effect within ``ttl_s``).

    Holds the engine and reads in a short session of its own: a lookup served from the cache costs no
    connection, and an upload being received holds none.
    """

    def __init__(self, engine: Engine, ttl_s: float = 5.0) -> None:
        self.engine, self.ttl = engine, ttl_s
        self._c: Dict[str, Tuple[float, Optional[tuple]]] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every cached lookup (after a revocation through this process: effective at once)."""
        with self._lock:
            self._c.clear()

    def get(self, token: str) -> Optional[tuple]:
        """``(name, role)`` of a valid token, else None."""
        now = time.monotonic()
        with self._lock:
            hit = self._c.get(token)
            if hit and now - hit[0] < self.ttl:
                return hit[1]
        with Session(self.engine) as s:
            val = store.lookup_token(s, token)
        with self._lock:
            if len(self._c) > 10000:
                self._c.clear()
            self._c[token] = (now, val)
        return val


def authorize(tokens: TokenCache, authorization: Optional[str], roles: Iterable[str]) -> Principal:
    """The caller behind an ``Authorization: Bearer <token>`` header, if its role is one of ``roles``
    (admins may do everything). ``Unauthorized`` without a valid token, ``Forbidden`` for another role."""
    allowed = set(roles) | {"admin"}
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized("missing bearer token")
    found = tokens.get(authorization[7:].strip())
    if found is None:
        raise Unauthorized("unknown or revoked token")
    if found[1] not in allowed:
        raise Forbidden(f"role {found[1]!r} may not do this (needs {sorted(allowed)})")
    return Principal(name=found[0], role=found[1])
