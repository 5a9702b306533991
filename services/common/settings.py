"""Typed settings, read from the environment, with defaults that make the embedded mode work.

One base class holds what every service shares (where the stores and the other services are);
each service subclasses it with what only it needs.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parents[2]


class CommonSettings(BaseSettings):
    """What every service reads. Empty URLs mean "not configured" and fail loudly at start-up."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    data_dir: Path = Path(".data")
    log_level: str = "INFO"
    # One JSON object per line (with request, job and trace ids), or "text" for a terminal.
    log_format: Literal["json", "text"] = "json"
    # Set by `make run` (services.mesh) and the tests: the embedded default on one machine. Out
    # of it a service refuses to start with a placeholder URL signing key.
    embedded: bool = False

    database_url: str = ""
    redis_url: str = ""

    # Object store: S3/MinIO when s3_endpoint is set, else a local folder under data_dir.
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "imagegen"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    objects_dir: Path | None = None
    url_signing_key: str = ""
    url_ttl_seconds: int = 3600
    public_base_url: str = "http://127.0.0.1:8080"

    model_registry: Path = ROOT / "deploy" / "models" / "tiny.json"
    model_dir: Path = Path(".data/models")
    # The content policy: prompt moderation (gateway) and image safety (evaluator).
    safety_policy: Path = ROOT / "deploy" / "safety" / "policy.toml"

    cache_addr: str = "127.0.0.1:50052"
    generator_addr: str = "127.0.0.1:50053"
    evaluator_addr: str = "127.0.0.1:50054"
    rpc_timeout_seconds: float = 30.0
    # Prometheus metrics over HTTP (GET /metrics): 0 picks a free port (logged), -1 turns them
    # off. Deployments set a fixed one to scrape; loopback unless METRICS_HOST opens it.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=-1, le=65535)

    event_ttl_seconds: int = 24 * 3600  # how long a job's event stream outlives its last event
    # How long a reused Idempotency-Key returns its first job (and refuses another request).
    idempotency_ttl_seconds: int = 24 * 3600
    # Threads torch may use in this process (0: the cores divided among MODEL_PROCESSES).
    torch_threads: int = 0
    # Processes on this host that run models (each generator and evaluator): without a thread
    # count each would take every core and they would fight over them.
    model_processes: int = Field(default=2, ge=1)
    grace_seconds: float = 10.0
    max_message_bytes: int = 32 * 1024 * 1024

    def objects_root(self) -> Path:
        return self.objects_dir or self.data_dir / "objects"

    def check_secrets(self) -> None:
        """Raises ValueError naming the setting when, outside the embedded default, the URL
        signing key is a placeholder (CHANGE_ME and the like) or too short to be a secret."""
        if self.embedded:
            return
        key = self.url_signing_key.strip()
        if not key:
            return  # made once and kept in data_dir (signing_key)
        placeholder = key.lower().replace("-", "_") in {"change_me", "changeme", "secret", "x"}
        if placeholder or "change_me" in key.lower() or len(key) < 16:
            raise ValueError(
                "URL_SIGNING_KEY is a placeholder or shorter than 16 characters: set a random"
                " secret (e.g. `openssl rand -hex 32`)"
            )

    def signing_key(self) -> bytes:
        """The HMAC key for local-folder URLs: configured, or made once and kept in data_dir."""
        if self.url_signing_key:
            return self.url_signing_key.encode()
        path = self.data_dir / "url-signing.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_hex(32))
            tmp.replace(path)
        return path.read_text().strip().encode()


class GatewaySettings(CommonSettings):
    listen_addr: str = "127.0.0.1:50051"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Host headers the HTTP facade answers (DNS rebinding), comma-separated; the host of
    # PUBLIC_BASE_URL, localhost, 127.0.0.1 and [::1] always are. "*" allows any.
    allowed_hosts: str = ""
    # Origins allowed to make cross-site requests, comma-separated; a request from the page's
    # own origin (PUBLIC_BASE_URL, or the Host it was sent to) always is.
    allowed_origins: str = ""
    # One prompt cache for every tenant (a tenant can then learn what others generated).
    shared_cache: bool = False
    # Webhooks to private, loopback and link-local addresses (off: SSRF protection).
    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=8, ge=1)
    # Retention: what the periodic cleanup (and `python -m services.gateway cleanup`) removes.
    artifact_retention_days: float = Field(default=30.0, gt=0)
    upload_retention_days: float = Field(default=7.0, gt=0)
    dead_letter_retention_days: float = Field(default=14.0, gt=0)
    cleanup_interval_seconds: float = Field(default=3600.0, gt=0)


class CacheSettings(CommonSettings):
    listen_addr: str = "127.0.0.1:50052"
    cache_ttl_seconds: int = 30 * 24 * 3600


class GeneratorSettings(CommonSettings):
    listen_addr: str = "127.0.0.1:50053"
    device: str = "cpu"
    # Jobs in hand at once: the engine batches the variants of every job in hand.
    workers: int = Field(default=4, ge=0)
    # How long a batch that is not full waits for batch-mates.
    batch_window_ms: float = Field(default=5.0, ge=0)
    # Resident models' weights, in MiB (0: no limit); the least recently used are unloaded.
    model_memory_budget_mb: int = Field(default=0, ge=0)
    consumer_name: str = ""
    job_max_attempts: int = 3
    # A running job's lease: renewed by its worker every third of it; when it runs out (the
    # worker died or lost its stores) the reconciler queues the job again.
    lease_seconds: float = Field(default=30.0, gt=0)
    claim_idle_ms: int = 60_000
    reconcile_interval_seconds: float = Field(default=5.0, gt=0)
    # A queued job is checked for a lost queue entry once it has waited this long.
    requeue_after_seconds: float = 10.0


class EvaluatorSettings(CommonSettings):
    listen_addr: str = "127.0.0.1:50054"
    # CLIP, one of two ways. A folder in open_clip's hub layout (open_clip_config.json and its
    # weights; the tiny build by default): CLIP_DIR. Or an open_clip model config, a built-in
    # name ("ViT-B-32") or a JSON file, with a checkpoint file (.safetensors or .pt):
    # CLIP_MODEL and CLIP_CHECKPOINT.
    clip_dir: Path | None = None
    clip_model: str = ""
    clip_checkpoint: Path | None = None
    # torchvision AlexNet weights for LPIPS's backbone (without: seeded-random, uncalibrated).
    lpips_backbone: Path | None = None
    # Fixed batch shapes: every run of a network has this many rows, padded with zeros, so an
    # image's scores never depend on its batch-mates.
    clip_image_batch: int = Field(default=8, ge=1)
    clip_text_batch: int = Field(default=4, ge=1)
    lpips_batch: int = Field(default=8, ge=1)
    # How long a scoring round waits for concurrent calls to join it, and how many images it
    # takes at most (a call is never split; 1 scores one call at a time).
    scoring_window_ms: float = Field(default=5.0, ge=0)
    max_batch_images: int = Field(default=64, ge=1)
    # CLIP image embeddings kept by image SHA-256 (Screen then Evaluate encodes an image once).
    embedding_cache_size: int = Field(default=256, ge=0)

    def clip_path(self) -> Path:
        return self.clip_dir or self.model_dir / "tiny-clip"
