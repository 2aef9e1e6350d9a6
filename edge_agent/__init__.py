"""tokenline edge agent: camera frames -> encoder -> quantized summary tokens -> durable outbox -> MQTT.

Runs on Python 3.8 to 3.12 / aarch64 (JetPack 5 and 6) with numpy, OpenCV, ONNX Runtime, paho-mqtt, pydantic and
PyYAML, over the contract (``tokenline``) and the runtime (``runtime``); never torch, never the other programs.
"""

__version__ = "0.1.0"
