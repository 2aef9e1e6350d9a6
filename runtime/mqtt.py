"""The MQTT client both programs use: a paho-mqtt 2.x client (MQTT 5) with credentials and TLS from the config.

The edge's link and central's ingest worker add their own callbacks, will, acknowledgement mode and reconnect
policy; how a client authenticates and encrypts is decided here once, from ``tokenline.config.MqttClientConfig``.
The password file is read at every call, so a client made for a new connection attempt picks up a rotated one.
"""

from __future__ import annotations

import ssl
from typing import Any

import paho.mqtt.client as mqtt

from tokenline.config import MqttClientConfig, read_secret


def make_client(cfg: MqttClientConfig, client_id: str, **options: Any) -> mqtt.Client:
    """A paho client speaking MQTT 5 with the callback API version 2; ``options`` go to ``mqtt.Client`` (e.g.
    ``manual_ack=True``, ``reconnect_on_failure=False``). ConfigError when the password file cannot be read."""
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5, **options)
    password = read_secret(cfg.password, cfg.password_file, "mqtt.password_file")
    if cfg.username is not None:
        c.username_pw_set(cfg.username, password)
    tls = cfg.tls
    if tls.enabled:
        c.tls_set(ca_certs=str(tls.ca_file) if tls.ca_file else None,
                  certfile=str(tls.cert_file) if tls.cert_file else None,
                  keyfile=str(tls.key_file) if tls.key_file else None,
                  cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if tls.insecure:
            c.tls_insecure_set(True)
    return c
