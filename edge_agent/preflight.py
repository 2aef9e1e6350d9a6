"""Preflight: everything ``tokenline-edge run`` would refuse or fail on, found at once (``check-config``).

Beyond the schema (``edge_agent.config``): the model (manifest, file hashes, optionally loading it into the
runner), the MQTT password and TLS files (readable, PEMs that load), the originals upload token and CA, the
camera folders and video files (present, readable; writable where files are deleted or moved aside), and the
places the agent writes (outbox with its file journal, originals, health file). Every problem is a line that
names its configuration key.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import List, Optional, Tuple

from edge_agent.agent import AgentError, load_model, room_problem
from edge_agent.config import AgentConfig, FileSourceConfig, FolderSourceConfig
from edge_agent.journal import journal_path
from runtime.runners import RunnerError, make_runner
from tokenline.config import ConfigError, read_secret


def _readable_file(path: Path, key: str) -> Optional[str]:
    p = Path(path)
    if not p.exists():
        return f"{key}: {p} does not exist"
    if not p.is_file():
        return f"{key}: {p} is not a file"
    if not os.access(p, os.R_OK):
        return f"{key}: {p} is not readable"
    return None


def _writable_dir(path: Path, key: str) -> Optional[str]:
    """``path`` is a folder the agent can write in, or can be created (its first existing parent is writable)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{key}: {p} is not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{key}: cannot write in {p}"
    return None


def _tls(cfg: AgentConfig) -> List[str]:
    tls, out = cfg.mqtt.tls, []
    for key, f in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file), ("key_file", tls.key_file)):
        if f is not None:
            p = _readable_file(f, f"mqtt.tls.{key}")
            if p:
                out.append(p)
    if out:
        return out
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if tls.ca_file is not None:
            ctx.load_verify_locations(cafile=str(tls.ca_file))
    except (ssl.SSLError, OSError) as exc:
        out.append(f"mqtt.tls.ca_file: {tls.ca_file} is not a PEM certificate: {exc}")
    try:
        if tls.cert_file is not None:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (ssl.SSLError, OSError) as exc:
        out.append(f"mqtt.tls.cert_file/key_file: do not load as a certificate and its key: {exc}")
    return out


def _secret(value: Optional[str], file: Optional[Path], key: str) -> List[str]:
    if file is None:
        return []
    try:
        secret = read_secret(value, file, key)
    except ConfigError as exc:
        return [str(exc)]
    return [] if secret else [f"{key}: {file} is empty"]


def _cameras(cfg: AgentConfig) -> List[str]:
    out = []
    for i, cam in enumerate(cfg.cameras):
        key = f"cameras[{i}].source.path"
        src = cam.source
        if isinstance(src, FolderSourceConfig):
            d = Path(src.path)
            if not d.is_dir():
                out.append(f"{key}: folder {d} does not exist")
            elif not os.access(d, os.R_OK | os.X_OK):
                out.append(f"{key}: folder {d} is not readable")
            elif not os.access(d, os.W_OK):
                what = "files cannot be deleted after reading (delete_after_read)" if src.delete_after_read \
                    else "unusable files cannot be moved to rejected/"
                out.append(f"{key}: folder {d} is not writable: {what}")
        elif isinstance(src, FileSourceConfig):
            p = _readable_file(src.path, key)
            if p:
                out.append(p)
    return out


def _model(cfg: AgentConfig, load_runner: bool) -> Tuple[List[str], List[str]]:
    try:
        manifest = load_model(cfg)
    except AgentError as exc:
        return [], [str(exc)]
    lines = [f"model {manifest.name!r} ({manifest.hash_bytes().hex()}): input {manifest.input.width}x"
             f"{manifest.input.height} {manifest.input.color_order}, K={manifest.summary.k}, D={manifest.embedding_dim}"]
    problems = [p for p in (room_problem(cfg, manifest),) if p]
    if cfg.model.runner == "tensorrt" and cfg.model.engine is not None:
        p = _readable_file(cfg.model.engine, "model.engine")
        if p:
            return lines, problems + [p]
    if load_runner:
        try:
            runner = make_runner(cfg.model, manifest, Path(cfg.model.dir))
        except RunnerError as exc:
            return lines, problems + [f"model: {exc}"]
        lines.append(f"runner {runner.name}, batch sizes {list(runner.batch_sizes) or 'dynamic'}")
        runner.close()
    return lines, problems


def check(cfg: AgentConfig, load_runner: bool = True) -> Tuple[List[str], List[str]]:
    """``(summary lines, problems)`` for a validated configuration; no problems means ``run`` can start."""
    lines, problems = _model(cfg, load_runner)
    problems += _secret(cfg.mqtt.password, cfg.mqtt.password_file, "mqtt.password_file")
    if cfg.mqtt.tls.enabled:
        problems += _tls(cfg)
    up = cfg.originals.upload
    if cfg.originals.enabled and up.policy != "none":
        problems += _secret(up.token, up.token_file, "originals.upload.token_file")
        if up.ca_file is not None:
            p = _readable_file(up.ca_file, "originals.upload.ca_file")
            if p is None:
                try:
                    ssl.create_default_context(cafile=str(up.ca_file))
                except (ssl.SSLError, OSError) as exc:
                    p = f"originals.upload.ca_file: {up.ca_file} is not a PEM certificate: {exc}"
            if p:
                problems.append(p)
    problems += _cameras(cfg)
    writes = [(cfg.outbox.path.parent, "outbox.path")]
    if cfg.originals.enabled:
        writes.append((cfg.originals.dir, "originals.dir"))
    if cfg.health.file is not None:
        writes.append((cfg.health.file.parent, "health.file"))
    problems += [p for p in (_writable_dir(d, k) for d, k in writes) if p]
    for c in cfg.cameras:
        lines.append(f"camera {c.name} (line {c.line}): {c.source.kind}, sampling {c.sampling.mode}"
                     + (", never drops (file source)" if c.lossless else ""))
    lines.append(f"mqtt {cfg.mqtt.host}:{cfg.mqtt.port} tls={cfg.mqtt.tls.enabled} as {cfg.client_id}; "
                 f"tokens {cfg.messages.token_dtype}; outbox {cfg.outbox.path} (max {cfg.outbox.max_bytes} B)"
                 + (f"; file journal {journal_path(cfg.outbox.path)}" if any(c.lossless for c in cfg.cameras) else ""))
    return lines, problems
