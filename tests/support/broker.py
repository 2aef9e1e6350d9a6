"""A real Mosquitto broker for tests: started on an ephemeral loopback port, stoppable and restartable."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional


def free_port() -> int:
    """A free 127.0.0.1 port that stays free for a minute, even on a machine shared with other test runs.

    A port that was only bound and closed can be handed to the next process that binds port 0 (seen in CI:
    a broker started seconds later found its port taken). This one is connected once and closed by the
    accepting side first, so it sits in TIME_WAIT for 60 s: the kernel hands it to no other ``bind(0)``, but
    servers that set SO_REUSEADDR (Mosquitto, uvicorn, http.server, PostgreSQL) can still listen on it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = int(s.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port)) as c:
            conn, _ = s.accept()
            conn.close()
            c.recv(1)  # wait for the accepting side's FIN, so that side enters TIME_WAIT, not this one
    return port


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM the broker when the process that started it dies (a killed test run
    or benchmark must not leave brokers behind). Linux only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def mosquitto_binary() -> Optional[str]:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and Path(cand).is_file():
            return cand
    return None


class Mosquitto:
    """One mosquitto process with persistence in ``workdir``; ``stop()``/``start()`` keep port and state.

    ``extra_conf`` is appended to the generated config (listeners for TLS, ACL files, ...). ``config`` replaces
    it all but the logging (e.g. what ``deploy/broker/gen_broker_config.py`` writes, listening on ``port``).
    """

    def __init__(self, workdir: Path, port: Optional[int] = None, extra_conf: str = "",
                 allow_anonymous: bool = True, config: Optional[str] = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (Debian package 'mosquitto'; `make test` installs it)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        # Started as root, mosquitto drops to user "mosquitto", which cannot read pytest's private tmp dirs.
        run_as = "user root\n" if os.geteuid() == 0 else ""
        logging = f"log_dest file {self.log}\nlog_type error\nlog_type warning\nlog_type notice\n"
        self.proc: Optional[subprocess.Popen] = None
        if config is not None:
            self.conf.write_text(run_as + logging + config)
            return
        self.conf.write_text(
            run_as + f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if allow_anonymous else 'false'}\n"
            f"persistence true\npersistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 0\nmax_inflight_messages 100\n"
            + logging + extra_conf
        )

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}\n{self._log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s\n{self._log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return ""

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
