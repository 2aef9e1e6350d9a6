"""Domain errors as HTTP answers: one status per kind of ``central.errors``, one handler, one JSON shape."""

from __future__ import annotations

from typing import Dict, Type

from fastapi import Request
from fastapi.responses import JSONResponse

from central.errors import (CentralError, Conflict, Forbidden, Gone, Internal, Invalid, NotFound, TooLarge,
                            Unauthorized, Unavailable, Unprocessable)

STATUS: Dict[Type[CentralError], int] = {
    Invalid: 400, Unauthorized: 401, Forbidden: 403, NotFound: 404, Conflict: 409, Gone: 410, TooLarge: 413,
    Unprocessable: 422, Internal: 500, Unavailable: 503,
}


def http_status(exc: CentralError) -> int:
    """The HTTP status of a domain error: its kind's (the nearest base class in ``STATUS``), else 500."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


async def error_response(_request: Request, exc: CentralError) -> JSONResponse:
    """``{"error": reason, "detail": text}`` (plus ``parameter`` for a bad parameter) with the kind's status (and
    the Bearer challenge on 401)."""
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    body = {"error": exc.reason, "detail": exc.detail}
    if getattr(exc, "parameter", None):
        body["parameter"] = exc.parameter  # BadParameter: the request parameter at fault
    return JSONResponse(body, status_code=http_status(exc), headers=headers)
