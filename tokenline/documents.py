"""Validated YAML/JSON documents (manifest, edge and central configs): the strict base, reading, error lines.

Every document is a ``StrictModel`` (unknown keys rejected, frozen); ``read_yaml`` loads one from a file and
``describe`` turns pydantic's errors into one human line per bad key (``cameras[1].source.url: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Mapping, Tuple, Type

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """Base of every validated document: unknown keys are errors, values are frozen after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def key_path(loc: Tuple[Any, ...], tags: Mapping[str, Collection[str]] = {}) -> str:  # noqa: B006
    """``("cameras", 1, "source", "url", "url")`` -> ``cameras[1].source.url``.

    ``tags`` maps a discriminated-union field to its tags, which pydantic inserts into the location right
    after the field's name; they are left out.
    """
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and part in tags.get(str(loc[i - 1]), ()):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def describe(where: str, what: str, exc: ValidationError, tags: Mapping[str, Collection[str]] = {}) -> str:  # noqa: B006
    """``<where>: invalid <what>:`` followed by ``  key: problem`` for every error."""
    lines = [f"{where}: invalid {what}:"]
    for err in exc.errors():
        msg = "unknown key (not allowed)" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key_path(err['loc'], tags)}: {msg}")
    return "\n".join(lines)


def read_yaml(path: Path | str, what: str, error: Type[Exception]) -> Any:
    """Load a YAML (or JSON) document; ``error`` with a one-line reason when it cannot be read or parsed."""
    import yaml  # noqa: PLC0415

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{p}: not valid YAML/JSON: {exc}") from None
