"""Local anomaly scoring on the edge: each camera's bank exported from central, a score in every message, alerts.

A camera is scored when its bank file exists (``<model.dir>/anomaly/<site>/<line>/<camera>.npz``, written by
``tokenline-central reference-set export``); the file is verified at start (checksum, this model's manifest hash,
this camera) and a bad one stops the agent. The score is computed on the tokens exactly as central will decode
them (``tokenline.wire.as_decoded``), with the contract's scoring, so it equals central's; it travels in the
message's ANOMALY section, and a flagged frame is published on the camera's alert topic right away, so a line
without a network to central still flags (the site broker's subscribers see it).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

from edge_agent.config import AgentConfig
from tokenline.anomaly import AnomalyScore, Bank, BankError, bank_file, token_region
from tokenline.manifest import Manifest
from tokenline.summary import Summary
from tokenline.topics import Alert
from tokenline.wire import as_decoded

log = logging.getLogger(__name__)


class EdgeScorer:
    """The banks of this agent's cameras and the scoring of their frames; counters for the stats."""

    def __init__(self, cfg: AgentConfig, manifest: Manifest) -> None:
        root = cfg.anomaly.dir or Path(cfg.model.dir) / "anomaly"
        self.site, self.device, self.mode = cfg.site, cfg.device, cfg.messages.token_dtype
        self.hash16 = manifest.hash_bytes().hex()
        self.grid: Tuple[int, int] = tuple(manifest.encoder.grid)  # type: ignore[assignment]
        self.banks: Dict[str, Bank] = {}
        for cam in cfg.cameras:
            path = bank_file(root, cfg.site, cam.line, cam.name)
            if not path.is_file():
                log.warning("anomaly: no bank for camera %s (%s); its frames are not scored here", cam.name, path)
                continue
            self.banks[cam.name] = Bank.load(path, self.hash16, (cfg.site, cam.line, cam.name))
            b = self.banks[cam.name].info
            log.info("anomaly: camera %s scored against set %d v%d (%d tokens, threshold %.4f)", cam.name, b.set_id,
                     b.set_version, self.banks[cam.name].size, b.threshold)
        self.lock = threading.Lock()
        self.counts = {"scored": 0, "flagged": 0, "errors": 0, "alerts_published": 0, "alerts_unsent": 0}
        self.last_flagged: Optional[dict] = None

    def score(self, camera: str, summary: Summary) -> Optional[AnomalyScore]:
        """The frame's score against its camera's bank (None without one), on its tokens as central decodes them."""
        bank = self.banks.get(camera)
        if bank is None:
            return None
        gmode = "fp16" if self.mode == "fp16" else "int8"
        seen = Summary(as_decoded(summary.global_embedding, gmode), as_decoded(summary.tokens, self.mode),
                       summary.sizes, summary.centroids, summary.footprint)
        try:
            a = bank.score(seen)
        except (BankError, ValueError) as exc:
            with self.lock:
                self.counts["errors"] += 1
            log.error("anomaly: camera %s: cannot score: %s", camera, exc)
            return None
        with self.lock:
            self.counts["scored"] += 1
            self.counts["flagged"] += int(a.flagged)
        return a

    def alert(self, a: AnomalyScore, frame_id: str, line: str, camera: str, capture_us: int,
              summary: Summary) -> Alert:
        box = token_region(summary, a.token, self.grid).box if a.token >= 0 else (0.0, 0.0, 0.0, 0.0)
        alert = Alert(frame_id=frame_id, site=self.site, device=self.device, line=line, camera=camera,
                      capture_us=capture_us, score=a.score, threshold=a.threshold, reference_set=a.set_id,
                      set_version=a.set_version, token=a.token, box=tuple(float(v) for v in box), source="edge",
                      model=self.hash16)
        with self.lock:
            self.last_flagged = {"frame_id": frame_id, "camera": camera, "score": round(a.score, 6),
                                 "capture_us": capture_us}
        return alert

    def sent(self, published: bool) -> None:
        with self.lock:
            self.counts["alerts_published" if published else "alerts_unsent"] += 1

    def stats(self) -> dict:
        with self.lock:
            return dict(self.counts, cameras=sorted(self.banks), last_flagged=self.last_flagged)
