"""Frame sources: synthetic conveyor, watched folder, video file (corrupt frames, disconnects, end)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent import config as C
from edge_agent.sources import FolderWatchSource, FrameError, SourceEnded, SourceError, SyntheticConveyorSource
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


def test_folder_source_reads_new_files_and_rejects_corrupt_ones(tmp_path: Path) -> None:
    d = tmp_path / "in"
    src = FolderWatchSource(C.FolderSourceConfig(kind="folder", path=d, poll_s=0.01))
    with pytest.raises(SourceError, match="does not exist"):
        src.open()
    d.mkdir()
    src.open()
    assert src.read() is None
    cv2.imwrite(str(d / "a.jpg"), draw_conveyor_frame(0, 64, 48))
    (d / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert src.read().shape == (48, 64, 3)
    with pytest.raises(FrameError, match="not a decodable image"):
        src.read()
    assert (d / "rejected" / "b.jpg").exists() and src.read() is None
    for p in d.rglob("*"):
        p.unlink() if p.is_file() else None
    (d / "rejected").rmdir()
    d.rmdir()
    with pytest.raises(SourceError, match="disappeared"):
        src.read()


def test_video_file_source_reads_to_the_end_or_loops(tmp_path: Path) -> None:
    from edge_agent.sources import CvCaptureSource

    path = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (96, 64))
    assert vw.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for i in range(5):
        vw.write(draw_conveyor_frame(i, 96, 64))
    vw.release()
    src = CvCaptureSource(C.FileSourceConfig(kind="file", path=path, pace=False))
    src.open()
    frames = [src.read() for _ in range(5)]
    assert all(f.shape == (64, 96, 3) for f in frames)
    with pytest.raises(SourceEnded):
        src.read()
    src.close()
    loop = CvCaptureSource(C.FileSourceConfig(kind="file", path=path, pace=False, loop=True))
    loop.open()
    assert len([loop.read() for _ in range(12)]) == 12
    loop.close()
    with pytest.raises(SourceError, match="does not exist"):
        CvCaptureSource(C.FileSourceConfig(kind="file", path=tmp_path / "none.avi")).open()
    with pytest.raises(SourceError, match="cannot open"):
        (tmp_path / "junk.avi").write_bytes(b"junk" * 100)
        CvCaptureSource(C.FileSourceConfig(kind="file", path=tmp_path / "junk.avi")).open()
