"""The command line with its TensorRT subcommands loads without torch. (The exporter's import graph - no
circles, lazy imports included - is checked with every other package's in tests/test_architecture.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_trt_subcommands_load_without_torch() -> None:
    code = (
        "import sys\n"
        "import exporter.cli\n"
        "exporter.cli.build_parser().parse_args(['check-trt', 'model.onnx'])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
