"""Metrics of the running system, the Grafana dashboard against them, and an original requested from the edge.

One real chain (Mosquitto, central's API and an ingest worker, an edge agent on a synthetic camera): /metrics of
central, of the ingest worker and of the edge are scraped and parsed, every expected name is there with its type,
the values agree with what happened, and every expression of deploy/grafana/tokenline-dashboard.json names a
metric one of them exports.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Dict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stack import running_chain, wait

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "tokenline-dashboard.json"

# family name -> type, as each process must export them from the first scrape
CENTRAL = {
    "tokenline_received": "counter", "tokenline_stored": "counter", "tokenline_duplicates": "counter",
    "tokenline_dead_letters": "counter", "tokenline_status_updates": "counter", "tokenline_frames_deleted": "counter",
    "tokenline_http_requests": "counter", "tokenline_search_seconds": "histogram", "tokenline_frames": "gauge",
    "tokenline_originals": "gauge", "tokenline_originals_bytes": "gauge", "tokenline_devices": "gauge",
    "tokenline_device_online": "gauge", "tokenline_device_last_seen_timestamp_seconds": "gauge",
    "tokenline_device_backlog_messages": "gauge", "tokenline_device_oldest_unconfirmed_seconds": "gauge",
    "tokenline_device_frames_per_second": "gauge", "tokenline_device_dropped_frames": "counter",
    "tokenline_newest_frame_lag_seconds": "gauge", "tokenline_database_up": "gauge",
    "tokenline_original_requests": "counter", "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge", "tokenline_frames_scored": "counter",
    "tokenline_anomaly_alerts": "counter",
    "tokenline_anomaly_webhook_sent": "counter", "tokenline_anomaly_webhook_failed": "counter",
    "tokenline_anomaly_webhook_dropped": "counter", "tokenline_score_queue_frames": "gauge",
    "tokenline_score_queue_oldest_seconds": "gauge",
}
WORKER = {
    "tokenline_ingest_batch_messages": "histogram", "tokenline_ingest_commit_seconds": "histogram",
    "tokenline_ingest_lag_seconds": "histogram", "tokenline_ingest_messages": "counter",
    "tokenline_ingest_connected": "gauge", "tokenline_ingest_connect_failures": "counter",
    "tokenline_ingest_database_retries": "counter", "process_cpu_seconds": "counter",
}
EDGE = {
    "tokenline_edge_inference_frames": "counter", "tokenline_edge_outbox_pending": "gauge",
    "tokenline_edge_outbox_published": "counter", "tokenline_edge_frames_dropped": "counter",
    "tokenline_edge_awaiting_confirmation": "gauge", "tokenline_edge_oldest_unconfirmed_seconds": "gauge",
    "tokenline_edge_camera_frames_per_second": "gauge", "tokenline_edge_camera_frames": "counter",
    "tokenline_edge_capture_to_encoded_seconds": "gauge", "tokenline_edge_mqtt_connected": "gauge",
    "tokenline_edge_healthy": "gauge", "process_resident_memory_bytes": "gauge",
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "le", "inf", "nan"}


def scrape(url: str) -> Dict[str, object]:
    """``{family name: family}`` of one /metrics; parsing fails on anything that is not Prometheus text."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: Dict[str, object], name: str, **labels: str) -> float:
    for f in fams.values():
        for s in f.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


def metric_names(expr: str) -> set:
    """The metric names a PromQL expression reads (strings, label matchers, ranges and groupings removed)."""
    e = re.sub(r"label_values\(([^,()]+),[^)]*\)", r"\1", expr)  # Grafana's variable query: the label is no metric
    e = re.sub(r'"[^"]*"', "", e)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue  # a function, an aggregation or a keyword
        names.add(m.group(0))
    return names


def test_promql_names_are_found():
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{job=~"x"}[5m]))) + b - time()') == \
        {"a_bucket", "b"}
    assert metric_names("label_values(process_start_time_seconds, job)") == {"process_start_time_seconds"}


@pytest.fixture
def system(tmp_path, tiny_model_dir):
    with running_chain(tmp_path, tiny_model_dir) as chain:
        yield chain


def test_metrics_of_central_worker_and_edge_and_the_dashboard(system):
    broker, central, agent = system
    wait(lambda: central.frames() >= 12, 60, "12 frames at central")
    with httpx.Client(base_url=central.base, headers=central.headers()) as c:
        wait(lambda: (c.get("/v1/devices").json()["devices"] or [{}])[0].get("frames_per_s") is not None, 20,
             "the edge's stats at central")
        assert c.post("/v1/search", data={"like_frame": c.get("/v1/frames").json()["frames"][0]["frame_id"]}
                      ).status_code == 200
    fams = {
        "central": scrape(f"{central.base}/metrics"),
        "worker": scrape(f"http://127.0.0.1:{central.worker.metrics_port}/metrics"),
        "edge": scrape(f"http://127.0.0.1:{agent.health_server.port}/metrics"),
    }
    for proc, expected in (("central", CENTRAL), ("worker", WORKER), ("edge", EDGE)):
        have = {n: f.type for n, f in fams[proc].items()}
        wrong = {n: (t, have.get(n)) for n, t in expected.items() if have.get(n) != t}
        assert not wrong, f"{proc}: expected (type, found) {wrong}"
        for n, f in fams[proc].items():
            if f.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in f.samples), n
    c, w, e = fams["central"], fams["worker"], fams["edge"]
    assert sample(c, "tokenline_stored_total") >= 12 and sample(c, "tokenline_received_total") >= 12
    assert sample(c, "tokenline_status_updates_total") >= 1  # status and stats are not counted as frames
    assert sample(c, "tokenline_received_total") == sample(c, "tokenline_stored_total")  # nothing else was sent
    assert sample(c, "tokenline_device_online", device="edge-1", site="plant-a") == 1
    assert sample(c, "tokenline_search_seconds_count") == 1
    assert sample(w, "tokenline_ingest_lag_seconds_count") >= 12 and sample(w, "tokenline_ingest_connected") == 1
    assert sample(w, "tokenline_ingest_messages_total", outcome="stored") >= 12
    assert sample(e, "tokenline_edge_inference_frames_total") >= 12
    assert sample(e, "tokenline_edge_camera_frames_total", camera="cam-1") >= 12

    exported = {s.name for fam in fams.values() for f in fam.values() for s in f.samples} | \
        {n for fam in fams.values() for n in fam}
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dash["templating"]["list"] if v.get("type") == "query"]
    assert len(exprs) > 20
    missing = {n: x for x in exprs for n in metric_names(x) if n not in exported}
    assert not missing, f"dashboard expressions name metrics nobody exports: {missing}"


def test_original_requested_from_the_edge(system, tmp_path):
    """Upload policy on_request: central has no originals; the page's button (POST .../original/request) makes the
    edge upload one; a JPEG the edge no longer keeps is reported as such; an offline device as offline."""
    broker, central, agent = system
    wait(lambda: central.frames() >= 12, 60, "12 frames at central")
    with httpx.Client(base_url=central.base, headers=central.headers(), timeout=20) as c:
        frames = c.get("/v1/frames").json()["frames"]
        assert all(f["original"] is None for f in frames)  # nothing uploaded by policy
        fid = frames[0]["frame_id"]
        assert c.get(f"/v1/frames/{fid}/original").status_code == 404
        assert c.get(f"/v1/frames/{fid}/original/request").status_code == 404  # nothing requested yet
        r = c.post(f"/v1/frames/{fid}/original/request")
        assert r.status_code == 202 and r.json()["state"] in ("requested", "queued_on_edge", "stored"), r.json()
        done = wait(lambda: c.get(f"/v1/frames/{fid}/original/request").json()["state"] == "stored", 30,
                    "the edge to upload the requested original")
        assert done and c.get(f"/v1/frames/{fid}/original").headers["content-type"] == "image/jpeg"
        d = c.get(f"/v1/frames/{fid}/original", params={"download": "true"})
        assert d.headers["content-disposition"].startswith('attachment; filename="plant-a_line-1_cam-1_')

        gone = frames[1]["frame_id"]
        assert agent.originals.prune(now=time.time() + 30 * 86400) >= 11  # the edge's max_age_s deletes them all
        assert c.post(f"/v1/frames/{gone}/original/request").status_code == 202
        st = wait(lambda: (lambda j: j if j["state"] == "not_on_edge" else None)(
            c.get(f"/v1/frames/{gone}/original/request").json()), 20, "the edge's answer in its stats")
        assert "not in the local store" in st["detail"]

        agent.shutdown()  # clean stop: retained status "offline"
        wait(lambda: c.get("/v1/devices").json()["devices"][0]["status"] == "offline", 20, "offline status")
        off = frames[2]["frame_id"]
        r = c.post(f"/v1/frames/{off}/original/request").json()
        assert r["state"] == "device_offline" and "not connected" in r["detail"]
        m = scrape(f"{central.base}/metrics")
        assert sample(m, "tokenline_original_requests_total", result="sent") == 3
