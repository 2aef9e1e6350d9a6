"""Conventions shared by the three command lines: options anywhere, one-line errors (exit 2), --json, progress bars.

A program builds its ``argparse`` parser as usual, then calls ``common_options(parser, ...)`` once, after every
subcommand is registered: ``--config`` (when the program reads one), ``--log-level`` / ``-v`` and ``--debug`` are
then accepted before or after the subcommand, also by subcommands added later by other modules. ``main`` hands
the parsed arguments to ``run_command``, the error boundary:

- an *expected* error (``CliError``, the program's configuration and domain errors) prints ``error: <one line>``
  on stderr, saying what is wrong and the fix, and exits 2; no traceback unless ``--debug``;
- anything else is a bug: one line naming the exception and ``--debug``, exit 1 (the traceback with ``--debug``);
- Ctrl-C exits 130 without a traceback.

Output: results and machine-readable data go to stdout (``print_json`` for ``--json``), everything for people
(errors, progress, log records) to stderr. Commands are quiet by default: log records from WARNING on (daemons
choose INFO), and the libraries' chatter (alembic's INFO lines) only with ``-v``. Long loops report through
``progress``: a rich bar with rate and ETA on a terminal, a log line every ~10 % otherwise; a pipeline of named
steps through ``steps`` (a bar of steps with elapsed time and ETA on a terminal, log records otherwise).

Runs on Python 3.8 (the edge agent uses it); rich is imported only where it is installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Type

from runtime.logs import add_log_level, setup_logging

EXIT_OK = 0
EXIT_BUG = 1
EXIT_ERROR = 2  # an expected error: bad input, configuration, state the user can fix
EXIT_INTERRUPTED = 130

# Libraries whose INFO records are noise for a command's user (alembic prints seven lines per migration check).
QUIET_LOGGERS = ("alembic", "sqlalchemy", "httpx", "urllib3", "paho")


class CliError(Exception):
    """An expected failure of a command: the message is one line that says what is wrong and how to fix it."""


def _subparsers(parser: argparse.ArgumentParser) -> Sequence[argparse.ArgumentParser]:
    out = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public accessor for subcommands
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sp in action.choices.values():
                out.append(sp)
                out.extend(_subparsers(sp))
    return out


def common_options(parser: argparse.ArgumentParser, *, log_default: Optional[str] = "WARNING", config: bool = True,
                   config_help: str = "configuration file (YAML/JSON)",
                   more: Sequence[Tuple[str, Dict[str, Any]]] = ()) -> None:
    """Add ``--config`` (when ``config``), ``--log-level``/``-v``, ``--debug`` and the program's ``more`` options
    (``(flag, argparse keywords)``) to ``parser`` and to every subcommand's parser, so each may be given before
    or after the subcommand. Call it after the subcommands are registered. A subcommand's copy sets the value
    only when given there (``argparse.SUPPRESS`` default). ``log_default`` None: ``configure_logging`` decides."""
    options = ([("--config", {"help": config_help})] if config else []) + list(more)
    for i, p in enumerate([parser, *_subparsers(parser)]):
        top = i == 0
        have = {s for a in p._actions for s in a.option_strings}  # noqa: SLF001
        for flag, kw in options:
            if flag not in have:
                p.add_argument(flag, **dict(kw, default=kw.get("default") if top else argparse.SUPPRESS))
        if "--log-level" not in have:
            add_log_level(p, log_default if top else None)
        if "--debug" not in have:
            p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                           help="print the traceback of an error (and log at DEBUG)")


def configure_logging(args: argparse.Namespace, default: Optional[str] = None) -> str:
    """Set up logging for this run from ``--log-level``/``-v``/``--debug`` (``default`` when none was given, e.g. a
    daemon's INFO); libraries stay at WARNING unless the level is DEBUG. Returns the level used."""
    level = getattr(args, "log_level", None) or default or "WARNING"
    if getattr(args, "debug", False):
        level = "DEBUG"
    setup_logging(level)
    if level != "DEBUG":
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    return level


def one_line(exc: BaseException) -> str:
    """An error message on one line: a message of several lines (a document with several bad keys) is joined."""
    text = str(exc).strip() or type(exc).__name__
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    if len(parts) <= 1:
        return text
    head, rest = parts[0], parts[1:]
    return (head + " " if head.endswith(":") else head + "; ") + "; ".join(rest)


def print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def run_command(fn: Callable[[argparse.Namespace], Optional[int]], args: argparse.Namespace,
                expected: Tuple[Type[BaseException], ...] = ()) -> int:
    """Run one command behind the error boundary (module docstring); returns the exit code."""
    debug = bool(getattr(args, "debug", False))
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print_error("interrupted")
        return EXIT_INTERRUPTED
    except (CliError,) + tuple(expected) as exc:
        if debug:
            traceback.print_exc()
        print_error(one_line(exc))
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: one line, the traceback on request
        if debug:
            traceback.print_exc()
        print_error(f"unexpected {type(exc).__name__}: {one_line(exc)} (this is a bug; --debug prints the traceback)")
        return EXIT_BUG


def print_json(obj: Any) -> None:
    """Machine-readable output of a ``--json`` command: one JSON document on stdout."""
    json.dump(obj, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _rich_console(console: Any = None) -> Any:
    if console is not None:
        return console
    if not sys.stderr.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(stderr=True)


def _bar(con: Any, unit: str) -> Any:
    """A rich progress bar on ``con``: description, bar, done/total, percent, ``unit``, elapsed time and ETA."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            TextColumn(f"{unit}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*cols, console=con, transient=False)


@contextmanager
def progress(total: Optional[int], description: str, unit: str = "items", *, log: Optional[logging.Logger] = None,
             console: Any = None) -> Iterator[Callable[[int], None]]:
    """Report a long loop: yields ``advance(n)``. On a terminal (or with a rich ``console``) a bar with the count,
    rate and ETA; otherwise a log record at about every 10 % and one at the end, so services and CI logs show
    progress too. ``total`` None: a count without ETA."""
    log = log or logging.getLogger("progress")
    con = _rich_console(console)
    t0 = time.monotonic()
    done = [0]
    if con is not None:
        with _bar(con, unit) as bar:
            task = bar.add_task(description, total=total)

            def advance_bar(n: int = 1) -> None:
                done[0] += n
                bar.update(task, advance=n)

            yield advance_bar
        return
    step = max(1, (total or 0) // 10)
    next_report = [step]

    def advance_log(n: int = 1) -> None:
        done[0] += n
        if total and done[0] >= next_report[0] and done[0] < total:
            el = time.monotonic() - t0
            eta = el / done[0] * (total - done[0])
            log.info("%s: %d/%d %s (%.0f%%), ETA %.0fs", description, done[0], total, unit, 100 * done[0] / total, eta)
            next_report[0] = done[0] + step

    yield advance_log
    log.info("%s: %d %s in %.1fs", description, done[0], unit, time.monotonic() - t0)


@contextmanager
def steps(total: Optional[int], *, show: bool = True, log: Optional[logging.Logger] = None,
          console: Any = None) -> Iterator[Callable[[str], None]]:
    """Report a pipeline of named steps: yields ``step(message)``, called as each step starts. With ``show`` on a
    terminal (or with a rich ``console``): one bar whose text is the current step, with steps done/``total``,
    elapsed time and an ETA from the steps so far (a step past ``total`` raises it). Otherwise (``--quiet``, output
    not a terminal) each step is a log record at INFO, so logs and tests stay clean unless asked (``-v``)."""
    log = log or logging.getLogger("progress")
    con = _rich_console(console) if show else None
    if con is None:
        yield lambda message: log.info("%s", message)
        return
    with _bar(con, "steps") as bar:
        task = bar.add_task("starting", total=total)
        started = [0]

        def step(message: str) -> None:
            started[0] += 1  # the step before this one is done
            grown = None if total is None else max(total, started[0])
            bar.update(task, description=message, completed=started[0] - 1, total=grown)

        yield step
        bar.update(task, description="done", completed=started[0], total=started[0])


def format_time_us(us: Optional[int]) -> str:
    """A Unix-microsecond time for people, in UTC (the one time zone of the CLIs, logs and the page's default):
    ``2026-03-01 14:05:09.123 UTC``; ``-`` for None."""
    if us is None:
        return "-"
    import datetime as dt

    t = dt.datetime.fromtimestamp(us / 1e6, tz=dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond // 1000:03d} UTC"
