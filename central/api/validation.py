"""Strict request validation: unknown parameters are refused, and every 422 names the parameter at fault.

- ``reject_unknown`` (an app-wide dependency) compares the query string and form fields of a request with the
  parameters its route declares (read from the route itself, so a parameter added to a route is allowed at
  once) and answers 422 naming the first unknown one: a misspelt filter never silently widens a search.
- ``validation_error`` turns FastAPI's validation errors into the API's one error shape,
  ``{"error": "invalid_parameter", "detail": "k: Input should be greater than 0", "parameter": "k"}``.
- ``name_filter``, ``time_range``, ``finite``: checks of values FastAPI's types do not express.
"""

from __future__ import annotations

import math
from typing import Any, Dict, FrozenSet, Optional, Set, Tuple

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from central.errors import BadParameter
from tokenline.topics import NAME_RE, NAME_RULE

_allowed: Dict[int, Tuple[FrozenSet[str], FrozenSet[str]]] = {}
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _walk(dependant: Any, query: Set[str], body: Set[str]) -> None:
    query.update(getattr(p, "alias", p.name) for p in dependant.query_params)
    body.update(getattr(p, "alias", p.name) for p in dependant.body_params)
    for sub in dependant.dependencies:
        _walk(sub, query, body)


def _declared(route: Any) -> Tuple[FrozenSet[str], FrozenSet[str]]:
    """(query parameters, form/body fields) a route declares, through all its dependencies; cached per route."""
    key = id(route)
    if key not in _allowed:
        query: Set[str] = set()
        body: Set[str] = set()
        _walk(route.dependant, query, body)
        _allowed[key] = (frozenset(query), frozenset(body))
    return _allowed[key]


async def reject_unknown(request: Request) -> None:
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    query, body = _declared(route)
    for name in request.query_params.keys():
        if name not in query:
            raise BadParameter(name, f"unknown parameter; this route takes {', '.join(sorted(query)) or 'none'}")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in FORM_TYPES and body:
        form = await request.form()  # parsed once per request (FastAPI's own parsing reuses it)
        for name in form.keys():
            if name not in body:
                raise BadParameter(name, f"unknown field; this route takes {', '.join(sorted(body))}")


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 in the API's error shape; ``detail`` has one ``parameter: problem`` per error."""
    parts, first = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header", "form")]
        name = loc[0] if loc else "request"
        first = first or name
        what = "unknown key (not allowed)" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        parts.append(f"{'.'.join(loc) or name}: {what}")
    return JSONResponse({"error": "invalid_parameter", "detail": "; ".join(parts), "parameter": first},
                        status_code=422)


def name_filter(parameter: str, value: Optional[str]) -> Optional[str]:
    """A site/line/camera filter: None when empty, else a name (``[A-Za-z0-9_.-]{1,64}``)."""
    if value is None or value == "":
        return None
    if not NAME_RE.match(value):
        raise BadParameter(parameter, f"must match {NAME_RULE} (a site, line or camera name), got {value[:80]!r}")
    return value


def time_range(since_us: Optional[int], until_us: Optional[int]) -> None:
    for name, v in (("since_us", since_us), ("until_us", until_us)):
        if v is not None and v < 0:
            raise BadParameter(name, "a capture time in Unix microseconds, >= 0")
    if since_us is not None and until_us is not None and until_us <= since_us:
        raise BadParameter("until_us", "must be after since_us (until is exclusive)")


def finite(parameter: str, value: Optional[float], lo: float, hi: float) -> Optional[float]:
    if value is None:
        return None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise BadParameter(parameter, f"must be a finite number in [{lo:g}, {hi:g}], got {value!r}")
    return value


def page_size(parameter: str, value: int, most: int, paged: bool = True) -> int:
    if not 1 <= value <= most:
        more = "; page with next_cursor for more" if paged else ""
        raise BadParameter(parameter, f"must be between 1 and {most} (search.max_results){more}")
    return value
