"""Central's configuration: one typed, validated document (YAML or JSON); every default is defined here."""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

from pydantic import Field, model_validator

from tokenline.config import ConfigError  # noqa: F401 - central's modules import it from here
from tokenline.config import NAME_PATTERN, MqttClientConfig, load_config_file, validate_config
from tokenline.documents import StrictModel
from tokenline.preprocess import DEFAULT_MAX_PIXELS


class DatabaseConfig(StrictModel):
    # SQLite (embedded default, WAL) or postgresql://... (pgvector required).
    url: str = "sqlite:///central.db"


class MqttConfig(MqttClientConfig):
    """The broker connection (keys shared with the edge: ``tokenline.config``) and the ingest subscription."""

    client_id: str = Field("central-ingest-1", min_length=1, max_length=128)  # stable: the session is persistent
    group: str = Field("central", pattern=NAME_PATTERN)  # shared-subscription group
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0)  # broker keeps queued messages this long offline


class IngestConfig(StrictModel):
    batch_max: int = Field(100, gt=0)  # keep <= the broker's max_inflight_messages (unacked QoS 1 limit)
    batch_linger_ms: int = Field(200, ge=0)  # longest a received message waits for its batch to commit
    max_message_bytes: int = Field(65536, gt=0)
    # raw bytes kept of a dead letter that no fix can cure (garbage); replayable ones (store.REPLAYABLE) are kept whole
    dead_letter_max_bytes: int = Field(1024, ge=0)
    allowed_token_dtypes: List[Literal["int8", "int4", "fp16"]] = ["int8", "int4", "fp16"]
    retry_backoff_max_s: float = Field(30.0, gt=0)  # database unavailable: retry the batch, never ack early
    metrics_host: str = "127.0.0.1"
    metrics_port: Optional[int] = Field(None, ge=0, lt=65536)  # this worker's /metrics (batches, lag); None = off
    # Also consume protocol v1 topics (edges not upgraded yet: no device in their token topics, so their identity
    # is not bound by the broker, and no commit acknowledgements). Switch off once every edge runs protocol 2.
    accept_protocol_v1: bool = True


class LineOverride(StrictModel):
    site: str
    line: str
    originals_days: Optional[float] = Field(None, ge=0)
    tokens_days: Optional[float] = Field(None, ge=0)


class RetentionConfig(StrictModel):
    originals_days: float = Field(30.0, ge=0)
    originals_max_bytes: Optional[int] = Field(None, gt=0)  # size cap, oldest deleted first
    tokens_days: float = Field(365.0, ge=0)  # tokens live longer than originals
    lines: List[LineOverride] = []
    dead_letters_days: float = Field(30.0, ge=0)  # dead letters older than this are deleted
    dead_letters_max_bytes: int = Field(256 * 1024 * 1024, gt=0)  # beyond (payload+detail+topic), oldest first
    sweep_interval_s: float = Field(600.0, gt=0)  # for `serve`'s background sweeper
    orphan_grace_s: float = Field(3600.0, ge=0)  # unreferenced blobs younger than this are left alone
    batch: int = Field(500, gt=0)

    @model_validator(mode="after")
    def _tokens_outlive_originals(self) -> "RetentionConfig":
        if self.tokens_days < self.originals_days:
            raise ValueError("tokens_days must be >= originals_days (tokens have the longer retention)")
        seen = set()
        for o in self.lines:
            if (o.site, o.line) in seen:
                raise ValueError(f"lines: duplicate override for site={o.site!r} line={o.line!r}")
            seen.add((o.site, o.line))
        return self


class OriginalsConfig(StrictModel):
    root: str = "originals"  # content-addressed filesystem store
    max_upload_bytes: int = Field(10 * 1024 * 1024, gt=0)


class SegmentsConfig(StrictModel):
    """PostgreSQL only: how the hot segment is sealed and how sealed segments are indexed (``central.segments``)."""

    seal_rows: int = Field(200_000, gt=0)  # seal the hot segment (searched exactly) once it holds this many frames
    seal_max_age_s: float = Field(3600.0, gt=0)  # ... or once its oldest frame arrived this long ago
    index: Literal["halfvec", "bit"] = "halfvec"  # HNSW on halfvec cosine, or on binary codes + exact re-rank
    hnsw_m: int = Field(16, ge=2, le=100)
    # 128, not pgvector's 64: bench_central at 1M frames read recall@10 0.938 and 0.970 at 64, 0.992 at 128
    # (BENCHMARKS central, docs/central.md), for about the same build time and no slower search
    hnsw_ef_construction: int = Field(128, ge=4, le=1000)
    maintenance_work_mem_max_mb: int = Field(2048, ge=64)  # the build's memory is sized to the segment, up to this
    build_workers: int = Field(2, ge=0, le=64)  # max_parallel_maintenance_workers of one index build
    check_interval_s: float = Field(2.0, gt=0)  # how often the maintainer looks at the hot segment
    maintainer: bool = True  # run it in serve/ingest (false for a serve on a read-only replica)


class SearchConfig(StrictModel):
    candidates: int = Field(200, gt=0)  # global-embedding candidates handed to the MaxSim re-rank
    rerank: bool = True
    # score = (1-w)*global cosine + w*MaxSim; None: the model's summary method's default (central.search:
    # 0.25 for the informativity summary, 0.5 for the slic one; NEU-DET measurements in BENCHMARKS.md)
    rerank_weight: Optional[float] = Field(None, ge=0, le=1)
    ef_search: int = Field(200, gt=0)  # pgvector hnsw.ef_search
    # PostgreSQL: the hot and sealing segments' embeddings of each model are mirrored in the serving process (float32,
    # 1.5 KiB per frame at D=384) and searched there exactly (central.hot) up to this many rows; beyond, or 0, the
    # scan runs in SQL
    hot_rows: int = Field(250_000, ge=0)
    max_results: int = Field(200, gt=0)  # the largest page (k) of one search request
    max_depth: int = Field(2000, gt=0)  # how deep paging goes into one search's ranking (cursor after cursor)
    binary_candidates: int = Field(1000, gt=0, le=1000)  # nearest by Hamming distance, then re-scored exactly
    exact_max_rows: int = Field(50_000, gt=0)  # SQLite: up to this many frames pass the filters, score them all
    # SQLite beyond exact_max_rows: score exactly the rows of the inverted lists nearest to the query, about this
    # many (central.search.VectorIndex); None: no lists, the binary_candidates nearest by Hamming distance instead
    ivf_rows: Optional[int] = Field(16_000, gt=0)
    providers: List[str] = ["CPUExecutionProvider"]  # ONNX Runtime execution providers, in order


class WebhookConfig(StrictModel):
    url: Optional[str] = Field(None, pattern=r"^https?://")  # POST each alert (JSON) here; None: no webhook
    timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0, le=10)  # further attempts after a failed one, with doubling backoff
    backoff_s: float = Field(1.0, gt=0)
    queue: int = Field(1000, ge=1)  # alerts waiting for the webhook; the oldest are dropped (counted) beyond


class AnomalyConfig(StrictModel):
    max_bank_tokens: int = Field(10_000, ge=16)  # larger pools are subsampled by a greedy coreset
    max_set_frames: int = Field(5000, ge=2)  # frames one reference set may hold
    nprobe: int = Field(8, ge=1)  # inverted lists searched per token in banks over tokenline.anomaly.EXHAUSTIVE_UP_TO
    min_token_size: float = Field(1.0, ge=0)  # tokens standing for fewer patches are not scored (empty ones)
    # distances of new banks (tokenline.anomaly): whitened by the set's own tokens (higher ELPV AUROC, BENCHMARKS.md
    # elpv_metric) or cosine; a set whose threshold was set by hand keeps its bank's metric on rebuilds
    metric: Literal["whitened", "cosine"] = "whitened"
    quantile: float = Field(0.99, gt=0, le=1)  # default threshold: this quantile of the leave-one-out scores
    # each ingest worker runs a scorer process beside it (central.anomaly.scoring): it scores the frames ingest
    # queued, off the ingest path. false: run `tokenline-central score` somewhere, or the queue only grows
    scorer: bool = True
    score_batch: int = Field(500, ge=1, le=10_000)  # queued frames the scorer takes per transaction
    score_poll_s: float = Field(0.2, gt=0, le=60)  # how often an idle scorer looks at the queue
    alerts: bool = True  # scorers publish alerts on tokenline/v2/<site>/<device>/alert/<line>/<camera>
    webhook: WebhookConfig = WebhookConfig()


class ApiConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8080, gt=0, lt=65536)
    # images decoded here (search uploads, thumbnails, uploaded originals' headers): larger ones are refused (400)
    # from their header, before decoding
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    image_workers: int = Field(2, ge=1, le=64)  # threads that decode and encode images, off the event loop
    image_queue: int = Field(8, ge=0)  # requests waiting for one of them; beyond, 503 "busy"
    # POST /v1/frames/{id}/original/request publishes the edge's request_original command with this MQTT client id
    # (default: mqtt.client_id + "-api"; never an ingest worker's, whose persistent session it would take over) and,
    # when command_username is set, as that broker user: the inventory's `apis` entry of
    # deploy/broker/gen_broker_config.py, bound to that client id and allowed to publish commands only
    # (docs/deployment.md). Unset: mqtt.username and its password.
    command_client_id: Optional[str] = Field(None, min_length=1, max_length=128)
    command_username: Optional[str] = Field(None, min_length=1)
    command_password: Optional[str] = None
    command_password_file: Optional[Path] = None
    original_request_timeout_s: float = Field(120.0, gt=0)  # after this, a request with no upload is "no_answer"

    @model_validator(mode="after")
    def _command_password(self) -> "ApiConfig":
        if self.command_password is not None and self.command_password_file is not None:
            raise ValueError("give command_password or command_password_file, not both")
        return self


class CentralConfig(StrictModel):
    database: DatabaseConfig = DatabaseConfig()
    mqtt: MqttConfig = MqttConfig()
    ingest: IngestConfig = IngestConfig()
    retention: RetentionConfig = RetentionConfig()
    originals: OriginalsConfig = OriginalsConfig()
    search: SearchConfig = SearchConfig()
    anomaly: AnomalyConfig = AnomalyConfig()
    segments: SegmentsConfig = SegmentsConfig()
    api: ApiConfig = ApiConfig()


def parse_config(data: object, where: str = "<config>") -> CentralConfig:
    return validate_config(CentralConfig, {} if data is None else data, where)


def load_config(path: Optional[str | Path]) -> CentralConfig:
    """Read YAML/JSON from ``path``; ``None`` gives all defaults."""
    if path is None:
        return CentralConfig()
    return load_config_file(CentralConfig, path)
