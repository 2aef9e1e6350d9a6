"""Config builders for edge agent tests (the tiny ONNX model fixture is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional


def synthetic_camera(name: str, seed: int = 0, frames: Optional[int] = 20, fps: float = 40.0, line: str = "line-1",
                     **source: Any) -> Dict[str, Any]:
    return {"name": name, "line": line,
            "source": dict({"kind": "synthetic", "fps": fps, "seed": seed, "max_frames": frames,
                            "width": 96, "height": 64}, **source),
            "sampling": {"mode": "every_nth", "every_nth": 1}, "queue_depth": 256,
            "reopen": {"initial_s": 0.1, "max_s": 0.5}}


def agent_config(tmp: Path, model_dir: Path, port: int, cameras: List[Dict[str, Any]], **over: Any) -> Dict[str, Any]:
    cfg: Dict[str, Any] = {
        "device": "edge-test", "site": "site-a", "model": {"dir": str(model_dir), "batch_size": 4},
        "cameras": cameras,
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
                 "confirm_timeout_s": 3.0, "confirm_timeout_max_s": 10.0},
        "outbox": {"path": str(tmp / "outbox.sqlite"), "synchronous": "NORMAL"},
        "originals": {"dir": str(tmp / "originals"), "jpeg_quality": 80},
        "health": {"http_port": None, "file": str(tmp / "health.json")},
        "stats_interval_s": 0.5, "shutdown_timeout_s": 5.0,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = dict(cfg[k], **v)
        else:
            cfg[k] = v
    return cfg
