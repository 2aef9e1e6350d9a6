"""`tokenline-central`: serve | ingest | migrate | search | sweep | create-token | register-model."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

from central.config import CentralConfig, ConfigError, load_config
from central.errors import CentralError


def _console():
    from rich.console import Console

    return Console()


def _print_error(exc: Exception) -> None:
    """One line, never wrapped, the message printed as written (no rich markup)."""
    from rich.markup import escape

    _console().print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _cfg(args: argparse.Namespace) -> CentralConfig:
    cfg = load_config(args.config)
    if args.db:
        cfg = cfg.model_copy(update={"database": cfg.database.model_copy(update={"url": args.db})})
    return cfg


def _engine(cfg: CentralConfig, migrate: bool = False):
    from sql.db import make_engine
    from sql.migrate import upgrade

    engine = make_engine(cfg.database.url)
    if migrate:
        upgrade(engine)
    return engine


def cmd_migrate(args: argparse.Namespace) -> int:
    from sql.migrate import current

    cfg = _cfg(args)
    engine = _engine(cfg, migrate=True)
    _console().print(f"[green]schema at revision {current(engine)}[/] ({engine.dialect.name})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from central.api import create_app
    from central.blobs import BlobStore
    from central.retention import sweep

    cfg = _cfg(args)
    engine = _engine(cfg, migrate=not args.no_migrate)
    app = create_app(cfg, engine)
    stop = threading.Event()
    if not args.no_sweeper:
        blobs = BlobStore(cfg.originals.root)

        def loop() -> None:
            while not stop.wait(cfg.retention.sweep_interval_s):
                try:
                    sweep(engine, blobs, cfg.retention)
                except Exception:  # noqa: BLE001 - the sweeper retries on the next interval
                    logging.getLogger("central.retention").exception("sweep failed")

        threading.Thread(target=loop, name="sweeper", daemon=True).start()
    _console().print(f"[bold]tokenline central[/] on http://{cfg.api.host}:{args.port or cfg.api.port} "
                     f"({engine.dialect.name}, originals in {cfg.originals.root})")
    uvicorn.run(app, host=cfg.api.host, port=args.port or cfg.api.port, log_level=args.log_level.lower())
    stop.set()
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from central.ingest import IngestWorker

    cfg = _cfg(args)
    engine = _engine(cfg, migrate=not args.no_migrate)
    worker = IngestWorker(engine, cfg.mqtt, cfg.ingest)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    logging.getLogger(__name__).info("ingest worker %r on %s:%d, group %r", cfg.mqtt.client_id, cfg.mqtt.host,
                                     cfg.mqtt.port, cfg.mqtt.group)
    worker.run()
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from central.blobs import BlobStore
    from central.retention import sweep

    cfg = _cfg(args)
    engine = _engine(cfg)
    rep = sweep(engine, BlobStore(cfg.originals.root), cfg.retention)
    _console().print(f"sweep: resumed {rep.resumed}, expired {rep.expired}, over cap {rep.capped}, "
                     f"freed {rep.bytes_freed} B, tokens deleted {rep.tokens_deleted}, orphans {rep.orphans_removed}, "
                     f"kept {rep.kept_bytes} B")
    for e in rep.errors:
        _console().print(f"[yellow]{e}[/]")
    return 0


def cmd_create_token(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from central.store import create_token

    cfg = _cfg(args)
    with Session(_engine(cfg)) as s, s.begin():
        token = create_token(s, args.name, args.role)
    _console().print(f"[green]{args.role} token for {args.name!r}[/] (shown once, stored hashed):")
    print(token)
    return 0


def cmd_register_model(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from central.store import register_model
    from tokenline.manifest import Manifest, verify_files

    cfg = _cfg(args)
    manifest = Manifest.from_file(args.model_dir)
    verify_files(manifest, Path(args.model_dir))
    with Session(_engine(cfg)) as s, s.begin():
        info = register_model(s, manifest, args.model_dir)
    _console().print(f"[green]model {info.name!r}[/] id {info.id}, hash {info.hash16}, D={info.embedding_dim}, "
                     f"K={info.k}, text tower: {info.has_text}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import json

    from sqlalchemy.orm import Session

    from central.encoder import EncoderPool
    from central.search import Filters, Searcher, build_query

    cfg = _cfg(args)
    engine = _engine(cfg)
    image = None
    if args.image:
        try:
            image = Path(args.image).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{args.image}: {exc.strerror or exc}") from None
    with Session(engine) as s:
        model, query = build_query(s, EncoderPool(cfg.search.providers), image=image, query_text=args.text,
                                   like_frame=args.like_frame, model_id=args.model_id)
    filters = Filters(args.site, args.line, args.camera, args.since_us, args.until_us)
    hits = Searcher(engine, cfg.search).search(model, query, args.k, filters, rerank=not args.no_rerank)
    if args.json:
        print(json.dumps([h.public() for h in hits], indent=1))
        return 0
    from rich.table import Table

    table = Table(title=f"{len(hits)} results ({model.name})")
    for col in ("score", "global", "maxsim", "frame", "site/line/camera", "captured (µs)"):
        table.add_column(col)
    for h in hits:
        table.add_row(f"{h.score:.4f}", f"{h.global_score:.4f}", "-" if h.maxsim is None else f"{h.maxsim:.4f}",
                      h.frame_id, f"{h.frame.site}/{h.frame.line}/{h.frame.camera}", str(h.frame.capture_us))
    _console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenline-central", description=__doc__)
    p.add_argument("--config", help="YAML/JSON configuration (defaults: docs/central.md)")
    p.add_argument("--db", help="database URL (overrides database.url)")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("migrate", help="create or upgrade the schema (Alembic)").set_defaults(fn=cmd_migrate)
    s = sub.add_parser("serve", help="HTTP API + web page (+ background retention sweeper)")
    s.add_argument("--port", type=int)
    s.add_argument("--no-sweeper", action="store_true")
    s.add_argument("--no-migrate", action="store_true")
    s.set_defaults(fn=cmd_serve)
    s = sub.add_parser("ingest", help="MQTT ingest worker (run several with distinct client ids)")
    s.add_argument("--no-migrate", action="store_true")
    s.set_defaults(fn=cmd_ingest)
    sub.add_parser("sweep", help="one retention pass").set_defaults(fn=cmd_sweep)
    s = sub.add_parser("create-token", help="create a bearer token (printed once)")
    s.add_argument("name")
    s.add_argument("--role", choices=("viewer", "device", "admin"), required=True)
    s.set_defaults(fn=cmd_create_token)
    s = sub.add_parser("register-model", help="register an exported model directory (manifest.json + ONNX)")
    s.add_argument("model_dir")
    s.set_defaults(fn=cmd_register_model)
    s = sub.add_parser("search", help="search from the command line")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--image")
    g.add_argument("--text")
    g.add_argument("--like-frame")
    s.add_argument("--model-id", type=int)
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--site")
    s.add_argument("--line")
    s.add_argument("--camera")
    s.add_argument("--since-us", type=int)
    s.add_argument("--until-us", type=int)
    s.add_argument("--no-rerank", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_search)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, CentralError) as exc:
        _print_error(exc)
        return 2
    except Exception as exc:  # noqa: BLE001 - CLI boundary: one readable line, details in the log
        from tokenline.manifest import ManifestError

        if isinstance(exc, ManifestError):
            _print_error(exc)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
