"""The edge side on the Pythons of the Jetsons: `.[edge]` installs into a fresh Python 3.8 (JetPack 5) and 3.10
(JetPack 6) virtual environment, and the contract's, runtime's and edge agent's tests pass there.

The interpreters come from pyenv (``~/.pyenv/versions/3.8.*``) or ``python3.8`` / ``python3.10`` on PATH; a missing
one skips loudly. Each virtual environment gets ``.[edge]`` (resolved by pip for that Python) plus what the tests
themselves use: pytest, hypothesis, and onnx for the tiny test encoder, and rich, which docs/jetson.md installs
next to it for ``tokenline-export build-engine`` (run on the device, in the same environment). Both environments
are installed at the same time from one wheel built first (pip mostly waits on the network and the disk); the
tests then run against this working tree, one Python after the other, all but the longest fault scenarios of
the agent, which the main suite runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional, Union

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("3.8", "3.10")
EDGE_TESTS = ["tests/contract", "tests/runtime", "tests/edge"]
LONG_SCENARIOS = "not sigkill_mid_stream and not broker_down_then_back and not outbox_cap_evicts"
TEST_TOOLS = ["pytest", "hypothesis", "onnx", "rich"]
SOURCE = ["pyproject.toml", "README.md", "tokenline", "runtime", "edge_agent", "exporter", "central", "sql"]
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _interpreter(version: str) -> Optional[Path]:
    found = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python"),
                   key=lambda p: [int(x) for x in p.parts[-3].split(".") if x.isdigit()])
    if found:
        return found[-1]
    on_path = shutil.which(f"python{version}")
    return Path(on_path) if on_path else None


def _run(cmd, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)


def _install(version: str, py: Path, wheel: Path, where: Path) -> Union[Path, str]:
    """A virtual environment with ``.[edge]`` and the test tools: its python, or why it could not be made."""
    t0 = time.monotonic()
    venv = where / f"venv-{version}"
    r = _run([py, "-m", "venv", venv], where, 120)
    if r.returncode:
        return f"venv failed: {r.stderr[-2000:]}"
    vpy = venv / "bin" / "python"
    r = _run([vpy, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check", f"{wheel}[edge]", *TEST_TOOLS],
             where, 900)
    if r.returncode:
        return f"pip could not install .[edge] on Python {version}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    sys.stdout.write(f"\nPython {version}: venv + pip install .[edge] {time.monotonic() - t0:.0f} s\n")
    return vpy


@pytest.fixture(scope="module")
def venvs(tmp_path_factory) -> Dict[str, Union[Path, str, None]]:
    """version -> the venv's python, an error text, or None when that Python is not on this machine."""
    where = tmp_path_factory.mktemp("pythons")
    src = where / "src"  # pip builds from a copy, so that nothing is left in the working tree
    src.mkdir()
    for name in SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    found = {v: _interpreter(v) for v in VERSIONS}
    if not any(found.values()):
        return {v: None for v in VERSIONS}
    # one pure-Python wheel for both (two pip builds in the same tree race on its build/ folder)
    r = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check", "-w",
              where / "dist", src], where, 600)
    wheels = sorted((where / "dist").glob("tokenline-*.whl"))
    if r.returncode or not wheels:
        return {v: f"could not build the wheel: {r.stdout[-2000:]}{r.stderr[-2000:]}" for v in VERSIONS}
    with ThreadPoolExecutor(len(VERSIONS)) as pool:
        jobs = {v: pool.submit(_install, v, py, wheels[0], where) for v, py in found.items() if py is not None}
        return {v: jobs[v].result() if v in jobs else None for v in VERSIONS}


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_edge_installs_and_passes_its_tests(version: str, venvs) -> None:
    vpy = venvs[version]
    if vpy is None:
        pytest.skip(f"NO PYTHON {version} HERE: the edge side is not tested on {version} on this machine "
                    f"(install it with pyenv, e.g. `pyenv install {version}`)")
    assert isinstance(vpy, Path), vpy
    r = _run([vpy, "-c", "import sys, edge_agent.agent, runtime.runners, tokenline.wire; print(sys.version)"],
             vpy.parents[1], 120)  # the installed copy imports (outside the working tree)
    assert r.returncode == 0 and r.stdout.startswith(version + "."), r.stdout + r.stderr
    r = _run([vpy, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", LONG_SCENARIOS, *EDGE_TESTS],
             ROOT, 900)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, f"edge tests failed on Python {version}:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail
    sys.stdout.write(f"Python {version}: {tail.strip().splitlines()[-1]}\n")
    # the engine build runs in the same environment on the device: it gets as far as asking for TensorRT
    r = _run([vpy, "-c", "import sys; from pathlib import Path; from tests.support.tiny_model import build_tiny_model; "
                         "d = build_tiny_model(Path(sys.argv[1])); from exporter.cli import main; "
                         "sys.exit(main(['build-engine', str(d)]))", vpy.parents[1] / "model"], ROOT, 300)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "python3-libnvinfer" in out and "torch" not in out, out[-3000:]
