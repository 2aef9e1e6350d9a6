"""TensorRT path of the exporter: compatibility check (no TensorRT needed), INT8 QDQ, engine build and load."""
