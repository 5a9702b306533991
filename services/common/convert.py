"""Conversions between the protobuf messages and the plain domain objects.

Servicers call these at the edge; domain code never sees a protobuf message except the job
event, which is itself the one event schema.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from google.protobuf import json_format, struct_pb2
from imagegen.v1 import events_pb2, types_pb2

from services.common.errors import FieldViolation, InvalidArgument, PolicyRefused
from services.common.spec import ControlNet, GuidanceImage, Spec
from services.jobs.records import ArtifactRecord, JobRecord, JobStatus

STATUS_TO_PB = {
    JobStatus.QUEUED: types_pb2.JOB_STATUS_QUEUED,
    JobStatus.RUNNING: types_pb2.JOB_STATUS_RUNNING,
    JobStatus.COMPLETED: types_pb2.JOB_STATUS_COMPLETED,
    JobStatus.FAILED: types_pb2.JOB_STATUS_FAILED,
    JobStatus.CANCELLED: types_pb2.JOB_STATUS_CANCELLED,
}
STATUS_FROM_PB = {v: k for k, v in STATUS_TO_PB.items()}
_ROLE_TO_PB = {
    "reference": types_pb2.GUIDANCE_ROLE_REFERENCE,
    "style": types_pb2.GUIDANCE_ROLE_STYLE,
    "texture": types_pb2.GUIDANCE_ROLE_TEXTURE,
}
ROLE_FROM_PB = {v: k for k, v in _ROLE_TO_PB.items()}
# Domain (and HTTP) field names whose protobuf name differs.
_PB_FIELD = {
    "prompt": "text",
    "width": "width_px",
    "height": "height_px",
    "mask": "mask_key",
    "preview_every": "preview_every_steps",
}
_SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(Spec))


def roles_to_pb(roles: Iterable[str]) -> list[types_pb2.GuidanceRole.ValueType]:
    """Guidance role names as the enum (unknown names are left out)."""
    return [_ROLE_TO_PB[role] for role in roles if role in _ROLE_TO_PB]


def spec_from_pb(message: types_pb2.GenerationSpec) -> Spec:
    fibo = None
    if message.HasField("fibo_json"):
        fibo = _struct(message.fibo_json)
    controlnet = None
    if message.HasField("controlnet"):
        c = message.controlnet
        controlnet = ControlNet(name=c.name, weight=round(c.weight, 6), mask_key=c.mask_key)
    return Spec(
        prompt=message.text,
        fibo_json=fibo,
        negative_prompt=message.negative_prompt,
        model=message.model,
        seed=message.seed if message.HasField("seed") else None,
        width=message.width_px,
        height=message.height_px,
        num_variants=message.num_variants,
        steps=message.steps,
        guidance_scale=(
            round(message.guidance_scale, 6) if message.HasField("guidance_scale") else None
        ),
        guidance_images=tuple(
            GuidanceImage(key=g.key, role=ROLE_FROM_PB.get(g.role, "unspecified"))
            for g in message.guidance_images
        ),
        controlnet=controlnet,
        strength=round(message.strength, 6) if message.HasField("strength") else None,
        preview_every=message.preview_every_steps,
    )


def _struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON values, as it came: a NaN or infinite number stays one, for
    `resolve` to name its path (json_format refuses them without saying where)."""
    return {key: _value(value) for key, value in struct.fields.items()}


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _struct(value.struct_value)
    if kind == "list_value":
        return [_value(v) for v in value.list_value.values]
    if kind in ("number_value", "string_value", "bool_value"):
        return getattr(value, kind)
    return None


def spec_to_pb(spec: Spec) -> types_pb2.GenerationSpec:
    message = types_pb2.GenerationSpec(
        negative_prompt=spec.negative_prompt,
        model=spec.model,
        width_px=spec.width,
        height_px=spec.height,
        num_variants=spec.num_variants,
        steps=spec.steps,
        guidance_images=[
            types_pb2.GuidanceImage(
                key=g.key, role=_ROLE_TO_PB.get(g.role, types_pb2.GUIDANCE_ROLE_UNSPECIFIED)
            )
            for g in spec.guidance_images
        ],
    )
    if spec.fibo_json is not None:
        fibo = struct_pb2.Struct()
        fibo.update(spec.fibo_json)
        message.fibo_json.CopyFrom(fibo)
    else:
        message.text = spec.prompt
    if spec.seed is not None:
        message.seed = spec.seed
    if spec.guidance_scale is not None:
        message.guidance_scale = spec.guidance_scale
    if spec.strength is not None:
        message.strength = spec.strength
    message.preview_every_steps = spec.preview_every
    if spec.controlnet is not None:
        message.controlnet.CopyFrom(
            types_pb2.ControlNet(
                name=spec.controlnet.name,
                weight=spec.controlnet.weight,
                mask_key=spec.controlnet.mask_key,
            )
        )
    return message


def _pb_path(field: str, prefix: str) -> str:
    if field.split(".", 1)[0].split("[", 1)[0] not in _SPEC_FIELDS:
        return field  # a field of the request itself (idempotency_key), not of its spec
    parts = [_PB_FIELD.get(p, p) for p in re.split(r"\.(?![^\[]*\])", field) if p]
    return ".".join([prefix, *parts]) if prefix else ".".join(parts)


def with_pb_fields(error: InvalidArgument, prefix: str = "spec") -> InvalidArgument:
    """The same violations named by their protobuf paths (`width` -> `spec.width_px`); fields
    that are not spec fields keep their names."""
    if isinstance(error, PolicyRefused):
        return PolicyRefused(error.category, _pb_path(error.field, prefix))
    return InvalidArgument(
        [FieldViolation(_pb_path(v.field, prefix), v.description) for v in error.violations]
    )


def artifact_to_pb(
    artifact: ArtifactRecord, url_for: Callable[[str], str] | None = None
) -> types_pb2.Artifact:
    """The artifact as a message; `url_for` signs a download URL (events and the cache carry
    none: URLs expire, so they are signed when handed to a client)."""
    return types_pb2.Artifact(
        id=artifact.id,
        key=artifact.key,
        url=url_for(artifact.key) if url_for else "",
        width_px=artifact.width,
        height_px=artifact.height,
        variant_index=artifact.variant_index,
        seed=artifact.seed,
        sha256=artifact.sha256,
        evaluation=evaluation_to_pb(artifact),
        is_primary=artifact.is_primary,
    )


class Scored(Protocol):
    """What an Evaluation message is made of (an artifact's record, an evaluator's answer)."""

    @property
    def clip_score(self) -> float | None: ...
    @property
    def lpips_diversity(self) -> float | None: ...
    @property
    def lpips_to_reference(self) -> float | None: ...
    @property
    def nsfw(self) -> bool: ...
    @property
    def clip_model(self) -> str: ...
    @property
    def clip_calibrated(self) -> bool: ...
    @property
    def lpips_model(self) -> str: ...
    @property
    def lpips_calibrated(self) -> bool: ...


class Model(Protocol):
    """A scoring model as the evaluator describes it."""

    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def calibrated(self) -> bool: ...


def scoring_model_to_pb(model: Model) -> types_pb2.ScoringModel:
    return types_pb2.ScoringModel(name=model.name, role=model.role, calibrated=model.calibrated)


def evaluation_to_pb(scores: Scored) -> types_pb2.Evaluation:
    evaluation = types_pb2.Evaluation(
        nsfw=scores.nsfw,
        clip_model=scores.clip_model,
        clip_calibrated=scores.clip_calibrated,
        lpips_model=scores.lpips_model,
        lpips_calibrated=scores.lpips_calibrated,
    )
    for name in ("clip_score", "lpips_diversity", "lpips_to_reference"):
        value = getattr(scores, name)
        if value is not None:
            setattr(evaluation, name, value)
    return evaluation


def artifact_from_pb(message: types_pb2.Artifact, job_id: str) -> ArtifactRecord:
    e = message.evaluation
    return ArtifactRecord(
        id=message.id,
        job_id=job_id,
        variant_index=message.variant_index,
        key=message.key,
        sha256=message.sha256,
        width=message.width_px,
        height=message.height_px,
        seed=message.seed,
        clip_score=e.clip_score if e.HasField("clip_score") else None,
        lpips_diversity=e.lpips_diversity if e.HasField("lpips_diversity") else None,
        lpips_to_reference=e.lpips_to_reference if e.HasField("lpips_to_reference") else None,
        nsfw=e.nsfw,
        is_primary=message.is_primary,
        clip_model=e.clip_model,
        clip_calibrated=e.clip_calibrated,
        lpips_model=e.lpips_model,
        lpips_calibrated=e.lpips_calibrated,
    )


def job_to_pb(job: JobRecord, url_for: Callable[[str], str] | None = None) -> types_pb2.Job:
    message = types_pb2.Job(
        id=job.id,
        status=STATUS_TO_PB[job.status],
        stage=job.stage,
        progress_percent=job.progress_percent,
        spec=spec_to_pb(job.spec),
        cost_cents=job.cost_cents,
        cache_hit=job.cache_hit,
        artifacts=[artifact_to_pb(a, url_for) for a in job.artifacts],
        error=job.error,
        attempts=job.attempts,
        engine_version=job.engine_version,
        retryable=job.retryable,
        evaluator_models=job.evaluator_models,
        notices=job.spec.notices,
        withheld=[
            types_pb2.WithheldVariant(variant_index=w.variant_index, category=w.category)
            for w in job.withheld
        ],
    )
    if job.created_at is not None:
        message.create_time.FromDatetime(job.created_at)
    if job.updated_at is not None:
        message.update_time.FromDatetime(job.updated_at)
    return message


def message_to_json(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


Signable = TypeVar("Signable", types_pb2.Job, events_pb2.JobEvent)


def with_urls(message: Signable, url_for: Callable[[str], str]) -> Signable:
    """Signs a fresh download URL into every artifact of a job or event, in place: what is
    stored carries keys only, since URLs expire."""
    artifacts: list[types_pb2.Artifact] = []
    if isinstance(message, types_pb2.Job):
        artifacts = list(message.artifacts)
    elif message.HasField("artifact"):
        artifacts = [message.artifact.artifact]
    elif message.HasField("evaluation"):
        artifacts = list(message.evaluation.artifacts)
    elif message.HasField("final"):
        artifacts = list(message.final.job.artifacts)
    for artifact in artifacts:
        artifact.url = url_for(artifact.key)
    return message


def signed_job(job: JobRecord | types_pb2.Job, url_for: Callable[[str], str]) -> types_pb2.Job:
    """The job as a client gets it: a message with fresh download URLs."""
    message = job if isinstance(job, types_pb2.Job) else job_to_pb(job)
    with_urls(message, url_for)
    return message
