"""tokenline edge agent: camera frames -> encoder -> quantized summary tokens -> durable outbox -> MQTT.

Runs on Python 3.10 / aarch64 (JetPack 6) with numpy, OpenCV, ONNX Runtime, paho-mqtt, pydantic and PyYAML;
never torch, never the exporter.
"""

__version__ = "0.1.0"
