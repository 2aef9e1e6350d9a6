"""Command line of the edge agent: ``tokenline-edge run --config``, ``check-config``, ``simulate``.

The conventions of ``runtime.cli``: ``--config``, ``--log-level``/``-v`` and ``--debug`` anywhere on the line;
an expected error (configuration, model) is one line on stderr with exit code 2, no traceback unless ``--debug``.
Exit codes: 0 ok (also after SIGTERM with a clean shutdown), 2 bad configuration/model, 1 a bug.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

from edge_agent import __version__
from edge_agent.config import AgentConfig, load_config, parse_config
from runtime.cli import EXIT_ERROR, CliError, common_options, configure_logging, run_command
from tokenline.config import ConfigError

log = logging.getLogger(__name__)


def _say(text: str) -> None:
    try:
        from rich.console import Console  # optional: nicer output when installed

        Console(highlight=False, soft_wrap=True).print(text)  # paths stay whole (no hard wraps in pipes)
    except ImportError:
        print(text)


def run_agent(cfg: AgentConfig, until_idle: bool = False) -> int:
    """Run until SIGTERM/SIGINT (or, with ``until_idle``, until every source ended and the outbox is empty)."""
    from edge_agent.agent import Agent

    agent = Agent(cfg).start()
    stop = threading.Event()

    def _on_signal(signum, frame) -> None:  # noqa: ARG001
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    while not stop.wait(0.5):
        if until_idle and all(w.stats.state == "ended" for w in agent.workers.values()) \
                and agent.outbox.count == 0 and not len(agent.results) and not any(agent.hub.depths().values()):
            break
    flushed = agent.shutdown()
    snap = agent.snapshot()
    _say(f"stopped: {snap['inference']['frames']} frames encoded, outbox pending {snap['outbox']['pending']}"
         f"{'' if flushed else ' (kept for replay)'}")
    return 0


def simulate_config(args: argparse.Namespace) -> AgentConfig:
    work = Path(args.workdir)
    cams = [{"name": f"cam-{i + 1}", "line": args.line,
             "source": {"kind": "synthetic", "fps": args.fps, "seed": i, "max_frames": args.frames,
                        "width": 320, "height": 240},
             "sampling": {"mode": "every_nth", "every_nth": 1}} for i in range(args.cameras)]
    data = {"device": args.device, "site": args.site, "model": {"dir": str(args.model_dir)}, "cameras": cams,
            "messages": {"token_dtype": args.token_dtype},
            "mqtt": {"host": args.mqtt_host, "port": args.mqtt_port},
            "outbox": {"path": str(work / "outbox.sqlite")},
            "originals": {"dir": str(work / "originals")},
            "health": {"http_port": None, "file": str(work / "health.json")},
            "stats_interval_s": 2.0, "log_level": getattr(args, "log_level", "INFO")}
    return parse_config(data, where="simulate")


def _config(args: argparse.Namespace) -> AgentConfig:
    """The run's configuration: ``--config`` for ``run``/``check-config``, built from flags for ``simulate``."""
    if args.cmd == "simulate":
        if args.config is not None:
            raise CliError("simulate builds its own configuration from its flags; drop --config (or use `run`)")
        return simulate_config(args)
    if args.config is None:
        raise CliError(f"{args.cmd} needs a configuration: add --config FILE (see deploy/edge/edge.example.yaml)")
    return load_config(Path(args.config))


def cmd_agent(args: argparse.Namespace) -> int:
    cfg = _config(args)
    configure_logging(args, default=cfg.log_level)
    if args.cmd == "check-config":
        from edge_agent.preflight import check

        lines, problems = check(cfg, load_runner=not args.no_runner)
        if problems:  # a list, one problem a line: the check's report, not a single error
            print(f"error: {args.config}: {len(problems)} problem(s) `run` would fail on:", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            return EXIT_ERROR
        _say(f"[bold green]configuration OK[/bold green]: {args.config}\n" + "\n".join(lines))
        return 0
    _say(f"[bold]tokenline-edge {__version__}[/bold] {cfg.site}/{cfg.device}: {len(cfg.cameras)} camera(s), "
         f"MQTT {cfg.mqtt.host}:{cfg.mqtt.port}")
    return run_agent(cfg, until_idle=args.cmd == "simulate" and args.frames is not None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenline-edge", description="tokenline edge agent")
    p.add_argument("--version", action="version", version=f"tokenline-edge {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="run the agent (daemon); needs --config")
    c = sub.add_parser("check-config", help="validate a configuration and everything it points at (model, password, "
                                             "certificate and token files, camera folders, writable paths)")
    c.add_argument("--no-runner", action="store_true", help="do not load the model into the runner")
    s = sub.add_parser("simulate", help="run with synthetic conveyor cameras (demo, tests)")
    s.add_argument("--model-dir", required=True, type=Path)
    s.add_argument("--mqtt-host", default="127.0.0.1")
    s.add_argument("--mqtt-port", type=int, default=1883)
    s.add_argument("--cameras", type=int, default=2)
    s.add_argument("--fps", type=float, default=5.0)
    s.add_argument("--frames", type=int, default=None, help="frames per camera, then stop (default: run forever)")
    s.add_argument("--token-dtype", choices=("int8", "int4", "fp16"), default="int8")
    s.add_argument("--workdir", type=Path, default=Path("out/edge-sim"))
    s.add_argument("--device", default="sim-01")
    s.add_argument("--site", default="demo")
    s.add_argument("--line", default="line-1")
    common_options(p, log_default=None, config_help="the agent's configuration file (YAML)")  # level: the config's
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from edge_agent.agent import AgentError

    return run_command(cmd_agent, args, (ConfigError, AgentError))


if __name__ == "__main__":
    sys.exit(main())
