"""A real Mosquitto configured by deploy/broker/gen_broker_config.py (dynamic-security plugin: roles, client ids
bound to users; persistence) from a test inventory; started on an ephemeral loopback port."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Tuple

from tests.support.broker import Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[2]


def load_generator() -> ModuleType:
    """deploy/broker/gen_broker_config.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("gen_broker_config",
                                                  ROOT / "deploy" / "broker" / "gen_broker_config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def generated_broker(tmp: Path, inventory: str, tls_dir: Optional[Path] = None, allow_v1: bool = False,
                     autosave_s: int = 60) -> Tuple[Mosquitto, Dict[str, str]]:
    """A broker (not started) running exactly the generated configuration, and every user's password."""
    gen = load_generator()
    tmp.mkdir(parents=True, exist_ok=True)
    inv_file = tmp / "inventory.yaml"
    inv_file.write_text(inventory)
    out = tmp / "broker-conf"
    data = tmp / "broker-data"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [str(inv_file), "--out", str(out), "--port", str(port), "--bind", "127.0.0.1",
            "--persistence-dir", str(data), "--autosave-interval", str(autosave_s)]
    if tls_dir is not None:
        args += ["--tls-dir", str(tls_dir)]
    if allow_v1:
        args.append("--allow-protocol-v1")
    assert gen.main(args) == 0
    passwords = {f.name: f.read_text().strip() for f in (out / "credentials").iterdir()}
    broker = Mosquitto(tmp / "broker", port=port, config=(out / "tokenline.conf").read_text())
    return broker, passwords
