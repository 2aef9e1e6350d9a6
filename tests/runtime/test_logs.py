"""The CLIs' one verbosity flag: --log-level LEVEL or -v (DEBUG), on the main parser and on subcommands."""

from __future__ import annotations

import argparse

import pytest

from runtime.logs import add_log_level


def _parser(default):
    p = argparse.ArgumentParser(prog="t")
    add_log_level(p, default)
    sub = p.add_subparsers(dest="cmd", required=True)
    add_log_level(sub.add_parser("run"), None)
    return p


def test_flag_forms_and_defaults() -> None:
    p = _parser("WARNING")
    assert p.parse_args(["run"]).log_level == "WARNING"
    assert p.parse_args(["-v", "run"]).log_level == "DEBUG"
    assert p.parse_args(["--log-level", "info", "run"]).log_level == "INFO"
    assert p.parse_args(["run", "--log-level", "ERROR"]).log_level == "ERROR"  # after the subcommand too
    assert p.parse_args(["--log-level", "ERROR", "run"]).log_level == "ERROR"  # the subcommand's copy keeps it
    assert not hasattr(_parser(None).parse_args(["run"]), "log_level")  # unset: the program's config decides


def test_bad_levels_and_both_forms_are_refused(capsys) -> None:
    for argv in (["--log-level", "LOUD", "run"], ["-v", "--log-level", "INFO", "run"]):
        with pytest.raises(SystemExit) as e:
            _parser("INFO").parse_args(argv)
        assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
