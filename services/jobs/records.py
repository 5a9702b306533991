"""The plain records of the jobs core and their stored encodings.

Statuses are one enum; a job, its artifacts and an attempt are dataclasses. What is stored has an
explicit, versioned encoding written out field by field here (`encode_spec`, `encode_artifact`),
never whatever `dataclasses.asdict` would make of the class today: a field added to a class
changes nothing stored until it is added here, with a new version where old rows need it.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.common.errors import InvalidArgument
from services.common.spec import ControlNet, GuidanceImage, Spec

SPEC_ENCODING = 1
ARTIFACT_ENCODING = 1


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class CacheMode(enum.StrEnum):
    """How a job uses the prompt cache; stored with the job (the `cache_mode` column)."""

    USE = "use"  # answered from the cache when it can; what it renders is stored
    REFRESH = "refresh"  # not read; what it renders replaces the cached result
    OFF = "off"  # neither read nor written


class Priority(enum.StrEnum):
    """A job's lane within its tenant's share of the generators: a tenant's high jobs go before
    its normal ones, and those before its low ones; tenants are served fairly whatever the lane."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# What a webhook can be told of: the job's end, one event per way it can end.
WEBHOOK_EVENTS = ("job.completed", "job.failed", "job.cancelled")


@dataclass(frozen=True)
class Webhook:
    """Where a job's end is announced (empty url: nowhere), and for which events."""

    url: str = ""
    events: tuple[str, ...] = WEBHOOK_EVENTS


@dataclass
class ArtifactRecord:
    job_id: str
    variant_index: int
    key: str
    sha256: str
    width: int
    height: int
    seed: int
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    clip_score: float | None = None
    lpips_diversity: float | None = None
    lpips_to_reference: float | None = None
    nsfw: bool = False
    is_primary: bool = False
    # Which models scored it, and whether they had real (calibrated) weights.
    clip_model: str = ""
    clip_calibrated: bool = False
    lpips_model: str = ""
    lpips_calibrated: bool = False

    @property
    def scored(self) -> bool:
        return self.clip_score is not None


@dataclass(frozen=True)
class Withheld:
    """A variant the image safety check kept back (never stored), and the category why."""

    variant_index: int
    category: str


@dataclass
class JobRecord:
    id: str
    status: JobStatus
    spec: Spec
    cache_key: str
    cost_cents: int
    stage: str = ""
    progress_percent: float = 0.0
    cache_hit: bool = False
    cache_mode: CacheMode = CacheMode.USE
    error: str = ""
    retryable: bool = False
    attempts: int = 0
    engine_version: str = ""
    evaluator_models: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    withheld: list[Withheld] = field(default_factory=list)
    # Whose job it is (every read and change by a client is confined to its tenant), which key
    # admitted it (its concurrency limit counts the job), its lane, the prompt cache namespace
    # it reads and writes ("" is the shared cache), and where its end is announced.
    tenant: str = ""
    api_key_id: str | None = None
    priority: Priority = Priority.NORMAL
    cache_namespace: str = ""
    webhook: Webhook = field(default_factory=Webhook)
    # For the admin dashboard and tracing: the estimate it was admitted with (`cost_cents` is
    # what it is charged), what the prompt cache answered (hit_seed, hit_seedless, miss, off),
    # and the W3C traceparent of the request that admitted it.
    estimated_cents: int = 0
    cache_result: str = ""
    trace_parent: str = ""

    @property
    def finished(self) -> bool:
        return self.status.terminal


@dataclass(frozen=True)
class Attempt:
    """One worker's hold on a running job: `number` is the fencing token every write of that
    worker is guarded by, so a worker that lost its lease can no longer change the job."""

    job_id: str
    number: int
    job: JobRecord


def parse_job_id(job_id: str, field: str = "job_id") -> uuid.UUID:
    """Job ids are canonical UUIDs (lowercase, hyphenated); any other spelling is refused."""
    try:
        parsed = uuid.UUID(job_id)
    except (ValueError, TypeError, AttributeError):
        parsed = None
    if parsed is None or str(parsed) != job_id:
        raise InvalidArgument.one(field, "not a job id (a lowercase hyphenated UUID)")
    return parsed


def encode_spec(spec: Spec) -> dict[str, Any]:
    """The stored form of a spec (version SPEC_ENCODING). `notices` is written only when there
    are some, `strength` and `preview_every` only when set: older rows lack them and read as
    none, so they need no new version, and a spec without them encodes as it always did
    (idempotency digests hash this form)."""
    notices = {"notices": list(spec.notices)} if spec.notices else {}
    strength = {"strength": spec.strength} if spec.strength is not None else {}
    preview = {"preview_every": spec.preview_every} if spec.preview_every else {}
    return {
        "v": SPEC_ENCODING,
        "prompt": spec.prompt,
        "fibo_json": spec.fibo_json,
        "negative_prompt": spec.negative_prompt,
        "model": spec.model,
        "seed": spec.seed,
        "width": spec.width,
        "height": spec.height,
        "num_variants": spec.num_variants,
        "steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "guidance_images": [{"key": g.key, "role": g.role} for g in spec.guidance_images],
        "controlnet": (
            None
            if spec.controlnet is None
            else {
                "name": spec.controlnet.name,
                "weight": spec.controlnet.weight,
                "mask_key": spec.controlnet.mask_key,
            }
        ),
        **notices,
        **strength,
        **preview,
    }


def decode_spec(data: dict[str, Any]) -> Spec:
    """A stored spec; rows written before the encoding was versioned have no `v` and the same
    fields."""
    version = data.get("v", 1)
    if version != SPEC_ENCODING:
        raise ValueError(f"unknown spec encoding {version}")
    controlnet = data.get("controlnet")
    return Spec(
        prompt=data["prompt"],
        fibo_json=data.get("fibo_json"),
        negative_prompt=data.get("negative_prompt", ""),
        model=data["model"],
        seed=data.get("seed"),
        width=data["width"],
        height=data["height"],
        num_variants=data["num_variants"],
        steps=data["steps"],
        guidance_scale=data.get("guidance_scale"),
        guidance_images=tuple(
            GuidanceImage(key=g["key"], role=g["role"]) for g in data.get("guidance_images", ())
        ),
        controlnet=(
            None
            if not controlnet
            else ControlNet(
                name=controlnet["name"],
                weight=controlnet["weight"],
                mask_key=controlnet.get("mask_key", ""),
            )
        ),
        notices=tuple(data.get("notices", ())),
        strength=data.get("strength"),
        preview_every=data.get("preview_every", 0),
    )


def encode_artifact(a: ArtifactRecord) -> dict[str, Any]:
    """The stored form of an artifact inside another record (the cache's rows)."""
    return {
        "v": ARTIFACT_ENCODING,
        "id": a.id,
        "job_id": a.job_id,
        "variant_index": a.variant_index,
        "key": a.key,
        "sha256": a.sha256,
        "width": a.width,
        "height": a.height,
        "seed": a.seed,
        "clip_score": a.clip_score,
        "lpips_diversity": a.lpips_diversity,
        "lpips_to_reference": a.lpips_to_reference,
        "nsfw": a.nsfw,
        "is_primary": a.is_primary,
        "clip_model": a.clip_model,
        "clip_calibrated": a.clip_calibrated,
        "lpips_model": a.lpips_model,
        "lpips_calibrated": a.lpips_calibrated,
    }


def decode_artifact(data: dict[str, Any]) -> ArtifactRecord:
    version = data.get("v", 1)
    if version != ARTIFACT_ENCODING:
        raise ValueError(f"unknown artifact encoding {version}")
    return ArtifactRecord(
        id=data["id"],
        job_id=data["job_id"],
        variant_index=data["variant_index"],
        key=data["key"],
        sha256=data["sha256"],
        width=data["width"],
        height=data["height"],
        seed=data["seed"],
        clip_score=data.get("clip_score"),
        lpips_diversity=data.get("lpips_diversity"),
        lpips_to_reference=data.get("lpips_to_reference"),
        nsfw=data.get("nsfw", False),
        is_primary=data.get("is_primary", False),
        clip_model=data.get("clip_model", ""),
        clip_calibrated=data.get("clip_calibrated", False),
        lpips_model=data.get("lpips_model", ""),
        lpips_calibrated=data.get("lpips_calibrated", False),
    )
