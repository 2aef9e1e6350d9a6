"""Generate Mosquitto's configuration from a device inventory: who may connect, publish and subscribe to what.

    python deploy/broker/gen_broker_config.py inventory.yaml --out /etc/mosquitto/tokenline [--tls-dir DIR]

Writes into --out:
  dynamic-security.json  users, hashed passwords and roles for Mosquitto's dynamic-security plugin
  tokenline.conf         broker settings to include from mosquitto.conf (plugin, persistence, queues, listener)
  credentials/           one file per user with its plain password (mode 0600) for provisioning; delete after use

Existing passwords in credentials/ are kept, so re-running after adding a device does not rotate the others
(pass --rotate to issue new ones). The plugin reads dynamic-security.json when the broker starts: restart the
broker after re-running (protocol 2 edges resend whatever the restart costs).

Why the dynamic-security plugin and not an acl_file: Mosquitto 2.0 grants any SUBSCRIBE under an acl_file and
only filters delivery, so a device could join central's shared group ``$share/central/...`` and take its turn in
the round robin (the broker then drops those messages). The plugin refuses the SUBSCRIBE itself. It also binds
each device's and service's client id to its user: a CONNECT with another client's id is refused before it can
take over (or, with a clean start, wipe) that client's session; hence one user per central ingest worker.
Not ``use_username_as_clientid``: with it, Mosquitto 2.0.11 refuses a CONNECT without a username but wipes the
session of the client id it named first (tests/system/test_attacks.py, row 3).

Client ids: a device connects as ``tokenline-edge-<id>`` (the edge agent's default ``mqtt.client_id``), a service
or an api user with its user name as client id (central's ``mqtt.client_id``, ``api.command_client_id``); the
inventory's ``client_id`` overrides any of them.
Admins are not bound (trusted operators with tools that pick their own ids).

Roles (anything not granted is denied: publishing, subscribing, receiving):
  device D of site S with cameras (line L, camera C):
    publish    tokenline/v2/S/D/tokens/L/C   for each of its cameras
    publish    tokenline/v2/S/D/status, tokenline/v2/S/D/stats
    publish    tokenline/v2/S/D/alert/L/C    for each of its cameras (anomaly alerts when it scores locally)
    subscribe  tokenline/v2/S/D/cmd, tokenline/v2/S/D/ack (literally: nothing else, no wildcards, no $share)
    with --allow-protocol-v1 (during an upgrade, for edges not upgraded yet): publish tokenline/v1/S/L/C/tokens
    for each camera and tokenline/v1/S/D/status|stats, subscribe tokenline/v1/S/D/cmd
  service users (one per central ingest worker): subscribe to the token filters of both layouts through
    central's shared group only ($share/<--group>/...), to the status and stats filters, and publish
    acknowledgements, commands and anomaly alerts (tokenline/v2/+/+/ack, .../cmd, tokenline/v2/+/+/alert/+/+,
    tokenline/v1/+/+/cmd)
  alert readers (a line PLC, an andon board, a dashboard): subscribe to and receive the anomaly alerts of every
    site (tokenline/v2/+/+/alert/+/+, or a narrower filter inside it), nothing else; publish nothing
  api users (central's API process, which publishes request_original when someone asks for an original; its
    api.command_username and api.command_client_id): publish tokenline/v2/+/+/cmd (and tokenline/v1/+/+/cmd),
    nothing else: no subscription, no tokens, no acknowledgements
  admin users: publish, subscribe and receive tokenline/#
  bridges (a site broker's bridge user, deploy/broker/site-bridge.conf.template): speaks for every device of
    its site: publishes their tokens, status, stats and alerts, subscribes to their cmd and ack topics; the site
    broker, configured from the site's own inventory, binds each device there

Inventory (YAML):
  devices:
    - id: jetson-01
      site: plant-a
      cameras: [{line: line3, camera: cam1}, {line: line3, camera: cam2}]
      # client_id: tokenline-edge-jetson-01     (the default)
  services: [central-ingest-1, central-ingest-2]   # or {id: ..., client_id: ...}
  apis: [central-api]                               # or {id: ..., client_id: ...}
  admins: [ops]
  alert_readers: [andon-1]                  # or {id: ..., client_id: ...}; client id defaults to the name
  bridges: [{id: bridge-plant-b, site: plant-b}]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any, Dict, List

import yaml

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ITERATIONS = 101  # what mosquitto_ctrl uses for the dynamic-security plugin's PBKDF2-SHA512 hashes
SALT_BYTES = 12  # the plugin's salt length
PLUGIN_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",  # Debian/Ubuntu amd64
                     "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",  # Debian/Ubuntu arm64
                     "/usr/lib/mosquitto_dynamic_security.so",  # eclipse-mosquitto image
                     "/usr/local/lib/mosquitto_dynamic_security.so")  # built from source
V1, V2 = "tokenline/v1", "tokenline/v2"
ALERTS = f"{V2}/+/+/alert/+/+"  # tokenline.topics.ALERTS_FILTER (the generator runs without the package)


class InventoryError(ValueError):
    """An inventory that does not follow the documented shape."""


def password_hash(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> Dict[str, Any]:
    """The plugin's stored form of a password: base64 PBKDF2-HMAC-SHA512 digest, base64 salt, iterations."""
    salt = salt or os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {"password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": iterations}


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise InventoryError(f"{where}: {value!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
    return value


def load_inventory(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InventoryError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise InventoryError(f"{path}: top level must be a mapping")
    allowed = {"devices", "services", "apis", "admins", "bridges", "alert_readers"}
    unknown = set(data) - allowed
    if unknown:
        raise InventoryError(f"{path}: unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(allowed))})")
    devices = []
    for i, dev in enumerate(data.get("devices") or []):
        where = f"devices[{i}]"
        if not isinstance(dev, dict) or set(dev) - {"id", "site", "cameras", "client_id"}:
            raise InventoryError(f"{where}: needs id, site, cameras (and optionally client_id)")
        cams = []
        for j, cam in enumerate(dev.get("cameras") or []):
            if not isinstance(cam, dict) or set(cam) != {"line", "camera"}:
                raise InventoryError(f"{where}.cameras[{j}]: needs line and camera")
            cams.append((_name(cam["line"], f"{where}.cameras[{j}].line"),
                         _name(cam["camera"], f"{where}.cameras[{j}].camera")))
        dev_id = _name(dev.get("id"), f"{where}.id")
        devices.append({"id": dev_id, "site": _name(dev.get("site"), f"{where}.site"), "cameras": cams,
                        "client_id": _client_id(dev.get("client_id", f"tokenline-edge-{dev_id}"), f"{where}.client_id")})
    bridges = []
    for i, br in enumerate(data.get("bridges") or []):
        if not isinstance(br, dict) or set(br) != {"id", "site"}:
            raise InventoryError(f"bridges[{i}]: needs exactly id and site")
        bridges.append({"id": _name(br["id"], f"bridges[{i}].id"), "site": _name(br["site"], f"bridges[{i}].site")})
    ids = [d["id"] for d in devices]
    services, apis = _named_users(data, "services"), _named_users(data, "apis")
    readers = _named_users(data, "alert_readers")
    admins = [_name(a, "admins[]") for a in data.get("admins") or []]
    users = ids + [s["id"] for s in services + apis] + admins + [b["id"] for b in bridges] + [r["id"] for r in readers]
    dupes = {u for u in users if users.count(u) > 1}
    if dupes:
        raise InventoryError(f"user names must be unique across devices, services and admins: {sorted(dupes)}")
    cids = ([d["client_id"] for d in devices] + [s["client_id"] for s in services + apis] + [b["id"] for b in bridges]
            + [r["client_id"] for r in readers])
    dupes = {c for c in cids if cids.count(c) > 1}
    if dupes:
        raise InventoryError(f"client ids must be unique: {sorted(dupes)}")
    # two devices must not claim the same camera (protocol v1 topics name the camera, not the device)
    seen: Dict[str, str] = {}
    for d in devices:
        for line, cam in d["cameras"]:
            key = f"{d['site']}/{line}/{cam}"
            if key in seen:
                raise InventoryError(f"camera {key} is claimed by both {seen[key]} and {d['id']}")
            seen[key] = d["id"]
    return {"devices": devices, "services": services, "apis": apis, "admins": admins, "bridges": bridges, "alert_readers": readers}


def _named_users(data: Dict[str, Any], key: str) -> List[Dict[str, str]]:
    """Users listed by name, or as {id, client_id}; the client id defaults to the name."""
    out = []
    for i, entry in enumerate(data.get(key) or []):
        if isinstance(entry, dict):
            if set(entry) - {"id", "client_id"} or "id" not in entry:
                raise InventoryError(f"{key}[{i}]: a name, or {{id, client_id}}")
            user = _name(entry["id"], f"{key}[{i}].id")
            out.append({"id": user, "client_id": _client_id(entry.get("client_id", user), f"{key}[{i}].client_id")})
        else:
            out.append({"id": _name(entry, f"{key}[{i}]"), "client_id": entry})
    return out


def _client_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 128 or any(c in value for c in "/+#\0"):
        raise InventoryError(f"{where}: {value!r:.80} must be 1-128 characters without '/', '+', '#'")
    return value


def _acl(kind: str, topic: str) -> Dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": True}


def device_acls(d: Dict[str, Any], allow_v1: bool) -> List[Dict[str, Any]]:
    """What device ``d`` may do: publish on its own topics, subscribe to (and receive) its cmd and ack topics."""
    site, dev = d["site"], d["id"]
    own = f"{V2}/{site}/{dev}"
    send = [f"{own}/tokens/{line}/{cam}" for line, cam in d["cameras"]] + [f"{own}/status", f"{own}/stats"]
    send += [f"{own}/alert/{line}/{cam}" for line, cam in d["cameras"]]
    read = [f"{own}/cmd", f"{own}/ack"]
    if allow_v1:
        send += [f"{V1}/{site}/{line}/{cam}/tokens" for line, cam in d["cameras"]]
        send += [f"{V1}/{site}/{dev}/status", f"{V1}/{site}/{dev}/stats"]
        read += [f"{V1}/{site}/{dev}/cmd"]
    return ([_acl("publishClientSend", t) for t in send] + [_acl("subscribeLiteral", t) for t in read]
            + [_acl("publishClientReceive", t) for t in read])


def service_acls(group: str) -> List[Dict[str, Any]]:
    """Central's ingest workers: consume tokens (through the shared group), status and stats of both layouts;
    publish acknowledgements, commands and anomaly alerts. Mosquitto 2.0 checks a shared subscription with its
    ``$share/<group>/`` prefix, so the grant names central's group (``mqtt.group``) and no other group can be
    joined."""
    tokens = [f"{V2}/+/+/tokens/+/+", f"{V1}/+/+/+/tokens"]
    others = [f"{V2}/+/+/status", f"{V2}/+/+/stats", f"{V1}/+/+/status", f"{V1}/+/+/stats"]
    send = [f"{V2}/+/+/ack", f"{V2}/+/+/cmd", ALERTS, f"{V1}/+/+/cmd"]
    return ([_acl("subscribePattern", f"$share/{group}/{f}") for f in tokens]
            + [_acl("subscribePattern", f) for f in others]
            + [_acl("publishClientReceive", f) for f in tokens + others]
            + [_acl("publishClientSend", t) for t in send])


def bridge_acls(site: str, allow_v1: bool) -> List[Dict[str, Any]]:
    """A site broker's bridge: the device-side topics of every device of ``site``."""
    send = [f"{V2}/{site}/+/tokens/+/+", f"{V2}/{site}/+/status", f"{V2}/{site}/+/stats", f"{V2}/{site}/+/alert/+/+",
            f"tokenline/bridges/{site}/state"]
    read = [f"{V2}/{site}/+/cmd", f"{V2}/{site}/+/ack"]
    if allow_v1:
        send += [f"{V1}/{site}/+/+/tokens", f"{V1}/{site}/+/status", f"{V1}/{site}/+/stats"]
        read += [f"{V1}/{site}/+/cmd"]
    return ([_acl("publishClientSend", t) for t in send] + [_acl("subscribePattern", t) for t in read]
            + [_acl("publishClientReceive", t) for t in read])


def api_acls() -> List[Dict[str, Any]]:
    """Central's API process: publish the devices' commands (request_original), nothing else."""
    return [_acl("publishClientSend", t) for t in (f"{V2}/+/+/cmd", f"{V1}/+/+/cmd")]


def alert_reader_acls() -> List[Dict[str, Any]]:
    """Alert readers: subscribe to (a filter inside) the alert topics and receive them; nothing else."""
    return [_acl("subscribePattern", ALERTS), _acl("publishClientReceive", ALERTS)]


def admin_acls() -> List[Dict[str, Any]]:
    return [_acl(kind, "tokenline/#") for kind in ("publishClientSend", "publishClientReceive", "subscribePattern")]


def dynsec_config(inv: Dict[str, Any], passwords: Dict[str, str], allow_v1: bool,
                  group: str = "central") -> Dict[str, Any]:
    """The plugin's document: one role per device, one shared role each for services and admins."""
    clients, roles = [], []
    for d in inv["devices"]:
        role = f"device-{d['id']}"
        roles.append({"rolename": role, "acls": device_acls(d, allow_v1)})
        clients.append(dict({"username": d["id"], "clientid": d["client_id"],
                             "textName": f"edge device {d['id']} ({d['site']})", "roles": [{"rolename": role}]},
                            **password_hash(passwords[d["id"]])))
    for b in inv["bridges"]:
        role = f"bridge-{b['id']}"
        roles.append({"rolename": role, "acls": bridge_acls(b["site"], allow_v1)})
        clients.append(dict({"username": b["id"], "clientid": b["id"], "textName": f"bridge of site {b['site']}",
                             "roles": [{"rolename": role}]}, **password_hash(passwords[b["id"]])))
    if inv["services"]:
        roles.append({"rolename": "service", "acls": service_acls(group)})
    for svc in inv["services"]:
        clients.append(dict({"username": svc["id"], "clientid": svc["client_id"], "textName": "central ingest worker",
                             "roles": [{"rolename": "service"}]}, **password_hash(passwords[svc["id"]])))
    if inv["apis"]:
        roles.append({"rolename": "api", "acls": api_acls()})
    for api in inv["apis"]:
        clients.append(dict({"username": api["id"], "clientid": api["client_id"], "textName": "central API (commands)",
                             "roles": [{"rolename": "api"}]}, **password_hash(passwords[api["id"]])))
    if inv["alert_readers"]:
        roles.append({"rolename": "alert-reader", "acls": alert_reader_acls()})
    for r in inv["alert_readers"]:
        clients.append(dict({"username": r["id"], "clientid": r["client_id"], "textName": "anomaly alert reader",
                             "roles": [{"rolename": "alert-reader"}]}, **password_hash(passwords[r["id"]])))
    if inv["admins"]:
        roles.append({"rolename": "admin", "acls": admin_acls()})
    for u in inv["admins"]:
        clients.append(dict({"username": u, "textName": "administrator", "roles": [{"rolename": "admin"}]},
                            **password_hash(passwords[u])))
    return {"defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                                 "unsubscribe": True},
            "clients": clients, "groups": [], "roles": roles}


def broker_conf(root: Path, port: int, tls_dir: Path | None, require_certificate: bool, plugin: str,
                persistence_dir: Path, autosave_s: int, bind: str | None = None) -> str:
    """tokenline.conf; ``root`` is where the broker finds dynamic-security.json (may differ from --out)."""
    conf = [
        "# generated by deploy/broker/gen_broker_config.py; do not edit (re-run it and restart the broker)",
        "",
        "# Persistence: the in-memory state (sessions, queued messages, retained status) is saved every",
        f"# {autosave_s} s and at a clean shutdown. A crash loses what changed since the last save; edges on",
        "# protocol 2 keep every frame until central confirms it and resend what stays unconfirmed, so a crash",
        "# costs time (the edges' confirm_timeout_s), never frames (docs/deployment.md).",
        "persistence true",
        f"persistence_location {persistence_dir}/",
        f"autosave_interval {autosave_s}",
        "# an ingest worker takes up to ingest.batch_max (100) unacknowledged messages at once",
        "max_inflight_messages 100",
        "# queued per offline persistent session (a restarting ingest worker, a reconnecting edge); beyond it the",
        "# broker drops messages (protocol 2 edges resend what central has not confirmed)",
        "max_queued_messages 100000",
        "",
        "# users, passwords, client ids and roles: dynamic-security.json (SUBSCRIBE is refused unless a role grants",
        "# it; a CONNECT is refused unless its client id is the one bound to its user)",
        f"plugin {plugin}",
        f"plugin_opt_config_file {root / 'dynamic-security.json'}",
        "allow_anonymous false",
        "",
        f"listener {port}" + (f" {bind}" if bind else ""),
    ]
    if tls_dir is not None:
        conf += [f"cafile {tls_dir / 'ca.crt'}", f"certfile {tls_dir / 'server.crt'}", f"keyfile {tls_dir / 'server.key'}",
                 "tls_version tlsv1.2"]
        if require_certificate:
            conf += ["require_certificate true", "use_identity_as_username false"]
    return "\n".join(conf) + "\n"


def default_plugin() -> str | None:
    return next((p for p in PLUGIN_CANDIDATES if Path(p).is_file()), None)


def generate(inv: Dict[str, Any], out: Path, port: int = 8883, tls_dir: Path | None = None,
             require_certificate: bool = False, rotate: bool = False, conf_root: Path | None = None,
             plugin: str | None = None, persistence_dir: Path = Path("/var/lib/mosquitto"), autosave_s: int = 60,
             allow_v1: bool = False, bind: str | None = None, group: str = "central") -> Dict[str, str]:
    """Write dynamic-security.json, tokenline.conf and credentials/ into out; returns {user: password}."""
    plugin = plugin or default_plugin()
    if plugin is None:
        raise InventoryError("mosquitto_dynamic_security.so not found in "
                             f"{', '.join(PLUGIN_CANDIDATES)}: pass --plugin with its path on the broker")
    out.mkdir(parents=True, exist_ok=True)
    creds_dir = out / "credentials"
    creds_dir.mkdir(mode=0o700, exist_ok=True)
    users = [d["id"] for d in inv["devices"]] + [s["id"] for s in inv["services"] + inv["apis"]] + list(inv["admins"]) + [
        b["id"] for b in inv["bridges"]] + [r["id"] for r in inv["alert_readers"]]
    passwords: Dict[str, str] = {}
    for u in users:
        f = creds_dir / u
        if f.exists() and not rotate:
            passwords[u] = f.read_text().strip()
        else:
            passwords[u] = secrets.token_urlsafe(24)
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(passwords[u] + "\n")
    _atomic_write(out / "dynamic-security.json", json.dumps(dynsec_config(inv, passwords, allow_v1, group), indent=1), 0o640)
    _atomic_write(out / "tokenline.conf", broker_conf(conf_root or out, port, tls_dir, require_certificate, plugin,
                                                      persistence_dir, autosave_s, bind), 0o644)
    return passwords


def _atomic_write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inventory", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--port", type=int, default=8883)
    ap.add_argument("--bind", default=None, help="address the listener binds to (default: all)")
    ap.add_argument("--tls-dir", type=Path, default=None, help="folder with ca.crt, server.crt, server.key")
    ap.add_argument("--require-certificate", action="store_true", help="clients must present a certificate")
    ap.add_argument("--rotate", action="store_true", help="issue new passwords for every user")
    ap.add_argument("--conf-root", type=Path, default=None,
                    help="where the broker sees the --out folder (e.g. inside a container); default: --out")
    ap.add_argument("--plugin", default=None,
                    help="path of mosquitto_dynamic_security.so on the broker (default: found on this machine)")
    ap.add_argument("--persistence-dir", type=Path, default=Path("/var/lib/mosquitto"))
    ap.add_argument("--autosave-interval", type=int, default=60, help="seconds between saves of the broker's state")
    ap.add_argument("--group", default="central",
                    help="central's shared-subscription group (its mqtt.group), the only one services may join")
    ap.add_argument("--allow-protocol-v1", action="store_true",
                    help="during an upgrade: also let devices use the protocol v1 topics of their cameras")
    args = ap.parse_args(argv)
    try:
        inv = load_inventory(args.inventory)
        pw = generate(inv, args.out, args.port, args.tls_dir, args.require_certificate, args.rotate, args.conf_root,
                      args.plugin, args.persistence_dir, args.autosave_interval, args.allow_protocol_v1, args.bind,
                      _name(args.group, "--group"))
    except InventoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/dynamic-security.json, tokenline.conf and credentials/ for {len(pw)} users")
    return 0


if __name__ == "__main__":
    sys.exit(main())
