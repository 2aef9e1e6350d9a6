"""`make demo` re-exports its model when the exporter's code or the demo's export options change
(demo/__main__.py: export_key), so neither the demo nor the benchmarks that use out/demo/model run a stale one."""

from __future__ import annotations

from pathlib import Path

import pytest

import demo.__main__ as demo


def test_export_key_follows_the_exporter_code_and_the_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "exporter" / "sub").mkdir(parents=True)
    (tmp_path / "tokenline").mkdir()
    (tmp_path / "exporter" / "merge.py").write_text("ALPHA_SCALE = 1\n")
    (tmp_path / "exporter" / "sub" / "head.py").write_text("ROTATE = False\n")
    (tmp_path / "tokenline" / "manifest.py").write_text("SCHEMA = 2\n")
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    first = demo.export_key(demo.EXPORT_ARGS)
    assert demo.export_key(list(demo.EXPORT_ARGS)) == first  # same code, same options: keep the export
    assert demo.export_key(demo.EXPORT_ARGS + ["--calib", "frames"]) != first
    (tmp_path / "exporter" / "sub" / "head.py").write_text("ROTATE = True\n")
    second = demo.export_key(demo.EXPORT_ARGS)
    assert second != first
    (tmp_path / "tokenline" / "manifest.py").write_text("SCHEMA = 3\n")
    assert demo.export_key(demo.EXPORT_ARGS) != second
