"""Typed configuration of the edge agent: one YAML file, validated once at start, unknown keys rejected.

Every key and its default is listed here (the MQTT connection and TLS keys in ``tokenline.config``, shared with
central) and in ``docs/edge.md``; ``load_config`` raises ``tokenline.config.ConfigError`` whose message names
each offending key (``cameras[1].source.url: ...``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import Field, field_validator, model_validator

from tokenline.config import NAME_PATTERN, MqttClientConfig, load_config_file, validate_config
from tokenline.documents import StrictModel
from tokenline.preprocess import DEFAULT_MAX_PIXELS
from tokenline.wire import WireError, check_metadata

# -- sources --------------------------------------------------------------------------------------------------
class UsbSourceConfig(StrictModel):
    """A V4L2/USB camera by index (``cv2.VideoCapture(index)``)."""

    kind: Literal["usb"]
    index: int = Field(0, ge=0)
    width: Optional[int] = Field(None, gt=0)
    height: Optional[int] = Field(None, gt=0)


class UrlSourceConfig(StrictModel):
    """An RTSP/HTTP(S) stream (``cv2.VideoCapture(url, CAP_FFMPEG)``)."""

    kind: Literal["url"]
    url: str = Field(pattern=r"^(rtsp|rtsps|http|https)://")


class GstreamerSourceConfig(StrictModel):
    """A GStreamer pipeline ending in ``appsink`` (Jetson CSI cameras: nvarguscamerasrc ...)."""

    kind: Literal["gstreamer"]
    pipeline: str = Field(min_length=1)

    @field_validator("pipeline")
    @classmethod
    def _appsink(cls, v: str) -> str:
        if "appsink" not in v:
            raise ValueError("a GStreamer pipeline for OpenCV must end in appsink")
        return v


class FileSourceConfig(StrictModel):
    """A video file; ``loop`` restarts it at the end, ``pace`` reads at the file's own frame rate.

    Read without loss (back-pressure, no time-based sampling by default) and once: opened only when complete
    (``settle_s``), and a file already read to its end is not read again after a restart (the file journal);
    a restart in the middle resumes where the committed frames end.
    """

    kind: Literal["file"]
    path: Path
    loop: bool = False
    pace: bool = True
    settle_s: float = Field(2.0, ge=0)  # size and mtime unchanged this long before the file is opened


# Names a writer gives a file while it is still writing it (write, then rename to the final name).
TEMP_PATTERNS = [".*", "*.tmp", "*.temp", "*.part", "*.partial", "*.crdownload", "*.filepart", "*~"]
IMAGE_PATTERNS = ["*.jpg", "*.jpeg", "*.png", "*.bmp", "*.tif", "*.tiff", "*.webp"]


class FolderSourceConfig(StrictModel):
    """A folder watched for new image files (oldest first); each file is one frame, read once, never dropped.

    A file is read when it is complete: its name matches ``patterns`` and none of ``ignore`` (a writer that
    writes ``x.jpg.tmp`` and renames it to ``x.jpg`` is never read half-written), its size and mtime have not
    changed for ``settle_s``, and (Linux, where a read lease can tell) no process has it open for writing.
    Files read are remembered across restarts (the file journal next to the outbox), so nothing is sent twice.
    """

    kind: Literal["folder"]
    path: Path
    patterns: List[str] = Field(default_factory=lambda: list(IMAGE_PATTERNS), min_length=1)  # case-insensitive
    ignore: List[str] = Field(default_factory=lambda: list(TEMP_PATTERNS))  # temporary names, case-insensitive
    recursive: bool = False  # also sub-folders (never rejected/)
    settle_s: float = Field(2.0, ge=0)
    poll_s: float = Field(0.2, gt=0)
    delete_after_read: bool = False  # delete a file (and its sidecar) once its frame is committed to the outbox
    capture_time: Literal["read", "mtime"] = "read"  # the frame's capture time: when read, or the file's mtime
    sidecar: bool = False  # labels from <file name>.json next to the image, e.g. a.jpg.json: {"lot": "17"}
    path_labels: Optional[str] = None  # regex on the path below the folder; its named groups become labels
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # larger images (declared in the header) are rejected

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "pattern" in data:
            raise ValueError("pattern was renamed patterns (a list, case-insensitive), e.g. patterns: ['*.jpg']")
        return data

    @field_validator("patterns", "ignore")
    @classmethod
    def _globs(cls, v: List[str]) -> List[str]:
        bad = [p for p in v if not p or "/" in p]
        if bad:
            raise ValueError(f"patterns match file names, not paths (no '/', not empty): {bad}")
        return v

    @field_validator("path_labels")
    @classmethod
    def _regex(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        try:
            rx = re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        if not rx.groupindex:
            raise ValueError("needs named groups, e.g. '(?P<lot>[^/]+)/(?P<part>[^_]+)_' (each becomes a label)")
        return v


class SyntheticSourceConfig(StrictModel):
    """A synthetic conveyor camera: parts with defects drawn by OpenCV (demos and tests)."""

    kind: Literal["synthetic"]
    width: int = Field(320, ge=32, le=4096)
    height: int = Field(240, ge=32, le=4096)
    fps: float = Field(10.0, gt=0, le=1000)
    seed: int = 0
    defect_rate: float = Field(0.3, ge=0, le=1)
    max_frames: Optional[int] = Field(None, ge=1)  # the source ends after this many frames
    corrupt_every: Optional[int] = Field(None, ge=1)  # every Nth frame is garbage (tests)
    fail_after: Optional[int] = Field(None, ge=1)  # the camera "disconnects" after N frames, then reopens


SourceConfig = Union[UsbSourceConfig, UrlSourceConfig, GstreamerSourceConfig, FileSourceConfig, FolderSourceConfig,
                     SyntheticSourceConfig]


class SamplingConfig(StrictModel):
    """Which frames are encoded: ``all``, at most ``max_fps``, every Nth, or one per trigger command.

    Live cameras drop what is not sampled. File sources (``folder``, ``file``: default ``all``) never skip a
    frame for time: ``max_fps`` paces their reading, ``trigger`` waits for the command before reading the next
    file, and only ``every_nth`` skips (deliberately: skipped files are journaled, never deleted).
    """

    mode: Literal["all", "max_fps", "every_nth", "trigger"] = "max_fps"
    max_fps: float = Field(5.0, gt=0)
    every_nth: int = Field(1, ge=1)


class BackoffConfig(StrictModel):
    initial_s: float = Field(0.5, gt=0)
    max_s: float = Field(30.0, gt=0)
    factor: float = Field(2.0, ge=1)


LOSSLESS_KINDS = ("folder", "file")  # sources that wait for room instead of dropping (they can wait)


class CameraConfig(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    line: str = Field(pattern=NAME_PATTERN)
    source: SourceConfig = Field(discriminator="kind")
    sampling: SamplingConfig = SamplingConfig()  # default: every frame for file sources, max_fps 5 for cameras
    roi: Optional[Tuple[int, int, int, int]] = None  # x, y, w, h in pixels of the captured frame
    reopen: BackoffConfig = BackoffConfig()
    # frames waiting for inference; beyond it a live camera's oldest frame is dropped, a file source waits
    queue_depth: int = Field(4, ge=1, le=1024)
    labels: Dict[str, str] = {}  # carried in every frame's metadata (wire v2), filterable at central

    @model_validator(mode="before")
    @classmethod
    def _default_sampling(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sampling" not in data and isinstance(data.get("source"), dict) \
                and data["source"].get("kind") in LOSSLESS_KINDS:
            return dict(data, sampling={"mode": "all"})
        return data

    @field_validator("roi")
    @classmethod
    def _roi(cls, v: Optional[Tuple[int, int, int, int]]) -> Optional[Tuple[int, int, int, int]]:
        if v is not None and (v[0] < 0 or v[1] < 0 or v[2] <= 0 or v[3] <= 0):
            raise ValueError("roi is [x, y, w, h] with x, y >= 0 and w, h > 0")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: Dict[str, str]) -> Dict[str, str]:
        try:
            check_metadata({"labels": v})
        except WireError as exc:
            raise ValueError(str(exc)) from None
        return v

    @property
    def lossless(self) -> bool:
        """File sources wait for room in the queues and are never sampled by time."""
        return self.source.kind in LOSSLESS_KINDS


# -- model ----------------------------------------------------------------------------------------------------
class ModelConfig(StrictModel):
    dir: Path  # directory with manifest.json and the files it lists
    runner: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    # "auto": TensorRT, CUDA, then CPU execution providers, whichever this onnxruntime build has
    providers: List[str] = Field(default_factory=lambda: ["auto"])
    engine: Optional[Path] = None  # serialized TensorRT engine (runner: tensorrt)
    batch_size: int = Field(4, ge=1, le=256)  # frames per inference across cameras
    batch_timeout_ms: float = Field(10.0, ge=0)  # wait this long to fill a batch
    threads: int = Field(0, ge=0)  # ONNX Runtime intra-op threads; 0 = its default
    # the manifest's encoder_int8 files (exported with --cpu-int8; ONNX Runtime dynamic INT8, faster on CPUs with
    # VNNI): "auto" runs them when ONNX Runtime runs on the CPU alone, "on" always (an error without them), "off" never;
    # "auto" does not run 8-bit-weight files on an x86 CPU without VNNI, where they saturate (runtime.cpu)
    int8: Literal["auto", "on", "off"] = "auto"
    # ONNX Runtime's worker threads spin-wait between parallel sections: a bare encoder gains a little, but on a
    # small CPU the spinning takes the cycles of the capture, preprocessing and outbox threads (BENCHMARKS.md
    # edge_pipeline_spinning: the whole agent 1.28x faster with them asleep, the bare encoder 0.78x), so the agent
    # lets them sleep unless this is true
    ort_spinning: bool = False
    verify_files: bool = True  # check sha256 of every file the manifest lists at start


class MessagesConfig(StrictModel):
    token_dtype: Literal["int8", "int4", "fp16"] = "int8"
    # Wire format version: 2 (sections: footprints, metadata); 1 only while central is older than this edge.
    wire_version: Literal[1, 2] = 2
    # encoded frames waiting for the outbox writer; beyond it a live camera's oldest is dropped, file frames wait
    results_queue: int = Field(64, ge=1)
    message_expiry_s: Optional[int] = Field(None, ge=1)  # MQTT 5 message expiry interval


class MqttConfig(MqttClientConfig):
    """The broker connection (``client_id`` default: tokenline-edge-<device>) and how the link publishes."""

    # 2: device-bound topics, and a frame leaves the outbox only when central confirms its commit (resent when no
    # confirmation comes within confirm_timeout_s, doubling per resend up to confirm_timeout_max_s).
    # 1: the old topic layout, rows deleted on the broker's PUBACK: only for a central older than protocol 2.
    protocol: Literal[1, 2] = 2
    confirm_timeout_s: float = Field(30.0, gt=0)
    confirm_timeout_max_s: float = Field(600.0, gt=0)
    # protocol 2: a persistent session, so that central's confirmations (and commands) sent while the agent is
    # disconnected or restarting are queued by the broker for this long
    session_expiry_s: int = Field(86400, ge=0)
    inflight: int = Field(32, ge=1, le=65535)  # unacknowledged QoS 1 messages at once
    # A PUBACK with reason "No matching subscribers" (MQTT 5, 0x10) means nobody took the message (e.g. central
    # not yet re-subscribed after a broker restart): keep it in the outbox and send it again after a pause.
    require_subscriber: bool = True
    no_subscriber_retry_s: float = Field(1.0, gt=0)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    # A row that was the only one in flight each time the broker closed an established connection, this many
    # times in a row, is moved to the outbox's rejected table (e.g. over the broker's message size limit).
    reject_after_drops: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _confirm_timeouts(self) -> "MqttConfig":
        if self.confirm_timeout_max_s < self.confirm_timeout_s:
            raise ValueError("confirm_timeout_max_s must be >= confirm_timeout_s")
        return self


class OutboxConfig(StrictModel):
    path: Path = Path("/var/lib/tokenline-edge/outbox.sqlite")
    max_bytes: int = Field(512 * 1024 * 1024, ge=1024)  # payload bytes kept; oldest evicted beyond
    max_messages: int = Field(1_000_000, ge=1)
    synchronous: Literal["FULL", "NORMAL"] = "FULL"  # FULL: durable on power loss; NORMAL: on process crash


class UploadConfig(StrictModel):
    policy: Literal["all", "every_nth", "none", "on_request"] = "none"
    every_nth: int = Field(10, ge=1)
    url: Optional[str] = Field(None, pattern=r"^https?://")  # central's base URL, e.g. http://central:8080
    token: Optional[str] = None
    token_file: Optional[Path] = None
    ca_file: Optional[Path] = None
    timeout_s: float = Field(10.0, gt=0)
    retry_min_s: float = Field(1.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _needs_url(self) -> "UploadConfig":
        if self.policy != "none" and self.url is None:
            raise ValueError(f"policy {self.policy!r} needs url (central's base URL); use policy: none otherwise")
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        return self


class OriginalsConfig(StrictModel):
    enabled: bool = True
    dir: Path = Path("/var/lib/tokenline-edge/originals")
    jpeg_quality: int = Field(90, ge=1, le=100)
    max_age_s: float = Field(7 * 86400, gt=0)
    max_bytes: int = Field(10 * 1024**3, ge=1024)
    upload: UploadConfig = UploadConfig()


class AnomalyConfig(StrictModel):
    """Local anomaly scoring against banks exported from central (``tokenline-central reference-set export``)."""

    enabled: bool = False
    dir: Optional[Path] = None  # banks as <dir>/<site>/<line>/<camera>.npz; default <model.dir>/anomaly
    # publish each flagged frame on its camera's alert topic (retained, QoS 1; protocol 2 only: v1 has no alert topic)
    alerts: bool = True


class HealthConfig(StrictModel):
    http_host: str = "127.0.0.1"
    http_port: Optional[int] = Field(8765, ge=0, le=65535)  # None disables; 0 picks a free port
    file: Optional[Path] = None  # JSON written every stats interval
    watchdog: bool = True  # sd_notify WATCHDOG=1 when $NOTIFY_SOCKET / $WATCHDOG_USEC are set
    # status "degraded" while a frame has waited longer than this for central's confirmation (protocol 2)
    max_unconfirmed_age_s: float = Field(300.0, gt=0)
    drop_window_s: float = Field(60.0, gt=0)  # a dropped frame keeps /health degraded this long


class AgentConfig(StrictModel):
    device: str = Field(pattern=NAME_PATTERN)
    site: str = Field(pattern=NAME_PATTERN)
    model: ModelConfig
    cameras: List[CameraConfig] = Field(min_length=1)
    messages: MessagesConfig = MessagesConfig()
    mqtt: MqttConfig = MqttConfig()
    outbox: OutboxConfig = OutboxConfig()
    originals: OriginalsConfig = OriginalsConfig()
    anomaly: AnomalyConfig = AnomalyConfig()
    health: HealthConfig = HealthConfig()
    stats_interval_s: float = Field(10.0, gt=0)
    shutdown_timeout_s: float = Field(10.0, gt=0)  # SIGTERM: time to finish in-flight work and flush
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _unique_cameras(self) -> "AgentConfig":
        names = [c.name for c in self.cameras]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"camera names must be unique, repeated: {dup}")
        return self

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"tokenline-edge-{self.device}"


# pydantic puts the discriminated-union tag after "source" in error locations; messages leave it out
_SOURCE_TAGS = {"source": {"usb", "url", "gstreamer", "file", "folder", "synthetic"}}


def parse_config(data: Any, where: str = "<config>") -> AgentConfig:
    """Validate a loaded mapping; ConfigError lists ``key: problem`` per error."""
    return validate_config(AgentConfig, data, where, tags=_SOURCE_TAGS)


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate a YAML configuration file. Relative paths inside stay as written."""
    return load_config_file(AgentConfig, path, tags=_SOURCE_TAGS)
