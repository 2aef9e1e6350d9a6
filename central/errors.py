"""Central's domain errors: what went wrong, by kind, with a machine-readable ``reason``; no HTTP codes here.

Every module of central raises these; the API maps each kind to one HTTP status in a single exception
handler (``central.api.errors``), and the CLI prints ``detail`` on one line. ``reason`` is the ``error``
field of the API's JSON answer; each kind has a default, a raiser may name a more precise one.
"""

from __future__ import annotations

from typing import Optional


class CentralError(Exception):
    """Base of central's domain errors; ``str(error)`` is ``detail``."""

    reason = "error"

    def __init__(self, detail: str, reason: Optional[str] = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason


class Invalid(CentralError):
    """The request itself is wrong (a malformed id, an image that does not decode, an ambiguous query)."""

    reason = "invalid"


class Unauthorized(CentralError):
    """No credentials, or credentials nobody issued (or that were revoked)."""

    reason = "unauthorized"


class Forbidden(CentralError):
    """Valid credentials whose role may not do this."""

    reason = "forbidden"


class NotFound(CentralError):
    """The thing asked for does not exist (and never did, as far as central knows)."""

    reason = "not_found"


class Conflict(CentralError):
    """The request contradicts what is stored (same id, different content)."""

    reason = "conflict"


class Gone(CentralError):
    """The thing existed and was deleted on purpose (the retention policy)."""

    reason = "gone"


class TooLarge(CentralError):
    """The request's body is over a configured limit."""

    reason = "too_large"


class Unprocessable(CentralError):
    """Well-formed, but cannot be processed: a body unlike its declared checksum, a stored JPEG that does not decode."""

    reason = "unprocessable"


class Internal(CentralError):
    """Stored data or a model's output breaks its own contract (a corrupt row, a wrong-width embedding)."""

    reason = "internal"


class Unavailable(CentralError):
    """Something needed is not there right now (model files missing, the database down)."""

    reason = "unavailable"


class BadParameter(Unprocessable):
    """A request parameter that fails validation (out of range, not finite, unknown); names the parameter."""

    reason = "invalid_parameter"

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter}: {problem}")
        self.parameter = parameter
