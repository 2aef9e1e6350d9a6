"""Configuration vocabulary both programs' configs share: the error type, names, the MQTT connection and TLS.

The edge agent (``edge_agent.config``) and central (``central.config``) each define their own document on top
of these: ``MqttClientConfig`` is how any client of the protocol reaches the broker (host, credentials, TLS),
extended by each program with its own keys. ``validate_config`` validates a loaded mapping once and turns
pydantic's errors into one line per bad key. Python 3.8+, pydantic and pyyaml only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Mapping, Optional, Type, TypeVar

from pydantic import Field, ValidationError, model_validator

from tokenline.documents import StrictModel, describe, read_yaml
from tokenline.topics import NAME_PATTERN

__all__ = ["NAME_PATTERN", "ConfigError", "MqttClientConfig", "TlsConfig", "load_config_file", "read_secret",
           "validate_config"]

M = TypeVar("M", bound=StrictModel)


class ConfigError(ValueError):
    """A configuration file that cannot be read or does not validate; the message names the keys."""


class TlsConfig(StrictModel):
    """TLS to the broker: the CA that signed the broker's certificate, optionally a client certificate."""

    enabled: bool = False
    ca_file: Optional[Path] = None  # default: the system's CAs
    cert_file: Optional[Path] = None  # client certificate (mutual TLS)
    key_file: Optional[Path] = None
    insecure: bool = False  # skip host name verification (testing only)

    @model_validator(mode="after")
    def _pair(self) -> "TlsConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttClientConfig(StrictModel):
    """How a client reaches the broker. The password comes inline or, better, from ``password_file`` (read
    again at every connection attempt, so a rotated password is picked up)."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: Optional[str] = Field(None, min_length=1, max_length=128)
    username: Optional[str] = None
    password: Optional[str] = None
    password_file: Optional[Path] = None
    keepalive_s: int = Field(30, gt=0)
    tls: TlsConfig = TlsConfig()

    @model_validator(mode="after")
    def _password(self) -> "MqttClientConfig":
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        return self


def read_secret(value: Optional[str], file: Optional[Path], what: str) -> Optional[str]:
    """The secret given inline or in a file (stripped); ConfigError when the file cannot be read."""
    if file is None:
        return value
    try:
        return Path(file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {file}: {exc.strerror or exc}") from None


def validate_config(cls: Type[M], data: Any, where: str,
                    tags: Mapping[str, Collection[str]] = {}) -> M:  # noqa: B006
    """Validate a loaded mapping as ``cls``; ConfigError lists ``key: problem`` per error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(where, "configuration", exc, tags)) from None


def load_config_file(cls: Type[M], path: Path | str, tags: Mapping[str, Collection[str]] = {}) -> M:  # noqa: B006
    """Read a YAML/JSON file and validate it as ``cls``."""
    return validate_config(cls, read_yaml(path, "configuration", ConfigError), str(path), tags)
