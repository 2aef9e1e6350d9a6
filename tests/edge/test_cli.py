"""`tokenline-edge` follows the shared CLI conventions: --config/--log-level/--debug anywhere on the line, an
expected error is one line on stderr with exit code 2, the traceback only with --debug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import yaml

from edge_agent.cli import main
from tests.edge.conftest import agent_config, synthetic_camera

ROOT = Path(__file__).resolve().parents[2]


def edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def stderr_lines(res: subprocess.CompletedProcess) -> List[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("order", [
    ["--config", "{cfg}", "check-config", "--no-runner"],
    ["check-config", "--config", "{cfg}", "--no-runner"],
    ["check-config", "--no-runner", "--log-level", "INFO", "--config", "{cfg}"],
    ["--log-level", "WARNING", "check-config", "--no-runner", "--config", "{cfg}", "--debug"],
])
def test_config_and_common_options_anywhere(tmp_path: Path, tiny_model_dir: Path, capsys, order: List[str]) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump(agent_config(tmp_path, tiny_model_dir, 1883, [synthetic_camera("cam-1")])))
    assert main([a.format(cfg=cfg) for a in order]) == 0
    out = capsys.readouterr().out
    assert "configuration OK:" in out and str(cfg) in out and "[bold" not in out


def test_config_after_the_subcommand_reaches_the_command(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    d = agent_config(tmp_path, tiny_model_dir, 1883, [synthetic_camera("cam-1")])
    d["model"]["dir"] = str(tmp_path / "no-model")  # so the command must have read this very file
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert main(["check-config", "--no-runner", "--config", str(cfg)]) == 2
    assert "model.dir" in capsys.readouterr().err


@pytest.mark.parametrize("args,words", [
    (["run", "--config", "{missing}"], ["cannot read configuration", "missing.yaml"]),
    (["--config", "{missing}", "check-config"], ["cannot read configuration", "missing.yaml"]),
    (["run"], ["run needs a configuration", "--config FILE"]),
    (["simulate", "--model-dir", "m", "--config", "{missing}"], ["simulate builds its own configuration"]),
])
def test_expected_errors_are_one_line_exit_2_without_traceback(tmp_path: Path, args: List[str],
                                                               words: List[str]) -> None:
    res = edge(*[a.format(missing=tmp_path / "missing.yaml") for a in args])
    assert res.returncode == 2, res.stderr
    lines = stderr_lines(res)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert all(w in lines[0] for w in words), lines
    assert res.stdout == ""


def test_debug_anywhere_prints_the_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    for args in (["run", "--config", missing, "--debug"], ["--debug", "run", "--config", missing]):
        res = edge(*args)
        assert res.returncode == 2
        assert "Traceback (most recent call last)" in res.stderr and "ConfigError" in res.stderr
        assert stderr_lines(res)[-1].startswith("error: cannot read configuration")


def test_a_malformed_config_is_one_line_naming_every_key(tmp_path: Path, tiny_model_dir: Path) -> None:
    d = agent_config(tmp_path, tiny_model_dir, 1883, [synthetic_camera("cam-1")])
    d["colour"] = "red"
    d["mqtt"]["port"] = 70000
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump(d))
    res = edge("run", "--config", str(cfg))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = stderr_lines(res)
    assert len(lines) == 1 and "colour" in lines[0] and "mqtt.port" in lines[0], res.stderr
