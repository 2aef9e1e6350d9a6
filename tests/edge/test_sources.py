"""Frame sources: synthetic conveyor and video file (corrupt frames, disconnects, end); folders: test_filesources."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent import config as C
from edge_agent.filesources import VideoFileSource
from edge_agent.sources import SourceEnded, SourceError, SyntheticConveyorSource
from edge_agent.synthetic import draw_conveyor_frame


def test_synthetic_source_is_deterministic_with_corruption_and_disconnect() -> None:
    src = SyntheticConveyorSource(C.SyntheticSourceConfig(kind="synthetic", fps=1000, max_frames=6, corrupt_every=3,
                                                    fail_after=4, width=64, height=48))
    src.open()
    frames = [src.read() for _ in range(4)]
    assert frames[0].shape == (48, 64, 3) and frames[2].shape[0] == 1  # frame 3 is garbage
    np.testing.assert_array_equal(frames[1], draw_conveyor_frame(1, 64, 48, seed=0, defect_rate=0.3))
    with pytest.raises(SourceError, match="simulated disconnect"):
        src.read()
    src.open()
    src.read()
    src.read()
    with pytest.raises(SourceEnded):
        src.read()


def test_video_file_source_reads_to_the_end_or_loops(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (96, 64))
    assert vw.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for i in range(5):
        vw.write(draw_conveyor_frame(i, 96, 64))
    vw.release()
    src = VideoFileSource(C.FileSourceConfig(kind="file", path=path, pace=False, settle_s=0))
    src.open()
    frames = [src.read() for _ in range(5)]
    assert all(f.frame.shape == (64, 96, 3) for f in frames)
    with pytest.raises(SourceEnded):
        src.read()
    src.close()
    loop = VideoFileSource(C.FileSourceConfig(kind="file", path=path, pace=False, loop=True, settle_s=0))
    loop.open()
    assert len([loop.read() for _ in range(12)]) == 12
    loop.close()
    with pytest.raises(SourceError, match="does not exist"):
        VideoFileSource(C.FileSourceConfig(kind="file", path=tmp_path / "none.avi")).open()
    with pytest.raises(SourceError, match="cannot open"):
        (tmp_path / "junk.avi").write_bytes(b"junk" * 100)
        VideoFileSource(C.FileSourceConfig(kind="file", path=tmp_path / "junk.avi", settle_s=0)).open()
