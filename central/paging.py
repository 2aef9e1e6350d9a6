"""Cursor paging over a stable order: search results by (score, row id), the frames list by (capture time, row id).

A cursor is opaque to clients (URL-safe base64 of a small JSON document): the sort key of the last item served,
how many items were served, and a fingerprint of the query and filters it belongs to, so a cursor given with
another query is refused (422 naming ``cursor``) instead of silently continuing something else. Keyset paging
never repeats an item and never skips one that existed when the first page was served; items that arrive in
between appear only if they sort after the cursor.

Search pages are cut from the ranking of one query at increasing depth (``search.max_depth`` at most): the
ranking is deterministic (score rounded to the 6 decimals the API shows, then row id), so each page continues
exactly where the previous one stopped.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

from central.errors import BadParameter

if TYPE_CHECKING:  # pragma: no cover
    from central.search import Filters, Hit, Query, Searcher
    from central.store import ModelInfo

SCORE_DECIMALS = 6  # what the API shows; the order pages follow


@dataclass(frozen=True)
class Cursor:
    kind: str  # "search" | "frames"
    fingerprint: str  # the query and filters this cursor continues
    key: Tuple[float, int]  # sort key of the last item served: (score, row id) or (capture_us, row id)
    served: int  # items served before the next page


def fingerprint(**params: Any) -> str:
    """A short digest of what defines a listing (query, model, filters, ranking options)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode(c: Cursor) -> str:
    doc = {"v": 1, "t": c.kind, "f": c.fingerprint, "k": list(c.key), "n": c.served}
    return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode().rstrip("=")


def decode(text: Optional[str], kind: str, fp: str) -> Optional[Cursor]:
    """The cursor in ``text`` (None for the first page); ``BadParameter("cursor")`` when it is malformed, of
    another kind of listing, or belongs to another query or other filters."""
    if text is None or text == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        doc = json.loads(raw)
        key = doc["k"]
        cur = Cursor(str(doc["t"]), str(doc["f"]), (float(key[0]) if kind == "search" else int(key[0]), int(key[1])),
                     int(doc["n"]))
        if doc.get("v") != 1 or len(key) != 2 or cur.served < 0:
            raise ValueError("unknown cursor version")
    except (ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError):
        raise BadParameter("cursor", "not a cursor this API issued; use next_cursor of the previous page") from None
    if cur.kind != kind:
        raise BadParameter("cursor", f"a cursor of a {cur.kind} listing, not of {kind}")
    if cur.fingerprint != fp:
        raise BadParameter("cursor", "this cursor belongs to another query or other filters; send the same query "
                                     "and filters as for the previous page, or leave cursor out for a new search")
    return cur


def _rank_key(h: "Hit") -> Tuple[float, int]:
    return (-round(h.score, SCORE_DECIMALS), h.id)


def search_page(searcher: "Searcher", model: "ModelInfo", query: "Query", page_size: int, filters: "Filters", *,
                fp: str, after: Optional[Cursor], max_depth: int, rerank: Optional[bool] = None,
                rerank_weight: Optional[float] = None) -> Tuple[List["Hit"], Optional[str]]:
    """One page of a search and the cursor of the next one (None at the end or at ``max_depth``)."""
    served = after.served if after else 0
    room = max(0, max_depth - served)
    if room == 0:
        return [], None
    want = min(page_size, room)
    last = None if after is None else (-after.key[0], after.key[1])
    depth = served + want + 1
    while True:
        hits = sorted(searcher.search(model, query, depth, filters, rerank=rerank, rerank_weight=rerank_weight),
                      key=_rank_key)
        rest = hits if last is None else [h for h in hits if _rank_key(h) > last]
        exhausted = len(hits) < depth
        if len(rest) > want or exhausted or depth >= max_depth + 1:
            break
        depth = min(max_depth + 1, depth + (depth - len(rest)) + want)  # newer items ranked above the cursor
    page = rest[:want]
    more = len(rest) > want and served + len(page) < max_depth
    nxt = None
    if more and page:
        lh = page[-1]
        nxt = encode(Cursor("search", fp, (round(lh.score, SCORE_DECIMALS), lh.id), served + len(page)))
    return page, nxt


def frames_cursor(fp: str, items: Sequence[dict], served: int, limit: int) -> Optional[str]:
    """The cursor after a page of the frames list (``items`` fetched with ``limit + 1``), None at the end."""
    if len(items) <= limit:
        return None
    last = items[limit - 1]
    return encode(Cursor("frames", fp, (int(last["capture_us"]), int(last["id"])), served + limit))
