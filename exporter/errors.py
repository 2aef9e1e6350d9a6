"""The exporter's errors: ``ExportError`` and ``OptionsError`` (options that do not validate, naming each key)."""

from __future__ import annotations

from typing import Any, Dict, List

from pydantic import ValidationError

from tokenline.documents import describe


class ExportError(RuntimeError):
    """The export could not be produced or failed its validation."""


class OptionsError(ExportError):
    """Options that do not validate. The message names every bad key (``tokenline.documents.describe``);
    ``errors`` keeps pydantic's list (``loc``, ``msg``, ``type``) for callers that name keys their own way,
    as the CLI does with its flags."""

    def __init__(self, model: str, what: str, exc: ValidationError) -> None:
        super().__init__(describe(model, what, exc))
        self.errors: List[Dict[str, Any]] = exc.errors()
