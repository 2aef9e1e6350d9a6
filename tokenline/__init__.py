"""tokenline contract: the data shared by exporter, edge agent and central (manifest, wire format, topics).

This package must import on Python 3.10 (JetPack 6) and aarch64 with numpy, pydantic and pyyaml only.
"""

__version__ = "0.1.0"
