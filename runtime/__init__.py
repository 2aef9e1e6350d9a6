"""The torch-free runtime the three programs share: encoder runners, TensorRT engines, CUDA, MQTT, logging.

``runtime.runners`` runs an exported encoder (ONNX Runtime or a native TensorRT engine) and returns a
``tokenline.summary.Summary``; ``runtime.engine`` verifies and loads TensorRT engines (the exporter builds them);
``runtime.cuda`` is the one ctypes binding to the CUDA driver and runtime; ``runtime.mqtt`` makes the paho client
both programs use; ``runtime.logs`` is the CLIs' logging setup. Imports only the contract package (``tokenline``)
among ours; Python 3.8+; heavy libraries (onnxruntime, tensorrt, paho) are imported by the module that uses them.
"""
