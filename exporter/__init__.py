"""tokenline exporter: ViT checkpoints -> token-merged encoders with summary tokens -> ONNX/TensorRT + manifest."""

__version__ = "0.1.0"
