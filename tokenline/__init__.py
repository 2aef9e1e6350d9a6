"""tokenline contract: what exporter, edge agent and central share (manifest, summary, wire format, frame ids,
topics, preprocessing, configuration vocabulary).

This package must import on Python 3.8 to 3.12 (JetPack 5 and 6) and aarch64 with numpy, pydantic and pyyaml
only, and imports none of the other packages (tests/test_architecture.py).
"""

__version__ = "0.1.0"
