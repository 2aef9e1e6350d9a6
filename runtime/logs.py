"""Logging of the three command lines (tokenline-export, tokenline-edge, tokenline-central): one flag, one format.

Every module logs to ``logging.getLogger(__name__)``; the CLIs add ``--log-level LEVEL`` (``-v`` is short for
``--log-level DEBUG``) with ``add_log_level`` and call ``setup_logging`` once. Records go to stderr as
``<time> <LEVEL> <logger>: <message>``; human summaries are printed separately (rich).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_log_level(parser: argparse.ArgumentParser, default: Optional[str]) -> None:
    """Add ``--log-level`` and ``-v/--verbose`` (both set ``log_level``). ``default`` None leaves ``log_level``
    unset unless given (a subcommand's copy of the flag, or a program whose config names the level)."""
    kw = {"default": default} if default is not None else {"default": argparse.SUPPRESS}
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--log-level", dest="log_level", type=str.upper, choices=LEVELS,
                   help=f"log records from this level on, to stderr (default: {default or 'from the configuration'})",
                   **kw)
    g.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="DEBUG",
                   help="same as --log-level DEBUG", **kw)


def setup_logging(level: str) -> None:
    """Configure the root logger once for a CLI run."""
    logging.basicConfig(level=getattr(logging, level.upper()), format=FORMAT, stream=sys.stderr)
