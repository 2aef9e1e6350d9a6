"""`tokenline-central`: serve | ingest | migrate | search | sweep | segments | token | dead-letters | register-model |
models | reference-set | backfill.

The conventions of ``runtime.cli``: ``--config``, ``--db``, ``--log-level``/``-v`` and ``--debug`` anywhere on the
line; results on stdout (``--json`` for machines), people's messages on stderr; every expected error is one line
with the fix and exit code 2. Commands are quiet (WARNING) by default; ``serve`` and ``ingest`` log at INFO.
"""

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
from runtime.cli import (CliError, common_options, configure_logging, format_time_us, print_json, progress,
                         run_command)

log = logging.getLogger(__name__)
DAEMONS = ("serve", "ingest")  # log at INFO unless told otherwise


def _console():
    """Results for people (tables) on stdout; wide when stdout is not a terminal (ids are never cut)."""
    from rich.console import Console

    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)


def _say(text: str) -> None:
    """A human note on stderr (stdout stays for results: a token, a table, JSON)."""
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(text)


def _cfg(args: argparse.Namespace) -> CentralConfig:
    cfg = load_config(args.config)
    if getattr(args, "db", None):
        cfg = cfg.model_copy(update={"database": cfg.database.model_copy(update={"url": args.db})})
    return cfg


def open_database(url: str, migrate: bool = False):
    """An engine that answers (and, with ``migrate``, a current schema); ``CliError`` with the fix otherwise."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

    from sql.db import make_engine
    from sql.migrate import upgrade

    try:
        engine = make_engine(url)
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise CliError(f"database.url {url!r} is not a database URL ({exc}); use sqlite:///path/central.db or "
                       "postgresql://user:password@host/db") from None
    safe = make_url(engine.url).render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        if migrate:
            upgrade(engine)
    except DBAPIError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        fix = "check database.url (or --db), that the server runs and the credentials"
        if engine.dialect.name == "sqlite":
            db = engine.url.database or ""
            parent = Path(db).expanduser().resolve().parent if db and db != ":memory:" else None
            if parent is not None and not parent.is_dir():
                fix = f"the directory {parent} does not exist: create it or point database.url (or --db) elsewhere"
            else:
                fix = "check that the file is a tokenline database and that this user may write it and its directory"
        raise CliError(f"cannot open database {safe}: {reason}; {fix}") from None
    return engine


def _engine(cfg: CentralConfig, migrate: bool = False):
    return open_database(cfg.database.url, migrate=migrate)


def _start_maintainer(engine, cfg: CentralConfig) -> None:
    """PostgreSQL: seal and index segments in the background (one process per database does it)."""
    from sql.db import is_postgres

    if is_postgres(engine) and cfg.segments.maintainer:
        from central.segments import SegmentMaintainer

        SegmentMaintainer(engine, cfg.segments).start()


def cmd_segments(args: argparse.Namespace) -> int:
    from rich.table import Table

    from central import segments
    from sql.db import is_postgres

    cfg = _cfg(args)
    engine = _engine(cfg)
    if not is_postgres(engine):
        _console().print("SQLite keeps one frames table: no segments")  # the listing's answer: stdout
        return 0
    if args.seal:
        segments.seal(engine)
    if args.seal or args.build:
        segments.build_indexes(engine, cfg.segments)
    with engine.connect() as c:
        segs = segments.list_segments(c)
    table = Table("segment", "state", "frames", "captured from (us)", "to (us)", "index")
    for sg in segs:
        table.add_row(str(sg.id), sg.state, "" if sg.rows is None else f"{sg.rows:,}", str(sg.min_capture_us or ""),
                      str(sg.max_capture_us or ""), sg.index_kind or "")
    _console().print(table)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from sql.migrate import current

    cfg = _cfg(args)
    engine = _engine(cfg, migrate=True)
    _say(f"[green]schema at revision {current(engine)}[/] ({engine.dialect.name})")
    return 0


def warm_up(app_services, engine) -> None:
    """Load every searchable model's encoder and (SQLite) search index now, each with a log line, so that the
    first search does not pay for it. A model whose files are missing here is logged and skipped."""
    import time

    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from central import store
    from sql.models import Frame

    svc = app_services
    with Session(engine) as s:
        models = store.list_models(s)
        counts = dict(s.execute(select(Frame.model_id, func.count()).group_by(Frame.model_id)).all())
    for m in models:
        if m.model_dir is not None:
            t0 = time.monotonic()
            try:
                enc = svc.encoders.get(m)
                log.info("model %d %r (%s) loaded for query encoding in %.1fs (%s)", m.id, m.name, m.hash16[:8],
                         time.monotonic() - t0, ", ".join(enc.runner.providers))
            except CentralError as exc:
                log.warning("model %d %r: query encoding unavailable on this host: %s", m.id, m.name, exc)
        n = int(counts.get(m.id, 0))
        t0 = time.monotonic()
        with progress(n, f"search index of model {m.id} ({m.name})", "frames", log=log) as advance:
            svc.searcher.warm(m, advance)
        log.info("search index of model %d %r ready: %d frames in %.1fs", m.id, m.name, n, time.monotonic() - t0)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from central.api import create_app
    from central.blobs import BlobStore
    from central.retention import sweep

    cfg = _cfg(args)
    engine = _engine(cfg, migrate=not args.no_migrate)
    app = create_app(cfg, engine)
    if not args.no_warm_up:
        warm_up(app.state.services, engine)
    stop = threading.Event()
    _start_maintainer(engine, cfg)
    if not args.no_sweeper:
        blobs = BlobStore(cfg.originals.root)

        def loop() -> None:
            while not stop.wait(cfg.retention.sweep_interval_s):
                try:
                    sweep(engine, blobs, cfg.retention)
                except Exception:  # noqa: BLE001 - the sweeper retries on the next interval
                    log.exception("sweep failed")

        threading.Thread(target=loop, name="sweeper", daemon=True).start()
    port = args.port or cfg.api.port
    log.info("tokenline central on http://%s:%d (%s, originals in %s)", cfg.api.host, port, engine.dialect.name,
             cfg.originals.root)
    level = logging.getLevelName(logging.getLogger().level).lower()
    uvicorn.run(app, host=cfg.api.host, port=port, log_level=level if level != "notset" else "warning")
    stop.set()
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from central.ingest import IngestWorker

    cfg = _cfg(args)
    engine = _engine(cfg, migrate=not args.no_migrate)
    worker = IngestWorker(engine, cfg.mqtt, cfg.ingest, cfg.anomaly)
    _start_maintainer(engine, cfg)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    log.info("ingest worker %r on %s:%d, group %r", cfg.mqtt.client_id, cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.group)
    worker.run()
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from central.blobs import BlobStore
    from central.retention import sweep

    cfg = _cfg(args)
    engine = _engine(cfg)
    rep = sweep(engine, BlobStore(cfg.originals.root), cfg.retention)
    _say(f"sweep: resumed {rep.resumed}, expired {rep.expired}, over cap {rep.capped}, freed {rep.bytes_freed} B, "
         f"tokens deleted {rep.tokens_deleted}, orphans {rep.orphans_removed}, "
         f"dead letters deleted {rep.dead_letters_deleted}, kept {rep.kept_bytes} B")
    for e in rep.errors:
        _say(f"[yellow]{e}[/]")
    return 0


def cmd_create_token(args: argparse.Namespace) -> int:
    """Prints the token alone on stdout (``TOKEN=$(tokenline-central create-token ...)``); the note goes to stderr."""
    from sqlalchemy.orm import Session

    from central.store import create_token

    cfg = _cfg(args)
    with Session(_engine(cfg)) as s, s.begin():
        token = create_token(s, args.name, args.role)
    _say(f"[green]{args.role} token for {args.name!r}[/] (shown once, stored hashed)")
    print(token, flush=True)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from central.store import list_tokens

    with Session(_engine(_cfg(args))) as s:
        tokens = list_tokens(s)
    if args.json:
        print_json(tokens)
        return 0
    from rich.table import Table

    table = Table(title=f"{len(tokens)} token(s)")
    for col in ("id", "name", "role", "created", "revoked", "fingerprint"):
        table.add_column(col)
    for t in tokens:
        table.add_row(str(t["id"]), t["name"], t["role"], format_time_us(t["created_us"]), format_time_us(t["revoked_us"]),
                      t["fingerprint"])
    _console().print(table)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from central.errors import NotFound
    from central.store import revoke_tokens

    if (args.name is None) == (args.id is None):
        raise ConfigError("token revoke: give a token's NAME or --id ID")
    with Session(_engine(_cfg(args))) as s, s.begin():
        n = revoke_tokens(s, name=args.name, token_id=args.id)
    what = f"named {args.name!r}" if args.name is not None else f"with id {args.id}"
    if not n:
        raise NotFound(f"no unrevoked token {what}")
    _console().print(f"[green]revoked {n} token(s) {what}[/] (running APIs refuse them within seconds)")
    return 0


def cmd_dead_letters_list(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from central.dead_letters import counts_by_reason
    from central.store import list_dead_letters

    engine = _engine(_cfg(args))
    with Session(engine) as s:
        rows = list_dead_letters(s, args.limit, args.reason)
    if args.json:
        print_json(rows)
        return 0
    from rich.table import Table

    summary = Table(title="dead letters by reason")
    for col in ("reason", "kept", "replayable"):
        summary.add_column(col)
    for reason, n, whole in counts_by_reason(engine):
        summary.add_row(reason, str(n), str(whole))
    _console().print(summary)
    table = Table(title=f"latest {len(rows)}")
    for col in ("id", "received", "reason", "topic", "bytes", "replayable", "detail"):
        table.add_column(col)
    for d in rows:
        table.add_row(str(d["id"]), format_time_us(d["received_us"]), d["reason"], d["topic"], str(d["payload_len"]),
                      "yes" if d["replayable"] else "no", d["detail"][:80])
    _console().print(table)
    return 0


def cmd_dead_letters_show(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from central.errors import NotFound
    from sql.models import DeadLetter

    with Session(_engine(_cfg(args))) as s:
        d = s.get(DeadLetter, args.id)
        if d is None:
            raise NotFound(f"no dead letter with id {args.id}")
        payload = bytes(d.payload)
        print(f"id {d.id}  received {format_time_us(d.received_us)}  reason {d.reason}\ntopic {d.topic}\n"
              f"detail {d.detail}\n{d.payload_len} bytes, sha256 {d.payload_sha256}, "
              f"{'whole (replayable)' if 0 < d.payload_len == len(payload) else f'first {len(payload)} kept'}")
    for i in range(0, min(len(payload), 256), 16):
        chunk = payload[i:i + 16]
        print(f"{i:08x}  {chunk.hex(' '):<47}  {''.join(chr(b) if 32 <= b < 127 else '.' for b in chunk)}")
    return 0


def cmd_dead_letters_replay(args: argparse.Namespace) -> int:
    from central.dead_letters import replay

    cfg = _cfg(args)
    rep = replay(_engine(cfg), cfg.ingest, reason=args.reason, ids=args.id or (), limit=args.limit)
    failing = ", ".join(f"{r} {n}" for r, n in sorted(rep.still_failing.items())) or "none"
    _console().print(f"replayed {rep.replayed()}: committed {rep.committed}, already stored {rep.duplicates}, "
                     f"status {rep.status}; still failing: {failing}; not replayable (truncated) {rep.not_replayable}")
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
    _say(f"[green]model {info.name!r}[/] id {info.id}, hash {info.hash16}, D={info.embedding_dim}, K={info.k}, "
         f"text tower: {info.has_text}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from central import store

    with Session(_engine(_cfg(args))) as s:
        models = [m.public() for m in store.list_models(s)]
        usage = store.model_usage(s)
    for m in models:
        m["frames"], m["last_capture_us"] = usage.get(m["id"], (0, None))
    if args.json:
        print_json(models)
        return 0
    from rich.table import Table

    table = Table(title=f"{len(models)} registered model(s)")
    for col in ("id", "name", "hash", "registered", "D", "K", "text", "frames", "last frame", "searchable here"):
        table.add_column(col, no_wrap=col in ("hash", "registered", "last frame"))
    for m in models:
        table.add_row(str(m["id"]), m["name"], m["short_hash"], format_time_us(m["registered_us"]),
                      str(m["embedding_dim"]), str(m["k"]), "yes" if m["has_text"] else "no", str(m["frames"]),
                      format_time_us(m["last_capture_us"]), "yes" if m["searchable"] else "no")
    _console().print(table)
    return 0


def cmd_models_remove(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from central import store

    with Session(_engine(_cfg(args))) as s, s.begin():
        deleted = store.remove_model(s, args.model_id, delete_frames=args.delete_frames)
    _say(f"[green]model {args.model_id} removed[/]" + (f" with its {deleted} frame(s)" if deleted else ""))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from central.encoder import EncoderPool
    from central.search import Filters, Searcher, build_query, parse_labels

    cfg = _cfg(args)
    filters = Filters(args.site, args.line, args.camera, args.since_us, args.until_us, parse_labels(args.label))
    engine = _engine(cfg)
    image = None
    if args.image:
        try:
            image = Path(args.image).read_bytes()
        except OSError as exc:
            raise CliError(f"--image {args.image}: {exc.strerror or exc}") from None
    with Session(engine) as s:
        model, query = build_query(s, EncoderPool(cfg.search.providers), image=image, query_text=args.text,
                                   like_frame=args.like_frame, model_id=args.model_id,
                                   max_image_pixels=cfg.api.max_image_pixels)
    hits = Searcher(engine, cfg.search).search(model, query, args.k, filters, rerank=not args.no_rerank)
    if args.json:
        print_json([h.public() for h in hits])
        return 0
    from rich.table import Table

    table = Table(title=f"{len(hits)} results ({model.name}, {model.hash16[:8]})")
    for col in ("score", "global", "maxsim", "frame", "site/line/camera", "captured", "source, labels"):
        table.add_column(col, no_wrap=col in ("frame", "captured"))
    for h in hits:
        labels = " ".join(f"{k}={v}" if v else k for k, v in sorted((h.frame.labels or {}).items()))
        table.add_row(f"{h.score:.4f}", f"{h.global_score:.4f}", "-" if h.maxsim is None else f"{h.maxsim:.4f}",
                      h.frame_id, f"{h.frame.site}/{h.frame.line}/{h.frame.camera}", format_time_us(h.frame.capture_us),
                      " ".join(x for x in (h.frame.source, labels) if x))
    _console().print(table)
    return 0


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _set_line(info) -> str:
    return (f"set {info.id} {info.name!r} {info.site}/{info.line}/{info.camera} model {info.model_id} "
            f"v{info.version}: {info.frame_count} frames, bank {info.bank_tokens} of {info.pool_tokens} tokens "
            f"({info.lists} lists, nprobe {info.nprobe}), mode {info.mode}, {info.metric}, "
            f"threshold {info.threshold:.4f} "
            f"({info.threshold_mode}{f' q={info.quantile:g}' if info.threshold_mode == 'quantile' else ''})"
            + ("" if info.state == "ready" else f", {info.state}: bank of v{info.bank_version}"
               + (f" ({info.build_error})" if info.build_error else "")))


def _frame_list(args: argparse.Namespace, attr: str, file_attr: str) -> List[str]:
    ids = list(getattr(args, attr) or [])
    path = getattr(args, file_attr, None)
    if path:
        try:
            ids += [x.strip() for x in Path(path).read_text().split() if x.strip()]
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    return ids


def cmd_reference_set(args: argparse.Namespace) -> int:
    import json

    from sqlalchemy.orm import Session

    from central.anomaly import refsets
    from tokenline.anomaly import Bank, bank_path

    cfg = _cfg(args)
    engine = _engine(cfg)
    out = _console()
    built = None  # (verb, set id): a change committed below, its bank built after the commit
    with Session(engine) as s, s.begin():
        if args.action == "create":
            info = refsets.create_set(s, cfg.anomaly, name=args.name, model_id=args.model_id, site=args.site,
                                      line=args.line, camera=args.camera,
                                      frame_ids=_frame_list(args, "frame", "frames_file"), since_us=args.since_us,
                                      until_us=args.until_us, mode=args.mode or "tokens", quantile=args.quantile,
                                      threshold=args.threshold)
            built = ("created", info.id)
        elif args.action == "update":
            info = refsets.update_set(s, cfg.anomaly, args.set_id, add_frame_ids=_frame_list(args, "add", "add_file"),
                                      remove_frame_ids=args.remove or [], since_us=args.since_us,
                                      until_us=args.until_us, mode=args.mode, quantile=args.quantile,
                                      threshold=args.threshold, name=args.name)
            built = ("updated", info.id)
        elif args.action == "build":
            built = ("built", refsets.request_build(s, args.set_id).id)
        elif args.action == "list":
            sets = refsets.list_sets(s, args.model_id, args.site, args.line, args.camera)
            if args.json:
                print(json.dumps([x.public() for x in sets], indent=1))
            for info in [] if args.json else sets:
                out.print(_set_line(info), soft_wrap=True, markup=False, highlight=False)
            if not sets and not args.json:
                out.print("no reference sets")
        elif args.action == "show":
            info = refsets.get_set(s, args.set_id)
            if args.json:
                print(json.dumps({**info.public(), "frame_ids": refsets.set_frame_ids(s, args.set_id)}, indent=1))
            else:
                out.print(_set_line(info), soft_wrap=True, markup=False, highlight=False)
                for fid in refsets.set_frame_ids(s, args.set_id) if args.frames else []:
                    print(fid)
        elif args.action == "delete":
            if not refsets.delete_set(s, args.set_id):
                raise ConfigError(f"unknown reference set {args.set_id}")
            out.print(f"deleted reference set {args.set_id} and its scores")
        elif args.action == "export":
            info, data = refsets.bank_bytes(s, args.set_id)
            bank = Bank.from_bytes(data, where=f"reference set {args.set_id}")
            path = bank_path(args.model_dir, info.site, info.line, info.camera)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            out.print(f"[green]wrote[/] {path} ({len(data):,} bytes): set {info.id} v{info.bank_version}, "
                      f"{bank.size} tokens, threshold {bank.info.threshold:.4f}, model {bank.info.manifest_hash}",
                      soft_wrap=True, highlight=False)
    if built is not None:  # the change is committed: its bank is built without holding the database
        with out.status(f"building the bank of reference set {built[1]}"):
            try:
                info = refsets.build_set(engine, cfg.anomaly, built[1], wait=False)
            except refsets.Busy as busy:  # say on whom it waits (a hung holder would keep it waiting)
                out.print(f"{busy}; waiting for it", soft_wrap=True, markup=False, highlight=False)
                info = refsets.build_set(engine, cfg.anomaly, built[1])
        out.print(f"[green]{built[0]}[/] {_set_line(info)}", soft_wrap=True, highlight=False)
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from central.anomaly.scoring import backfill

    cfg = _cfg(args)
    engine = _engine(cfg)
    tasks: dict = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=_console(), transient=False) as progress:
        def tick(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(f"set {name}", total=total)
            progress.update(tasks[name], completed=done, total=total)

        rep = backfill(engine, args.set_id, args.batch, tick)
    _console().print(f"backfill: {rep.sets} set(s), {rep.scored} frame(s) scored, {rep.flagged} over threshold "
                     "(no alerts are raised for history)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenline-central", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("migrate", help="create or upgrade the schema (Alembic)").set_defaults(fn=cmd_migrate)
    s = sub.add_parser("serve", help="HTTP API + web page (+ background retention sweeper)")
    s.add_argument("--port", type=int)
    s.add_argument("--no-sweeper", action="store_true")
    s.add_argument("--no-migrate", action="store_true")
    s.add_argument("--no-warm-up", action="store_true",
                   help="do not load the models and search indexes at start-up (the first search does)")
    s.set_defaults(fn=cmd_serve)
    s = sub.add_parser("ingest", help="MQTT ingest worker (run several with distinct client ids)")
    s.add_argument("--no-migrate", action="store_true")
    s.set_defaults(fn=cmd_ingest)
    sub.add_parser("sweep", help="one retention pass").set_defaults(fn=cmd_sweep)
    s = sub.add_parser("segments", help="PostgreSQL: list frame segments; --seal seals the hot one now")
    s.add_argument("--seal", action="store_true", help="seal the hot segment and build its index (waits for it)")
    s.add_argument("--build", action="store_true", help="build the indexes of sealed segments that lack them")
    s.set_defaults(fn=cmd_segments)
    s = sub.add_parser("create-token", help="create a bearer token; prints only the token on stdout; same as "
                                            "`token create`")
    s.add_argument("name")
    s.add_argument("--role", choices=("viewer", "device", "admin"), required=True)
    s.set_defaults(fn=cmd_create_token)
    tok = sub.add_parser("token", help="bearer tokens: create | list | revoke").add_subparsers(dest="token_cmd",
                                                                                               required=True)
    s = tok.add_parser("create", help="create a bearer token (printed once, stored hashed)")
    s.add_argument("name")
    s.add_argument("--role", choices=("viewer", "device", "admin"), required=True)
    s.set_defaults(fn=cmd_create_token)
    s = tok.add_parser("list", help="every token: id, name, role, created, revoked, fingerprint")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_token_list)
    s = tok.add_parser("revoke", help="revoke the tokens called NAME, or the one with --id")
    s.add_argument("name", nargs="?")
    s.add_argument("--id", type=int)
    s.set_defaults(fn=cmd_token_revoke)
    dl = sub.add_parser("dead-letters", help="dead letters: list | show | replay").add_subparsers(
        dest="dl_cmd", required=True)
    s = dl.add_parser("list", help="counts by reason and the latest dead letters")
    s.add_argument("--reason")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_dead_letters_list)
    s = dl.add_parser("show", help="one dead letter with a hex dump of its first bytes")
    s.add_argument("id", type=int)
    s.set_defaults(fn=cmd_dead_letters_show)
    s = dl.add_parser("replay", help="ingest replayable dead letters again (after a fix, e.g. register-model); "
                                     "those that commit are removed")
    s.add_argument("--reason")
    s.add_argument("--id", type=int, action="append")
    s.add_argument("--limit", type=int)
    s.set_defaults(fn=cmd_dead_letters_replay)
    s = sub.add_parser("register-model", help="register an exported model directory (manifest.json + ONNX)")
    s.add_argument("model_dir")
    s.set_defaults(fn=cmd_register_model)
    models = sub.add_parser("models", help="registered models: list | remove").add_subparsers(dest="models_cmd",
                                                                                             required=True)
    s = models.add_parser("list", help="id, name, hash, registration date, frames and last frame of every model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_models_list)
    s = models.add_parser("remove", help="unregister a model (refused while frames use it, unless --delete-frames)")
    s.add_argument("model_id", type=_positive)
    s.add_argument("--delete-frames", action="store_true",
                   help="delete the model's frames too (their originals expire by the retention policy)")
    s.set_defaults(fn=cmd_models_remove)
    s = sub.add_parser("search", help="search from the command line")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--image")
    g.add_argument("--text")
    g.add_argument("--like-frame")
    s.add_argument("--model-id", type=_positive)
    s.add_argument("-k", type=_positive, default=10)
    s.add_argument("--site")
    s.add_argument("--line")
    s.add_argument("--camera")
    s.add_argument("--since-us", type=int)
    s.add_argument("--until-us", type=int)
    s.add_argument("--label", action="append", metavar="NAME[=VALUE]",
                   help="only frames with this label (and value); repeat for several")
    s.add_argument("--no-rerank", action="store_true")
    s.add_argument("--json", action="store_true", help="the results as JSON on stdout")
    s.set_defaults(fn=cmd_search)
    _reference_set_parser(sub)
    s = sub.add_parser("backfill", help="score the stored frames of cameras with a reference set that have no current "
                                        "score (progress bar; no alerts)")
    s.add_argument("--set-id", type=int, help="only this reference set's camera")
    s.add_argument("--batch", type=int, default=500)
    s.set_defaults(fn=cmd_backfill)
    common_options(p, log_default=None, config_help="YAML/JSON configuration (defaults: docs/central.md)",
                   more=[("--db", {"help": "database URL (overrides database.url)"})])
    return p


def _reference_set_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    rs = sub.add_parser("reference-set", help="create, update, build, list, show, delete or export reference sets")
    acts = rs.add_subparsers(dest="action", required=True)

    def threshold(a: argparse.ArgumentParser) -> None:
        g = a.add_mutually_exclusive_group()
        g.add_argument("--quantile", type=float, help="threshold = this quantile of leave-one-out scores")
        g.add_argument("--threshold", type=float, help="a threshold by hand")
        a.add_argument("--mode", choices=("tokens", "global", "both"), default=None)
        a.add_argument("--since-us", type=int, help="add every frame of the camera captured from here ...")
        a.add_argument("--until-us", type=int, help="... to here (exclusive)")

    a = acts.add_parser("create", help="a new set from frame ids and/or a time range of one camera")
    a.add_argument("name")
    for opt in ("--site", "--line", "--camera"):
        a.add_argument(opt)
    a.add_argument("--model-id", type=int)
    a.add_argument("--frame", action="append", help="a frame id (repeat)")
    a.add_argument("--frames-file", help="a file of frame ids (whitespace separated)")
    threshold(a)
    a.set_defaults(fn=cmd_reference_set)
    a = acts.add_parser("build", help="build a set's bank again (after a failed build, or one central left)")
    a.add_argument("set_id", type=int)
    a.set_defaults(fn=cmd_reference_set)
    a = acts.add_parser("update", help="add or remove frames, change the threshold or mode (rebuilds the bank)")
    a.add_argument("set_id", type=int)
    a.add_argument("--name")
    a.add_argument("--add", action="append", help="a frame id to add (repeat)")
    a.add_argument("--add-file", help="a file of frame ids to add")
    a.add_argument("--remove", action="append", help="a frame id to remove (repeat)")
    threshold(a)
    a.set_defaults(fn=cmd_reference_set)
    a = acts.add_parser("list", help="reference sets")
    for opt in ("--site", "--line", "--camera"):
        a.add_argument(opt)
    a.add_argument("--model-id", type=int)
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_reference_set)
    a = acts.add_parser("show", help="one set (--frames: its frame ids)")
    a.add_argument("set_id", type=int)
    a.add_argument("--frames", action="store_true")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_reference_set)
    a = acts.add_parser("delete", help="delete a set and its scores")
    a.add_argument("set_id", type=int)
    a.set_defaults(fn=cmd_reference_set)
    a = acts.add_parser("export", help="write the set's bank into a model directory for the edge")
    a.add_argument("set_id", type=int)
    a.add_argument("--model-dir", required=True, help="the edge's model directory (anomaly/<site>/<line>/<camera>.npz)")
    a.set_defaults(fn=cmd_reference_set)


def expected_errors() -> tuple:
    """The errors a user can fix: configuration, central's domain errors, a bad model directory."""
    from tokenline.manifest import ManifestError

    return (ConfigError, CentralError, ManifestError)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args, default="INFO" if args.cmd in DAEMONS else "WARNING")
    return run_command(args.fn, args, expected_errors())


if __name__ == "__main__":
    sys.exit(main())
