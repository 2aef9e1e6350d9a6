"""Soak: several edges stream while a chaos loop SIGKILLs the broker, an ingest worker or an edge at random;
then every frame an edge committed to its outbox must be stored at central exactly once.

Real processes throughout: Mosquitto with the generated configuration (deploy/broker/gen_broker_config.py:
dynamic-security plugin, autosave every 60 s, so a SIGKILL loses everything the broker held in memory), edge
agents (``tokenline-edge run``, synthetic cameras, outbox synchronous=FULL) and central's ingest worker
(``tokenline-central ingest``; ``--workers`` of them share one SQLite database and one subscription group).

After ``--duration`` seconds of chaos the edges are paused (the ``pause`` command, as an operator would), every
process is running again, and the soak waits until every outbox is empty. It reports:

- produced: frames committed to an edge outbox (the per-camera ``seq`` numbers handed out, read from the
  outboxes: a frame in an edge's memory when it is SIGKILLed was never promised to anyone);
- delivered: distinct frames stored at central; lost: produced (camera, seq) pairs central does not have;
  duplicates: frames stored twice (by frame id, and by (camera, seq));
- redeliveries: copies central received and dropped as duplicates (the cost of the crashes);
- max backlog age: the oldest frame waiting in any edge outbox, sampled every second (how long delivery lagged).

``--compare-v1`` runs the same chaos (same seed) a second time with the edges on protocol 1 (a frame leaves the
outbox on the broker's PUBACK), for comparison.

    python benchmarks/soak_e2e.py                   # 3 edges, 180 s of chaos (about 5 minutes in all)
    python benchmarks/soak_e2e.py --compare-v1      # and the same with protocol 1 (twice as long)
    python benchmarks/soak_e2e.py --duration 60 --edges 2 --no-write
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import write_section  # noqa: E402
from tests.support.broker import Mosquitto  # noqa: E402
from tests.support.nodes import wait_for  # noqa: E402
from tests.support.secured_broker import generated_broker  # noqa: E402
from tests.support.system_procs import CentralProcess, EdgeProcess  # noqa: E402
from tests.support.tiny_model import build_tiny_model  # noqa: E402

CONFIRM = {"confirm_timeout_s": 5.0, "confirm_timeout_max_s": 20.0}  # shorter than the defaults (30 / 600 s)


def inventory(edges: int, workers: int) -> str:
    devs = "\n".join(f"  - {{id: soak-{i}, site: s1, cameras: [{{line: l1, camera: cam-{i}}}]}}"
                     for i in range(1, edges + 1))
    services = ", ".join(f"central-{k}" for k in range(1, workers + 1))
    return f"devices:\n{devs}\nservices: [{services}]\nadmins: [ops]\n"


def edge_config(home: Path, model_dir: Path, port: int, i: int, password: str, fps: float,
                protocol: int) -> Dict[str, Any]:
    (home / "mqtt.pw").write_text(password + "\n")
    return {
        "device": f"soak-{i}", "site": "s1", "model": {"dir": str(model_dir), "batch_size": 4},
        "cameras": [{"name": f"cam-{i}", "line": "l1",
                     "source": {"kind": "synthetic", "fps": fps, "seed": i, "width": 96, "height": 64},
                     "sampling": {"mode": "every_nth"}, "queue_depth": 64}],
        "mqtt": dict({"host": "127.0.0.1", "port": port, "username": f"soak-{i}",
                      "password_file": str(home / "mqtt.pw"), "reconnect_min_s": 0.2, "reconnect_max_s": 2.0,
                      "protocol": protocol}, **CONFIRM),
        "outbox": {"path": str(home / "outbox.sqlite")},
        "originals": {"enabled": False},
        "health": {"http_port": None, "file": str(home / "health.json")},
        "stats_interval_s": 1.0, "shutdown_timeout_s": 5.0,
    }


def committed(outbox: Path) -> Dict[str, int]:
    """Frames committed per camera: the next seq each camera would get."""
    db = sqlite3.connect(str(outbox))
    try:
        return {cam: int(n) for cam, n in db.execute("SELECT camera, next_seq FROM seqs")}
    finally:
        db.close()


def pause_all(port: int, password: str, edges: int, protocol: int) -> None:
    """The ``pause`` command to every edge, as the operator ``ops`` (QoS 1, one connection)."""
    import paho.mqtt.client as mqtt

    from tokenline import topics

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ops-soak", protocol=mqtt.MQTTv5)
    c.username_pw_set("ops", password)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for i in range(1, edges + 1):
            c.publish(topics.cmd_topic("s1", f"soak-{i}", protocol), topics.Command("pause").to_json(),
                      qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def run(args: argparse.Namespace, work: Path, model_dir: Path, protocol: int) -> Dict[str, Any]:
    broker: Mosquitto
    broker, pw = generated_broker(work / "broker", inventory(args.edges, args.workers), allow_v1=protocol == 1)
    broker.start()
    db = work / "central.db"
    workers = [CentralProcess(work / f"central-{k}", broker.port, model_dir, client_id=f"central-{k}",
                              username=f"central-{k}", password=pw[f"central-{k}"], db=db, batch_max=50)
               for k in range(1, args.workers + 1)]
    for w in workers:
        w.start()
    edges: List[EdgeProcess] = []
    for i in range(1, args.edges + 1):
        home = work / f"edge-{i}"
        home.mkdir(parents=True)
        cfg = edge_config(home, model_dir, broker.port, i, pw[f"soak-{i}"], args.fps, protocol)
        edges.append(EdgeProcess(home, cfg, name=f"soak-{i}").start())
    rng = random.Random(args.seed)
    kills: Counter = Counter()
    max_age, max_pending = 0.0, 0
    victims = [("broker", broker)] + [("ingest", w) for w in workers] + [("edge", e) for e in edges]
    down: Dict[int, float] = {}  # index in victims -> when it is started again (failures overlap)
    next_kill = time.monotonic() + rng.uniform(args.min_gap, args.max_gap)
    t0 = time.monotonic()
    drained = False
    try:
        print(f"soak, protocol {protocol}: {args.edges} edges at {args.fps} fps, {args.workers} ingest worker(s), "
              f"{args.duration:.0f} s of chaos")
        while time.monotonic() - t0 < args.duration:
            for e in edges:
                out = e.outbox_stats()
                max_age = max(max_age, float(out.get("oldest_pending_s") or 0))
                max_pending = max(max_pending, int(out.get("pending") or 0))
            now = time.monotonic()
            for i, at in sorted(down.items()):
                if now >= at:
                    victims[i][1].start()
                    del down[i]
            if now >= next_kill:
                kind = rng.choice(["broker", "ingest", "edge"])
                up = [i for i, (k, _) in enumerate(victims) if k == kind and i not in down]
                if up:
                    i = rng.choice(up)
                    secs = rng.uniform(args.min_down, args.max_down)
                    victims[i][1].kill()
                    down[i] = now + secs
                    kills[kind] += 1
                    also = ", ".join(victims[j][0] for j in down if j != i)
                    print(f"  {now - t0:6.1f} s  SIGKILL {kind}, down {secs:.1f} s"
                          + (f" (also down: {also})" if also else ""))
                next_kill = now + rng.uniform(args.min_gap, args.max_gap)
            time.sleep(0.5)
        for i in sorted(down):
            victims[i][1].start()
        down.clear()
        chaos_s = time.monotonic() - t0
        pause_all(broker.port, pw["ops"], args.edges, protocol)
        t_drain = time.monotonic()

        def empty() -> bool:
            nonlocal max_age, max_pending
            outs = [e.outbox_stats() for e in edges]
            for out in outs:
                max_age = max(max_age, float(out.get("oldest_pending_s") or 0))
                max_pending = max(max_pending, int(out.get("pending") or 0))
            return all(o.get("pending") == 0 and o.get("inflight") == 0 for o in outs)

        time.sleep(3.0)  # frames sampled before the pause reach the outboxes
        drained = wait_for(empty, args.drain_timeout, 1.0)
        drain_s = time.monotonic() - t_drain
    finally:
        for e in edges:
            e.stop()
        for w in workers:
            w.stop()
        broker.stop()
    produced = {}
    for e in edges:
        produced.update(committed(e.outbox))
    rows = workers[0].query("SELECT frame_id, camera, seq FROM frames")
    stored = {(cam, seq) for _, cam, seq in rows}
    lost = sum(len(set(range(n)) - {s for c, s in stored if c == cam}) for cam, n in produced.items())
    counters = dict(workers[0].query("SELECT name, SUM(value) FROM counters GROUP BY name"))
    return {
        "protocol": protocol, "edges": args.edges, "workers": args.workers, "gaps": (args.min_gap, args.max_gap),
        "downs": (args.min_down, args.max_down), "fps": args.fps, "chaos_s": chaos_s, "drain_s": drain_s,
        "drained": drained,
        "kills": dict(kills), "produced": sum(produced.values()), "delivered": len({r[0] for r in rows}),
        "lost": lost, "dup_frame_ids": len(rows) - len({r[0] for r in rows}),
        "dup_seqs": len(rows) - len(stored), "redeliveries": int(counters.get("duplicates", 0)),
        "dead_letters": int(counters.get("dead_letters", 0)), "max_age": max_age, "max_pending": max_pending,
    }


def row(r: Dict[str, Any]) -> str:
    k = r["kills"]
    kills = f"{k.get('broker', 0)} / {k.get('ingest', 0)} / {k.get('edge', 0)}"
    return (f"| {r['protocol']} | {kills} | {r['produced']} | {r['delivered']} | **{r['lost']}** | "
            f"{r['dup_frame_ids'] + r['dup_seqs']} | {r['redeliveries']} | {r['dead_letters']} | "
            f"{r['max_age']:.0f} s | {r['max_pending']} | {r['drain_s']:.0f} s"
            f"{'' if r['drained'] else ' (not drained)'} |")


def report(results: List[Dict[str, Any]]) -> str:
    r = results[0]
    return "\n".join([
        f"{r['edges']} edge agents ({r['fps']:g} fps synthetic camera each, outbox synchronous=FULL; protocol 2 with "
        f"confirm_timeout_s {CONFIRM['confirm_timeout_s']:g} doubling to {CONFIRM['confirm_timeout_max_s']:g}), "
        f"{r['workers']} central ingest worker(s) on SQLite, Mosquitto with the generated configuration (autosave "
        f"every 60 s). For {r['chaos_s']:.0f} s a chaos loop SIGKILLed a random process (broker, ingest worker or "
        f"edge) every {r['gaps'][0]:g}-{r['gaps'][1]:g} s and restarted it {r['downs'][0]:g}-{r['downs'][1]:g} s "
        "later, so failures overlap (e.g. the broker dies while an ingest worker is down); the same seed gives each "
        "protocol the same random draws (the kills differ a little: a victim already down is not drawn). Then the "
        "edges were paused and the soak waited for every outbox to empty (drain).",
        "",
        "| edge protocol | SIGKILLs broker / ingest / edge | produced (committed to an edge outbox) | delivered "
        "(stored at central) | lost | stored twice | redeliveries dropped by central | dead letters | max backlog "
        "age | max outbox backlog (frames) | drain |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[row(x) for x in results],
        "",
        "Max backlog age is the oldest frame waiting in any edge outbox (sampled every second): how long the "
        "crashes delayed delivery (under protocol 1 a frame leaves the outbox on its PUBACK, delivered or not). "
        "Frames an edge held only in memory when it was SIGKILLed were never committed, so they are not counted as "
        "produced (the camera's next frames are).",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of chaos")
    ap.add_argument("--edges", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="central ingest workers (one subscription group)")
    ap.add_argument("--fps", type=float, default=5.0, help="frames/s of each edge's camera")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-gap", type=float, default=2.0, help="seconds between two SIGKILLs, at least")
    ap.add_argument("--max-gap", type=float, default=6.0)
    ap.add_argument("--min-down", type=float, default=1.0, help="seconds a killed process stays down, at least")
    ap.add_argument("--max-down", type=float, default=8.0)
    ap.add_argument("--drain-timeout", type=float, default=240.0)
    ap.add_argument("--model-dir", type=Path, default=None, help="an exported model (default: the tiny test encoder)")
    ap.add_argument("--compare-v1", action="store_true", help="then the same chaos with the edges on protocol 1")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="tokenline-soak-") as tmp:
        model_dir = args.model_dir or build_tiny_model(Path(tmp) / "model", size=32, patch=8, dim=384)
        for protocol in (2, 1) if args.compare_v1 else (2,):
            results.append(run(args, Path(tmp) / f"protocol-{protocol}", model_dir, protocol))
            print(row(results[-1]))
    text = report(results)
    print(text)
    if not args.no_write:
        write_section("soak_e2e", "Soak: random SIGKILLs of broker, ingest worker and edges (end-to-end acks)", text)
    r = results[0]
    return 0 if r["lost"] == 0 and r["drained"] and not (r["dup_frame_ids"] or r["dup_seqs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
