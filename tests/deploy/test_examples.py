"""The example configurations and the central image in deploy/ match the code they run."""

from __future__ import annotations

from pathlib import Path

from central.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_central_compose_example_validates() -> None:
    cfg = load_config(ROOT / "deploy" / "compose" / "central.example.yaml")
    assert cfg.mqtt.tls.enabled and cfg.mqtt.password_file == Path("/etc/tokenline/mqtt-1.password")
    assert cfg.mqtt.username == cfg.mqtt.client_id  # the generated broker configuration binds a service's id
    assert cfg.mqtt.port == 8883 and cfg.database.url.startswith("postgresql://")
    assert "central.example.yaml" in (ROOT / "deploy" / "compose" / "docker-compose.yml").read_text()


def test_central_image_copies_every_package_central_imports() -> None:
    docker = (ROOT / "deploy" / "compose" / "Dockerfile.central").read_text()
    for package in ("central", "runtime", "tokenline", "sql"):  # docs/architecture.md: central's package graph
        assert f"COPY {package} ./{package}" in docker, package
