"""File sources: a folder read once and complete (settle time, writers, temporary names), remembered across restarts
in the journal, with file names and labels; a video file resumed where its committed frames end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest

from edge_agent import config as C
from edge_agent.filesources import FolderWatchSource, VideoFileSource, open_for_writing
from edge_agent.journal import READING, FileJournal
from edge_agent.sources import Captured, FrameError, SourceEnded, SourceError
from edge_agent.synthetic import draw_conveyor_frame


def jpeg(i: int = 0, w: int = 64, h: int = 48) -> bytes:
    ok, buf = cv2.imencode(".jpg", draw_conveyor_frame(i, w, h))
    assert ok
    return buf.tobytes()


def folder(path: Path, **over) -> C.FolderSourceConfig:
    return C.FolderSourceConfig(**dict({"kind": "folder", "path": path, "poll_s": 0.01, "settle_s": 0.0}, **over))


def drain(src: FolderWatchSource, tries: int = 5) -> List[Captured]:
    """Everything the source hands on now (a few polls)."""
    out: List[Captured] = []
    for _ in range(tries):
        while True:
            try:
                got = src.read()
            except FrameError:
                continue
            if got is None:
                break
            out.append(got)
    return out


def test_folder_reads_only_complete_files(tmp_path: Path) -> None:
    d = tmp_path / "in"
    src = FolderWatchSource(folder(d, settle_s=0.3))
    with pytest.raises(SourceError, match="does not exist"):
        src.open()
    d.mkdir()
    src.open()
    assert src.read() is None
    data = jpeg(1)
    # a writer that keeps the file open, paused half way for longer than the settle time
    held = open(d / "held.jpg", "wb")
    held.write(data[: len(data) // 2])
    held.flush()
    # write-then-rename: temporary names are never read
    (d / "b.jpg.tmp").write_bytes(data)
    (d / ".c.jpg").write_bytes(data)
    # a writer that closes and reopens between chunks, faster than the settle time
    (d / "appended.jpg").write_bytes(data[:100])
    time.sleep(0.2)
    assert drain(src) == []
    with open(d / "appended.jpg", "ab") as fh:
        fh.write(data[100:])
    if open_for_writing(d / "held.jpg") is None:
        pytest.skip("read leases are not available here: only the settle time guards open files")
    assert drain(src) == []  # seen complete now; it must stay so for the settle time
    time.sleep(0.5)  # longer than the settle time: only the open writer holds held.jpg back
    assert [g.source for g in drain(src)] == ["appended.jpg"]
    held.write(data[len(data) // 2:])
    held.close()
    os.rename(d / "b.jpg.tmp", d / "b.jpg")
    assert drain(src) == []
    time.sleep(0.4)
    got = drain(src)
    assert sorted(g.source for g in got) == ["b.jpg", "held.jpg"]
    assert all(g.frame.shape == (48, 64, 3) for g in got)
    assert not (d / "rejected").exists()  # nothing was read half-written


def test_folder_patterns_rejects_and_metadata(tmp_path: Path) -> None:
    d = tmp_path / "in"
    (d / "lot-7").mkdir(parents=True)
    (d / "A.JPG").write_bytes(jpeg(1))
    (d / "notes.txt").write_text("not an image")
    (d / "lot-7" / "part-3_top.png").write_bytes(cv2.imencode(".png", draw_conveyor_frame(2, 32, 32))[1].tobytes())
    (d / "lot-7" / "part-3_top.png.json").write_text(json.dumps({"shift": "night", "ok": False}))
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    # 600 bytes whose header claims 65000x65000: refused before decoding
    bomb = bytearray(jpeg(3))
    sof = bomb.index(b"\xff\xc0")
    bomb[sof + 5:sof + 9] = (65000).to_bytes(2, "big") * 2
    (d / "bomb.jpg").write_bytes(bytes(bomb[:600]))
    (d / "bad-labels.jpg").write_bytes(jpeg(4))
    (d / "bad-labels.jpg.json").write_text(json.dumps({"no spaces allowed": "x"}))
    src = FolderWatchSource(folder(d, recursive=True, sidecar=True,
                                   path_labels=r"^(?P<lot>lot-\d+)/(?P<part>part-\d+)_", capture_time="mtime"))
    src.open()
    errors = []
    got = []
    for _ in range(20):
        try:
            g = src.read()
        except FrameError as exc:
            errors.append(str(exc))
            continue
        if g is not None:
            got.append(g)
    by = {g.source: g for g in got}
    assert sorted(by) == ["A.JPG", "lot-7/part-3_top.png"]
    assert by["lot-7/part-3_top.png"].labels == {"lot": "lot-7", "part": "part-3", "shift": "night", "ok": "false"}
    assert by["A.JPG"].labels is None
    assert by["A.JPG"].capture_ts_us == (d / "A.JPG").stat().st_mtime_ns // 1000
    assert sorted(p.name for p in (d / "rejected").iterdir()) == ["bad-labels.jpg", "bad-labels.jpg.json",
                                                                  "bomb.jpg", "broken.jpg"]
    assert any("too_many_pixels" in e or "65000x65000" in e for e in errors), errors
    assert (d / "notes.txt").exists() and src.stats()["rejected"] == 3


def test_journal_keeps_files_read_once_across_restarts(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(6):
        (d / f"f{i}.jpg").write_bytes(jpeg(i))
        os.utime(d / f"f{i}.jpg", ns=(10**18 + i, 10**18 + i))  # oldest first: f0 .. f5
    jpath = tmp_path / "outbox.files.sqlite"
    journal = FileJournal(jpath)
    src = FolderWatchSource(folder(d, delete_after_read=True), "cam", journal)
    src.open()
    got = drain(src)
    assert [g.source for g in got] == [f"f{i}.jpg" for i in range(6)]
    got[0].ticket.committed()
    got[1].ticket.committed()
    got[2].ticket.skipped()
    got[3].ticket.failed("inference failed", retry=True)  # read again, same frame id
    again = drain(src)
    assert [(g.source, g.frame_id) for g in again] == [("f3.jpg", got[3].frame_id)]
    # f0, f1 committed: deleted; f2 skipped: kept, never read again; f3, f4, f5 in flight when the agent dies
    assert sorted(p.name for p in d.iterdir()) == ["f2.jpg", "f3.jpg", "f4.jpg", "f5.jpg"]
    assert {n: e.state for n, e in journal.files("cam").items()} == {"f2.jpg": "skipped", "f3.jpg": READING,
                                                                      "f4.jpg": READING, "f5.jpg": READING}
    journal.close()
    journal = FileJournal(jpath)  # the restart
    src2 = FolderWatchSource(folder(d, delete_after_read=True), "cam", journal)
    src2.open()
    replay = drain(src2)
    ids = {g.source: g.frame_id for g in got}
    assert [(g.source, g.frame_id, g.capture_ts_us) for g in replay] == \
        [(g.source, ids[g.source], g.capture_ts_us) for g in replay]  # same frame ids: central keeps one each
    assert [g.source for g in replay] == ["f3.jpg", "f4.jpg", "f5.jpg"]
    for g in replay:
        g.ticket.committed()
    assert sorted(p.name for p in d.iterdir()) == ["f2.jpg"]
    (d / "f2.jpg").unlink()
    (d / "f9.jpg").write_bytes(jpeg(9))
    assert [g.source for g in drain(src2)] == ["f9.jpg"]
    assert sorted(journal.files("cam")) == ["f9.jpg"]  # rows of files that left the folder are forgotten


def test_a_file_deleted_twice_counts_once(tmp_path: Path) -> None:
    """The writer deletes a committed file while a scan that saw it committed deletes it too (seen once in 60 files
    on a loaded machine: 61 deletions counted); the count is of files removed."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "f0.jpg").write_bytes(jpeg(0))
    src = FolderWatchSource(folder(d, delete_after_read=True), "cam", FileJournal(tmp_path / "journal.sqlite"))
    src.open()
    (got,) = drain(src)
    got.ticket.committed()  # the writer's delete
    src._delete("f0.jpg")  # the scan's, a moment later
    assert not (d / "f0.jpg").exists() and src.counts["deleted"] == 1 and src.counts["committed"] == 1


def test_a_file_that_keeps_failing_is_rejected_and_a_replaced_file_is_new(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    (d / "x.jpg").write_bytes(jpeg(1))
    (d / "y.jpg").write_bytes(jpeg(2))
    src = FolderWatchSource(folder(d), "cam")
    src.open()
    first = drain(src)
    by = {g.source: g for g in first}
    by["y.jpg"].ticket.committed()
    for _ in range(3):
        g = by["x.jpg"]
        g.ticket.failed("the outbox disk is full", retry=True)
        nxt = drain(src)
        if not nxt:
            break
        by["x.jpg"] = nxt[0]
    assert (d / "rejected" / "x.jpg").exists()
    time.sleep(0.01)
    (d / "y.jpg").write_bytes(jpeg(5))  # same name, new content: a new file
    assert [g.source for g in drain(src)] == ["y.jpg"]


def make_video(path: Path, frames: int) -> None:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (96, 64))
    assert vw.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for i in range(frames):
        vw.write(draw_conveyor_frame(i, 96, 64))
    vw.release()


def test_video_file_resumes_after_a_restart_with_the_same_frame_ids(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    make_video(path, 8)
    jpath = tmp_path / "j.sqlite"
    journal = FileJournal(jpath)
    cfg = C.FileSourceConfig(kind="file", path=path, pace=False, settle_s=0.05)
    src = VideoFileSource(cfg, "cam", journal)
    src.open()
    first = [src.read() for _ in range(5)]
    assert all(g.frame.shape == (64, 96, 3) and g.source == "clip.avi" for g in first)
    for g in first[:3]:
        g.ticket.committed()
    src.close()  # the agent stops with frames 3 and 4 not committed
    journal.close()
    journal = FileJournal(jpath)
    src = VideoFileSource(cfg, "cam", journal)
    src.open()
    rest = []
    with pytest.raises(SourceEnded):
        while True:
            rest.append(src.read())
    assert [g.frame_id for g in rest[:2]] == [g.frame_id for g in first[3:]]  # read again: the same ids
    assert [g.capture_ts_us for g in rest[:2]] == [g.capture_ts_us for g in first[3:]]
    assert len(rest) == 5
    for g in rest:
        g.ticket.committed()
    src.close()
    again = VideoFileSource(cfg, "cam", journal)
    with pytest.raises(SourceEnded):
        again.open()  # read to its end before: not read again
    assert journal.video("cam").done


def test_video_file_still_being_written_is_not_opened(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    make_video(path, 3)
    fh = open(path, "ab")
    try:
        src = VideoFileSource(C.FileSourceConfig(kind="file", path=path, settle_s=0.05))
        if open_for_writing(path) is None:
            pytest.skip("read leases are not available here")
        with pytest.raises(SourceError, match="still being written"):
            src.open()
    finally:
        fh.close()
    src.open()
    assert isinstance(src.read(), Captured)
    src.close()


def test_folder_config_keys() -> None:
    with pytest.raises(ValueError, match="renamed patterns"):
        C.FolderSourceConfig(kind="folder", path=Path("x"), pattern="*.jpg")
    with pytest.raises(ValueError, match="named groups"):
        C.FolderSourceConfig(kind="folder", path=Path("x"), path_labels="lot-.*")
    with pytest.raises(ValueError, match="file names, not paths"):
        C.FolderSourceConfig(kind="folder", path=Path("x"), patterns=["a/*.jpg"])
    cam = C.CameraConfig(name="c", line="l", source={"kind": "folder", "path": "x"})
    assert cam.sampling.mode == "all" and cam.lossless
    live = C.CameraConfig(name="c", line="l", source={"kind": "usb"})
    assert live.sampling.mode == "max_fps" and not live.lossless
    with pytest.raises(ValueError, match="label name"):
        C.CameraConfig(name="c", line="l", source={"kind": "usb"}, labels={"a b": "x"})
    assert np.array_equal(np.zeros(1), np.zeros(1))
