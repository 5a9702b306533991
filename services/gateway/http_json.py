"""What the HTTP facade answers: every JSON response body as a TypedDict, and the functions that
render the domain into them.

mypy holds each function to its TypedDict, and /openapi.json describes each response with the
JSON Schema pydantic derives from the same TypedDict (services/gateway/openapi.py), so the
document and the wire cannot drift. Field names are the replaced system's, which the web page
and clients read.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal, NotRequired

from google.protobuf import json_format
from imagegen.v1 import events_pb2, types_pb2
from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict

from services.common.convert import ROLE_FROM_PB, STATUS_FROM_PB
from services.gateway.cost import Cost

_EXACT = ConfigDict(extra="forbid")
DateTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
Uri = Annotated[str, Field(json_schema_extra={"format": "uri-reference"})]
JobStatusName = Literal["queued", "running", "completed", "failed", "cancelled"]


@with_config(_EXACT)
class ArtifactJson(TypedDict):
    """A stored image of a job, with its scores once it was evaluated."""

    id: str
    url: Annotated[str, Field(description="a signed download URL that expires")]
    key: str
    sha256: str
    width: int
    height: int
    variant_index: int
    seed: int
    semantic_score: Annotated[float | None, Field(description="CLIP score, 0..100")]
    perceptual_score: Annotated[float | None, Field(description="mean LPIPS to the others")]
    lpips_to_reference: float | None
    nsfw: Annotated[bool, Field(description="always false: flagged images are withheld")]
    is_primary: bool
    clip_model: str
    clip_calibrated: bool
    lpips_model: str
    lpips_calibrated: bool


@with_config(_EXACT)
class ResolvedGuidanceImageJson(TypedDict):
    key: str
    role: Annotated[str, Field(description="reference, style or texture")]


@with_config(_EXACT)
class ResolvedControlNetJson(TypedDict):
    name: str
    weight: float
    mask: str | None


@with_config(_EXACT)
class ResolvedRequestJson(TypedDict):
    """The request as the job runs it: the model's defaults filled in."""

    prompt: str
    fibo_json: dict[str, Any] | None
    model: str
    width: int
    height: int
    steps: int
    num_variants: int
    guidance_scale: float
    strength: float | None
    negative_prompt: str
    guidance_images: list[ResolvedGuidanceImageJson]
    controlnet: ResolvedControlNetJson | None
    preview_every: int


@with_config(_EXACT)
class WithheldJson(TypedDict):
    variant_index: int
    category: str


@with_config(_EXACT)
class JobJson(TypedDict):
    """A job: GET /api/status/{run_id}, a cancel's answer, the SSE `final` event."""

    run_id: Annotated[str, Field(json_schema_extra={"format": "uuid"})]
    status: JobStatusName
    stage: str
    progress_percent: float
    seed: int
    cost_cents: Annotated[int, Field(description="charged: 0 until completed, 0 for a hit")]
    cached_hit: bool
    error: str
    retryable: Annotated[
        bool,
        Field(
            description="a failure that submitting the job again may not meet (a store or"
            " worker outage); false when the request itself cannot succeed"
        ),
    ]
    attempts: int
    engine_version: Annotated[str, Field(description="the code that renders the pixels")]
    evaluator_models: Annotated[list[str], Field(description="the models behind the scores")]
    notices: list[str]
    request: ResolvedRequestJson
    artifacts: list[ArtifactJson]
    withheld: list[WithheldJson]
    created_at: DateTime | None
    updated_at: DateTime | None


@with_config(_EXACT)
class BreakdownJson(TypedDict):
    base_cents: float
    steps_factor: float
    controlnet_cents: float
    guidance_cents: float
    model_multiplier: float


@with_config(_EXACT)
class EstimateJson(TypedDict):
    """est_cost_cents is (base_cents x steps_factor + controlnet_cents + guidance_cents) x
    model_multiplier, rounded up, at least 1."""

    est_cost_cents: int
    breakdown: BreakdownJson


@with_config(_EXACT)
class AdmissionJson(JobJson, EstimateJson):
    """A created (201) or replayed (200, same Idempotency-Key and body) job, with its price."""

    idempotent_replay: bool


@with_config(_EXACT)
class ArtifactEventJson(ArtifactJson):
    """SSE `artifact`: an image was stored."""

    render_ms: float
    encode_ms: float
    store_ms: float


@with_config(_EXACT)
class EvaluationEventJson(TypedDict):
    """SSE `evaluation`: the job's images were scored."""

    artifacts: list[ArtifactJson]
    models: list[str]
    evaluate_ms: float


@with_config(_EXACT)
class ProgressEventJson(TypedDict):
    """SSE `progress`: a denoising step of a variant."""

    variant_index: int
    step: int
    total_steps: int
    percent: float
    eta_ms: int


@with_config(_EXACT)
class PreviewEventJson(TypedDict):
    """SSE `preview`: the latents of a variant as a small PNG (data URL)."""

    variant_index: int
    step: int
    image: Annotated[str, Field(pattern=r"^data:image/png;base64,")]


@with_config(_EXACT)
class StatusEventJson(TypedDict):
    """SSE `status`: the job's status or stage changed."""

    status: JobStatusName | Literal[""]
    stage: str


@with_config(_EXACT)
class ErrorEventJson(TypedDict):
    """SSE `error`: an attempt failed; `retrying` when another one follows."""

    message: str
    retrying: bool


# SSE event name -> the JSON of its `data:` line.
EVENT_SCHEMAS: dict[str, type] = {
    "status": StatusEventJson,
    "progress": ProgressEventJson,
    "preview": PreviewEventJson,
    "artifact": ArtifactEventJson,
    "evaluation": EvaluationEventJson,
    "error": ErrorEventJson,
    "final": JobJson,
}
EventJson = (
    StatusEventJson
    | ProgressEventJson
    | PreviewEventJson
    | ArtifactEventJson
    | EvaluationEventJson
    | ErrorEventJson
    | JobJson
)


@with_config(_EXACT)
class JobListJson(TypedDict):
    jobs: list[JobJson]
    next_page_token: Annotated[str, Field(description="empty on the last page")]


@with_config(_EXACT)
class CacheMissJson(TypedDict):
    hit: Literal[False]


@with_config(_EXACT)
class CacheHitJson(TypedDict):
    hit: Literal[True]
    run_id: str
    seed: int
    hit_count: int
    expires_at: DateTime
    artifacts: list[ArtifactJson]


@with_config(_EXACT)
class ModelJson(TypedDict):
    """A served model: its defaults, its limits and what it can honour."""

    id: str
    family: str
    version: str
    default_guidance: float
    is_default: bool
    default_steps: int
    default_width: int
    default_height: int
    min_size: int
    max_size: int
    size_multiple: int
    max_steps: int
    max_variants: int
    price_multiplier: float
    guidance_roles: list[str]
    controlnets: list[str]


@with_config(_EXACT)
class ModelsJson(TypedDict):
    models: list[ModelJson]


@with_config(_EXACT)
class PresignedUploadJson(TypedDict):
    """For method PUT (local store) PUT the bytes to upload_url with `headers`; for POST (S3)
    send a multipart form of every entry of `fields`, then `file`."""

    key: str
    method: Literal["PUT", "POST"]
    upload_url: Annotated[str, Field(json_schema_extra={"format": "uri"})]
    headers: dict[str, str]
    fields: dict[str, str]
    max_bytes: int
    expires_at: Annotated[int, Field(description="unix seconds")]


@with_config(_EXACT)
class UploadedJson(TypedDict):
    key: str


@with_config(_EXACT)
class ScoresJson(TypedDict):
    semantic_score: float | None
    perceptual_score: float | None
    lpips_to_reference: float | None
    clip_model: str
    clip_calibrated: bool
    lpips_model: str
    lpips_calibrated: bool


@with_config(_EXACT)
class ScoringModelJson(TypedDict):
    name: str
    role: str
    calibrated: bool


@with_config(_EXACT)
class EvaluationJson(TypedDict):
    evaluations: list[ScoresJson]
    primary_index: int
    scoring_models: list[ScoringModelJson]


@with_config(_EXACT)
class SafetyCountJson(TypedDict):
    day: Annotated[str, Field(json_schema_extra={"format": "date"})]
    kind: Annotated[str, Field(description="prompt (refused) or image (withheld)")]
    category: str
    count: int


@with_config(_EXACT)
class SafetyJson(TypedDict):
    days: int
    counts: list[SafetyCountJson]


@with_config(_EXACT)
class QueueJson(TypedDict):
    backlog: Annotated[int, Field(description="jobs waiting plus jobs claimed and not done")]
    claimed: int
    waiting_by_tenant: dict[str, int]


@with_config(_EXACT)
class HealthJson(TypedDict):
    status: Literal["ok"]


@with_config(_EXACT)
class FieldViolationJson(TypedDict):
    field: Annotated[str, Field(description="the JSON path of the field, e.g. controlnet.weight")]
    description: str


@with_config(_EXACT)
class QuotaViolationJson(TypedDict):
    subject: Annotated[str, Field(description="key:<id>/rate, tenant:<name>/budget, ...")]


@with_config(_EXACT)
class PolicyViolationJson(TypedDict):
    category: str
    field: str


@with_config(_EXACT)
class ErrorDetailJson(TypedDict):
    code: Annotated[str, Field(description="the gRPC status name, e.g. INVALID_ARGUMENT")]
    message: str
    request_id: Annotated[str, Field(description="the response's X-Request-Id")]
    field_violations: NotRequired[
        Annotated[
            list[FieldViolationJson], Field(description="with INVALID_ARGUMENT: every bad field")
        ]
    ]
    quota_violation: NotRequired[QuotaViolationJson]
    policy_violation: NotRequired[
        Annotated[
            PolicyViolationJson,
            Field(description="a request the content policy refused: never the matched text"),
        ]
    ]


@with_config(_EXACT)
class ErrorJson(TypedDict):
    """Every error answer."""

    error: ErrorDetailJson


# Rendering


def artifact_json(a: types_pb2.Artifact) -> ArtifactJson:
    e = a.evaluation
    return {
        "id": a.id,
        "url": a.url,
        "key": a.key,
        "sha256": a.sha256,
        "width": a.width_px,
        "height": a.height_px,
        "variant_index": a.variant_index,
        "seed": a.seed,
        "semantic_score": e.clip_score if e.HasField("clip_score") else None,
        "perceptual_score": e.lpips_diversity if e.HasField("lpips_diversity") else None,
        "lpips_to_reference": e.lpips_to_reference if e.HasField("lpips_to_reference") else None,
        "nsfw": e.nsfw,
        "is_primary": a.is_primary,
        "clip_model": e.clip_model,
        "clip_calibrated": e.clip_calibrated,
        "lpips_model": e.lpips_model,
        "lpips_calibrated": e.lpips_calibrated,
    }


def job_json(job: types_pb2.Job) -> JobJson:
    return {
        "run_id": job.id,
        "status": STATUS_FROM_PB[job.status],  # type: ignore[typeddict-item]  # a StrEnum
        "stage": job.stage,
        "progress_percent": round(job.progress_percent, 2),
        "seed": job.spec.seed,
        "cost_cents": job.cost_cents,
        "cached_hit": job.cache_hit,
        "error": job.error,
        "retryable": job.retryable,
        "attempts": job.attempts,
        "engine_version": job.engine_version,
        "evaluator_models": list(job.evaluator_models),
        "notices": list(job.notices),
        "request": {
            "prompt": job.spec.text,
            "fibo_json": (
                json_format.MessageToDict(job.spec.fibo_json)
                if job.spec.HasField("fibo_json")
                else None
            ),
            "model": job.spec.model,
            "width": job.spec.width_px,
            "height": job.spec.height_px,
            "steps": job.spec.steps,
            "num_variants": job.spec.num_variants,
            "guidance_scale": round(job.spec.guidance_scale, 4),
            "strength": round(job.spec.strength, 4) if job.spec.HasField("strength") else None,
            "negative_prompt": job.spec.negative_prompt,
            "guidance_images": [
                {"key": g.key, "role": ROLE_FROM_PB.get(g.role, "unspecified")}
                for g in job.spec.guidance_images
            ],
            "controlnet": controlnet_json(job.spec),
            "preview_every": job.spec.preview_every_steps,
        },
        "artifacts": [artifact_json(a) for a in job.artifacts],
        "withheld": [
            {"variant_index": w.variant_index, "category": w.category} for w in job.withheld
        ],
        "created_at": job.create_time.ToJsonString() if job.HasField("create_time") else None,
        "updated_at": job.update_time.ToJsonString() if job.HasField("update_time") else None,
    }


def controlnet_json(spec: types_pb2.GenerationSpec) -> ResolvedControlNetJson | None:
    if not spec.HasField("controlnet"):
        return None
    c = spec.controlnet
    return {"name": c.name, "weight": round(c.weight, 4), "mask": c.mask_key or None}


def cost_json(cost: Cost) -> EstimateJson:
    return {
        "est_cost_cents": cost.total_cents,
        "breakdown": {
            "base_cents": cost.base_cents,
            "steps_factor": cost.steps_factor,
            "controlnet_cents": cost.controlnet_cents,
            "guidance_cents": cost.guidance_cents,
            "model_multiplier": cost.model_multiplier,
        },
    }


def event_json(event: events_pb2.JobEvent) -> tuple[str, EventJson]:
    """(SSE event name, data) of a job event."""
    kind = event.WhichOneof("payload")
    if kind == "final":
        return kind, job_json(event.final.job)
    if kind == "artifact":
        a = event.artifact
        return kind, {
            **artifact_json(a.artifact),
            "render_ms": a.render_ms,
            "encode_ms": a.encode_ms,
            "store_ms": a.store_ms,
        }
    if kind == "evaluation":
        return kind, {
            "artifacts": [artifact_json(a) for a in event.evaluation.artifacts],
            "models": list(event.evaluation.models),
            "evaluate_ms": event.evaluation.evaluate_ms,
        }
    if kind == "progress":
        p = event.progress
        return kind, {
            "variant_index": p.variant_index,
            "step": p.step,
            "total_steps": p.total_steps,
            "percent": round(p.percent, 2),
            "eta_ms": p.eta_ms,
        }
    if kind == "preview":
        v = event.preview
        return kind, {
            "variant_index": v.variant_index,
            "step": v.step,
            "image": "data:image/png;base64," + base64.b64encode(v.image_png).decode(),
        }
    if kind == "status":
        status = STATUS_FROM_PB.get(event.status.status, "")
        return kind, {"status": status, "stage": event.status.stage}  # type: ignore[typeddict-item]
    # An `error`: an attempt failed (a payload this facade does not know reads as one, too).
    return "error", {"message": event.error.message, "retrying": event.error.retrying}


# GET /api/admin/stats (rendered by services/gateway/admin.py)


@with_config(_EXACT)
class HistogramJson(TypedDict):
    """Samples in seconds: counts[i] holds those in [bounds_seconds[i-1], bounds_seconds[i])
    (from 0, and to infinity for the last)."""

    count: int
    sum_seconds: float
    p50: float | None
    p95: float | None
    p99: float | None
    counts: list[int]


@with_config(_EXACT)
class StatsTotalsJson(TypedDict):
    admitted: int
    completed: int
    rendered: int
    cache_hits: int
    cache_lookups: int
    hit_ratio: float | None
    failed: int
    failed_by_reason: dict[str, int]
    cancelled: int
    throughput_per_minute: float
    estimated_cents: int
    actual_cents: int
    queue_peak: int


@with_config(_EXACT)
class StatsJobsJson(TypedDict):
    admitted: list[int]
    rendered: list[int]
    cache_hits: list[int]
    failed: dict[str, list[int]]
    cancelled: list[int]
    throughput_per_minute: list[float]


@with_config(_EXACT)
class StatsCacheJson(TypedDict):
    hit_seed: list[int]
    hit_seedless: list[int]
    miss: list[int]
    off: list[int]
    hit_ratio: list[float | None]


@with_config(_EXACT)
class StatsQueueJson(TypedDict):
    depth_peak: list[int]
    depth_end: list[int]


@with_config(_EXACT)
class StatsCostJson(TypedDict):
    estimated_cents: list[int]
    actual_cents: list[int]


@with_config(_EXACT)
class StatsDurationsJson(TypedDict):
    bounds_seconds: list[float]
    end_to_end: HistogramJson
    end_to_end_all: HistogramJson
    stages: dict[str, HistogramJson]


@with_config(_EXACT)
class ModelUsageJson(TypedDict):
    model: str
    jobs: int
    images: int
    rendered: int
    cache_hits: int
    failed: int
    cancelled: int
    charged_cents: int


@with_config(_EXACT)
class CategoryCountJson(TypedDict):
    kind: str
    category: str
    count: int


@with_config(_EXACT)
class StatsRefusalsJson(TypedDict):
    from_day: Annotated[str, Field(json_schema_extra={"format": "date"})]
    to_day: Annotated[str, Field(json_schema_extra={"format": "date"})]
    by_category: list[CategoryCountJson]
    daily: list[SafetyCountJson]


StatsJson = TypedDict(
    "StatsJson",
    {
        "from": DateTime,
        "to": DateTime,
        "bucket_seconds": int,
        "buckets": list[DateTime],
        "totals": StatsTotalsJson,
        "jobs": StatsJobsJson,
        "cache": StatsCacheJson,
        "queue": StatsQueueJson,
        "cost": StatsCostJson,
        "durations": StatsDurationsJson,
        "models": list[ModelUsageJson],
        "refusals": StatsRefusalsJson,
    },
)
StatsJson.__pydantic_config__ = _EXACT  # type: ignore[attr-defined]
