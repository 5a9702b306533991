"""The gRPC transport: ImageService and CostService over grpc.aio, the key as metadata.

The public gRPC API has no uploads, cache lookups or model list; for those this transport asks
the HTTP facade when it was given one (`fallback`), else raises Unsupported. Error details
(`google.rpc.BadRequest`, `imagegen.v1.PolicyViolation`, `RetryInfo`) become the SDK's
exceptions, with field paths renamed to the SDK's names (`spec.width_px` -> `width`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imagegen.errors import (
    FieldViolation,
    ImagegenError,
    InvalidArgument,
    Unsupported,
    error_for,
)
from imagegen.http_transport import HttpTransport, new_request_id
from imagegen.transport import USER_AGENT, PresignedUpload
from imagegen.types import (
    Artifact,
    CacheHit,
    CacheMode,
    ControlNet,
    Error,
    Estimate,
    Evaluation,
    Event,
    Final,
    GuidanceImage,
    Job,
    JobStatus,
    Model,
    Options,
    Preview,
    Priority,
    Progress,
    Scores,
    Spec,
    Status,
    Variant,
    Withheld,
)
from imagegen.v1 import (
    cost_service_pb2,
    cost_service_pb2_grpc,
    events_pb2,
    image_service_pb2,
    image_service_pb2_grpc,
    types_pb2,
)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# HTTP/2 keepalive: a ping after this long without a frame, and the connection is taken for dead
# (a peer or middlebox gone without closing it) when its answer takes longer than the timeout;
# calls on it fail UNAVAILABLE and event streams resume on a new one. The services accept a
# ping a second on a quiet connection (services/common/server.py).
KEEPALIVE_SECONDS = 20.0
KEEPALIVE_TIMEOUT_SECONDS = 10.0


def channel_options() -> list[tuple[str, Any]]:
    """The SDK's gRPC channel arguments: message sizes, user agent and keepalive."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.primary_user_agent", USER_AGENT),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_SECONDS * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_SECONDS * 1000)),
        # What grpc core (1.85) actually waits for a ping's ack (default: a minute).
        ("grpc.http2.ping_timeout_ms", int(KEEPALIVE_TIMEOUT_SECONDS * 1000)),
        # Keep pinging while a stream is quiet (a queued job), not just twice.
        ("grpc.http2.max_pings_without_data", 0),
    ]


STATUS = {
    types_pb2.JOB_STATUS_QUEUED: JobStatus.QUEUED,
    types_pb2.JOB_STATUS_RUNNING: JobStatus.RUNNING,
    types_pb2.JOB_STATUS_COMPLETED: JobStatus.COMPLETED,
    types_pb2.JOB_STATUS_FAILED: JobStatus.FAILED,
    types_pb2.JOB_STATUS_CANCELLED: JobStatus.CANCELLED,
}
CACHE = {
    CacheMode.USE: image_service_pb2.CACHE_MODE_USE,
    CacheMode.REFRESH: image_service_pb2.CACHE_MODE_REFRESH,
    CacheMode.OFF: image_service_pb2.CACHE_MODE_OFF,
}
PRIORITY = {
    Priority.HIGH: image_service_pb2.PRIORITY_HIGH,
    Priority.NORMAL: image_service_pb2.PRIORITY_NORMAL,
    Priority.LOW: image_service_pb2.PRIORITY_LOW,
}
ROLES = {
    "reference": types_pb2.GUIDANCE_ROLE_REFERENCE,
    "style": types_pb2.GUIDANCE_ROLE_STYLE,
    "texture": types_pb2.GUIDANCE_ROLE_TEXTURE,
}
ROLE_NAMES = {v: k for k, v in ROLES.items()}
# Protobuf field names whose SDK (and HTTP) name differs.
_SDK_NAMES = {
    "text": "prompt",
    "width_px": "width",
    "height_px": "height",
    "mask_key": "mask",
    "preview_every_steps": "preview_every",
}
_PATH_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(.*)$", re.DOTALL)


def sdk_path(path: str) -> str:
    """A request field path as the SDK names it: `spec.width_px` -> `width`,
    `spec.controlnet.mask_key` -> `controlnet.mask`; paths inside a FIBO prompt are kept."""
    if not path.startswith("spec."):
        return path
    parts = re.split(r"\.(?![^\[]*\])", path.removeprefix("spec."))
    renamed = []
    for i, part in enumerate(parts):
        match = _PATH_PART.match(part)
        if match and (i == 0 or parts[0].startswith("controlnet")):
            part = _SDK_NAMES.get(match[1], match[1]) + match[2]
        renamed.append(part)
    return ".".join(renamed)


def error_from_rpc(error: grpc.aio.AioRpcError, request_id: str) -> ImagegenError:
    code = error.code().name
    message = error.details() or code
    violations: list[FieldViolation] = []
    policy: tuple[str, str] | None = None
    retry_after: float | None = None
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a status message that disagrees with the call's code
        status = None
    for detail in status.details if status else []:
        bad_request = error_details_pb2.BadRequest()
        violation = types_pb2.PolicyViolation()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(bad_request):
            violations += [
                FieldViolation(sdk_path(v.field), v.description)
                for v in bad_request.field_violations
            ]
        elif detail.Unpack(violation):
            policy = (violation.category, sdk_path(violation.field))
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return error_for(
        code,
        message,
        request_id=request_id,
        violations=violations,
        policy=policy,
        retry_after=retry_after,
    )


class GrpcTransport:
    """The public API over gRPC at `target` (host:port)."""

    def __init__(
        self,
        target: str,
        api_key: str,
        timeout: float,
        secure: bool = False,
        fallback: HttpTransport | None = None,
    ) -> None:
        self.target = target
        self._key = api_key
        self._timeout = timeout
        self._secure = secure
        self._fallback = fallback
        self._channel: grpc.aio.Channel | None = None

    def _open(self) -> grpc.aio.Channel:
        """The channel, made on first use: grpc.aio binds it to the running event loop."""
        if self._channel is None:
            options = channel_options()
            if self._secure:
                credentials = grpc.ssl_channel_credentials()
                self._channel = grpc.aio.secure_channel(self.target, credentials, options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options)
        return self._channel

    def _images(self) -> image_service_pb2_grpc.ImageServiceAsyncStub:
        return image_service_pb2_grpc.ImageServiceStub(self._open())

    def _metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._key}"), ("x-request-id", request_id))

    async def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        request_id = new_request_id()
        try:
            return await method(request, metadata=self._metadata(request_id), timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, request_id) from None

    async def create(self, spec: Spec, options: Options, idempotency_key: str) -> Job:
        request = image_service_pb2.CreateJobRequest(
            spec=spec_pb(spec),
            idempotency_key=idempotency_key,
            seed_agnostic_cache=options.seed_agnostic_cache,
        )
        if options.cache is not None:
            request.cache = CACHE[options.cache]
        if options.priority is not None:
            request.priority = PRIORITY[options.priority]
        if options.max_cost_cents is not None:
            request.max_cost_cents = options.max_cost_cents
        if options.webhook is not None:
            request.webhook.url = options.webhook.url
            request.webhook.events.extend(options.webhook.events)
        response: image_service_pb2.CreateJobResponse = await self._unary(
            self._images().CreateJob, request
        )
        return job_from_pb(
            response.job, estimate_from_pb(response.estimate), response.idempotent_replay
        )

    async def get(self, job_id: str) -> Job:
        request = image_service_pb2.GetJobRequest(job_id=job_id)
        response: image_service_pb2.GetJobResponse = await self._unary(
            self._images().GetJob, request
        )
        return job_from_pb(response.job)

    async def watch(self, job_id: str, after: str) -> AsyncIterator[Event]:
        request_id = new_request_id()
        call = self._images().WatchJob(
            image_service_pb2.WatchJobRequest(job_id=job_id, after_event_id=after),
            metadata=self._metadata(request_id),
        )
        try:
            async for response in call:
                yield event_from_pb(response.event)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, request_id) from None
        finally:
            call.cancel()

    async def cancel(self, job_id: str) -> Job:
        request = image_service_pb2.CancelJobRequest(job_id=job_id)
        response: image_service_pb2.CancelJobResponse = await self._unary(
            self._images().CancelJob, request
        )
        return job_from_pb(response.job)

    async def estimate(self, spec: Spec) -> Estimate:
        stub: cost_service_pb2_grpc.CostServiceAsyncStub
        stub = cost_service_pb2_grpc.CostServiceStub(self._open())
        request = cost_service_pb2.EstimateCostRequest(spec=spec_pb(spec))
        response: cost_service_pb2.EstimateCostResponse = await self._unary(
            stub.EstimateCost, request
        )
        return estimate_from_pb(response.breakdown)

    def _http(self, what: str) -> HttpTransport:
        if self._fallback is None:
            raise Unsupported(
                f"the gRPC API has no {what}: give the client http_url (or IMAGEGEN_HTTP_URL)",
                code="UNIMPLEMENTED",
            )
        return self._fallback

    async def lookup(self, spec: Spec, seed_agnostic: bool) -> CacheHit | None:
        return await self._http("cache lookup").lookup(spec, seed_agnostic)

    async def models(self) -> list[Model]:
        return await self._http("model list").models()

    async def presign(self, content_type: str, sha256: str, size: int) -> PresignedUpload:
        return await self._http("uploads").presign(content_type, sha256, size)

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


# Protobuf -> SDK types


def spec_from_pb(m: types_pb2.GenerationSpec) -> Spec:
    fibo = json_format.MessageToDict(m.fibo_json) if m.HasField("fibo_json") else None
    controlnet = None
    if m.HasField("controlnet"):
        controlnet = ControlNet(m.controlnet.name, m.controlnet.weight, m.controlnet.mask_key)
    return Spec(
        prompt=m.text,
        fibo_json=fibo,
        negative_prompt=m.negative_prompt,
        model=m.model,
        seed=m.seed if m.HasField("seed") else None,
        width=m.width_px,
        height=m.height_px,
        num_variants=m.num_variants,
        steps=m.steps,
        guidance_scale=m.guidance_scale if m.HasField("guidance_scale") else None,
        guidance_images=tuple(
            GuidanceImage(g.key, ROLE_NAMES.get(g.role, "")) for g in m.guidance_images
        ),
        controlnet=controlnet,
        strength=m.strength if m.HasField("strength") else None,
        preview_every=m.preview_every_steps,
    )


def scores_from_pb(e: types_pb2.Evaluation) -> Scores | None:
    if not e.HasField("clip_score") and not e.clip_model:
        return None
    return Scores(
        clip_score=e.clip_score if e.HasField("clip_score") else None,
        lpips_diversity=e.lpips_diversity if e.HasField("lpips_diversity") else None,
        lpips_to_reference=e.lpips_to_reference if e.HasField("lpips_to_reference") else None,
        clip_model=e.clip_model,
        clip_calibrated=e.clip_calibrated,
        lpips_model=e.lpips_model,
        lpips_calibrated=e.lpips_calibrated,
    )


def variant_from_pb(a: types_pb2.Artifact, job_id: str) -> Variant:
    return Variant(
        job_id=job_id,
        index=a.variant_index,
        key=a.key,
        url=a.url,
        sha256=a.sha256,
        width=a.width_px,
        height=a.height_px,
        seed=a.seed,
        id=a.id,
        is_primary=a.is_primary,
        scores=scores_from_pb(a.evaluation) if a.HasField("evaluation") else None,
    )


def job_from_pb(
    j: types_pb2.Job, estimate: Estimate | None = None, idempotent_replay: bool = False
) -> Job:
    return Job(
        id=j.id,
        status=STATUS.get(j.status, JobStatus.UNKNOWN),
        stage=j.stage,
        progress_percent=j.progress_percent,
        spec=spec_from_pb(j.spec),
        cost_cents=j.cost_cents,
        cache_hit=j.cache_hit,
        variants=tuple(variant_from_pb(a, j.id) for a in j.artifacts),
        withheld=tuple(Withheld(w.variant_index, w.category) for w in j.withheld),
        error=j.error,
        retryable=j.retryable,
        attempts=j.attempts,
        engine_version=j.engine_version,
        evaluator_models=tuple(j.evaluator_models),
        notices=tuple(j.notices),
        created_at=j.create_time.ToDatetime(UTC) if j.HasField("create_time") else None,
        updated_at=j.update_time.ToDatetime(UTC) if j.HasField("update_time") else None,
        estimate=estimate,
        idempotent_replay=idempotent_replay,
    )


def estimate_from_pb(b: types_pb2.CostBreakdown) -> Estimate:
    return Estimate(
        total_cents=b.total_cents,
        base_cents=b.base_cents,
        steps_factor=b.steps_factor,
        controlnet_cents=b.controlnet_cents,
        guidance_cents=b.guidance_cents,
        model_multiplier=b.model_multiplier,
    )


def event_from_pb(e: events_pb2.JobEvent) -> Event:
    kind = e.WhichOneof("payload")
    if kind == "status":
        return Status(
            e.id, e.job_id, STATUS.get(e.status.status, JobStatus.UNKNOWN), e.status.stage
        )
    if kind == "progress":
        p = e.progress
        return Progress(e.id, e.job_id, p.variant_index, p.step, p.total_steps, p.percent, p.eta_ms)
    if kind == "preview":
        v = e.preview
        return Preview(e.id, e.job_id, v.variant_index, v.step, v.image_png)
    if kind == "artifact":
        a = e.artifact
        variant = variant_from_pb(a.artifact, e.job_id)
        return Artifact(e.id, e.job_id, variant, a.render_ms, a.encode_ms, a.store_ms)
    if kind == "evaluation":
        variants = tuple(variant_from_pb(a, e.job_id) for a in e.evaluation.artifacts)
        return Evaluation(e.id, e.job_id, variants, tuple(e.evaluation.models))
    if kind == "error":
        return Error(e.id, e.job_id, e.error.message, e.error.retrying)
    if kind == "final":
        return Final(e.id, e.job_id, job_from_pb(e.final.job))
    return Event(e.id, e.job_id)


# SDK types -> protobuf


def spec_pb(spec: Spec) -> types_pb2.GenerationSpec:
    m = types_pb2.GenerationSpec(
        negative_prompt=spec.negative_prompt,
        model=spec.model,
        width_px=spec.width,
        height_px=spec.height,
        num_variants=spec.num_variants,
        steps=spec.steps,
        preview_every_steps=spec.preview_every,
    )
    if spec.fibo_json is not None:
        if spec.prompt.strip():  # a oneof cannot carry both; the server's words over HTTP
            raise InvalidArgument(
                "invalid request: prompt: give exactly one of prompt or fibo_json",
                [FieldViolation("prompt", "give exactly one of prompt or fibo_json")],
            )
        fibo = struct_pb2.Struct()
        fibo.update(dict(spec.fibo_json))
        m.fibo_json.CopyFrom(fibo)
    else:
        m.text = spec.prompt
    if spec.seed is not None:
        m.seed = spec.seed
    if spec.guidance_scale is not None:
        m.guidance_scale = spec.guidance_scale
    if spec.strength is not None:
        m.strength = spec.strength
    for image in spec.guidance_images:
        role = ROLES.get(image.role, types_pb2.GUIDANCE_ROLE_UNSPECIFIED)
        m.guidance_images.add(key=image.key, role=role)
    if spec.controlnet is not None:
        c = spec.controlnet
        m.controlnet.CopyFrom(types_pb2.ControlNet(name=c.name, weight=c.weight, mask_key=c.mask))
    return m
