"""The HTTP transport: the gateway's JSON API and its SSE event stream, over httpx.

Also the one reader of HTTP error answers (`error_from_response`), which downloads and uploads
use too: the gateway's JSON error body, an S3 XML error, or a bare status from a proxy.
"""

from __future__ import annotations

import base64
import email.utils
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from imagegen.errors import FieldViolation, ImagegenError, Unavailable, error_for
from imagegen.transport import USER_AGENT, PresignedUpload
from imagegen.types import (
    Artifact,
    CacheHit,
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
    Progress,
    Scores,
    Spec,
    Status,
    Variant,
    Withheld,
)

# What a status means when the body does not say (a proxy's page, S3's XML).
_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ALREADY_EXISTS",
    413: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}
_S3_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_FRACTION = re.compile(r"(\.\d{6})\d+")

# How long an event stream may stay silent before it is taken for dead (6 keep-alives).
STREAM_SILENCE_SECONDS = 30.0


def new_request_id() -> str:
    return uuid.uuid4().hex


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (a number of seconds or an HTTP date)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_response(response: httpx.Response, request_id: str = "") -> ImagegenError:
    """The exception for an HTTP answer that is not a success (its body must have been read)."""
    status = response.status_code
    request_id = response.headers.get("x-request-id", request_id)
    code = _CODES.get(status, "INTERNAL" if status >= 500 else "UNKNOWN")
    message = f"HTTP {status}"
    violations: list[FieldViolation] = []
    policy: tuple[str, str] | None = None
    body: Any = None
    try:
        body = response.json()
    except ValueError:
        if match := _S3_MESSAGE.search(response.text):
            message = f"HTTP {status}: {match[1]}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
        request_id = str(error.get("request_id") or request_id)
        violations = [
            FieldViolation(str(v.get("field", "")), str(v.get("description", "")))
            for v in error.get("field_violations") or []
            if isinstance(v, dict)
        ]
        if isinstance(found := error.get("policy_violation"), dict):
            policy = (str(found.get("category", "")), str(found.get("field", "")))
    if status in (502, 504):  # a proxy's answer: the gateway is away
        code = "UNAVAILABLE"
    return error_for(
        code,
        message,
        request_id=request_id,
        http_status=status,
        violations=violations,
        policy=policy,
        retry_after=retry_after(response.headers.get("retry-after")),
    )


def network_error(what: str, error: httpx.TransportError, request_id: str) -> Unavailable:
    """A request that got no answer: refused, broken, or timed out."""
    detail = str(error) or type(error).__name__
    code = "DEADLINE_EXCEEDED" if isinstance(error, httpx.TimeoutException) else "UNAVAILABLE"
    return Unavailable(f"{what}: {detail}", code=code, request_id=request_id)


class HttpTransport:
    """The public API over the gateway's HTTP facade (`base_url`, e.g. http://127.0.0.1:8080)."""

    def __init__(
        self, base_url: str, api_key: str, http: httpx.AsyncClient, timeout: float
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self._http = http
        self._timeout = timeout

    def _headers(self, request_id: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self._key}",
            "X-Request-Id": request_id,
            "User-Agent": USER_AGENT,
            **(extra or {}),
        }
        return headers

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        request_id = new_request_id()
        try:
            response = await self._http.request(
                method,
                self.base_url + path,
                json=body,
                headers=self._headers(request_id, headers),
                timeout=self._timeout,
            )
        except httpx.TransportError as error:
            raise network_error(f"{method} {path}", error, request_id) from None
        if not response.is_success:
            raise error_from_response(response, request_id)
        try:
            return response.json()
        except ValueError:
            raise ImagegenError(
                f"{method} {path}: the answer is not JSON",
                code="INTERNAL",
                request_id=response.headers.get("x-request-id", request_id),
                http_status=response.status_code,
            ) from None

    async def create(self, spec: Spec, options: Options, idempotency_key: str) -> Job:
        body = {**spec_json(spec), **options_json(options)}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        data = await self._call("POST", "/api/generate/text-to-image", body, headers)
        return job_from_json(
            data,
            estimate=estimate_from_json(data),
            idempotent_replay=bool(data.get("idempotent_replay", False)),
        )

    async def get(self, job_id: str) -> Job:
        return job_from_json(await self._call("GET", f"/api/status/{quote(job_id, safe='')}"))

    async def watch(self, job_id: str, after: str) -> AsyncIterator[Event]:
        request_id = new_request_id()
        path = f"/api/status/stream/{quote(job_id, safe='')}"
        extra = {"Accept": "text/event-stream", **({"Last-Event-ID": after} if after else {})}
        # The server says something after every 5 s of quiet (an event, or a keep-alive comment
        # while the job waits): this long without a byte, the connection is dead (a peer or
        # middlebox gone without closing it), and the stream resumes on a new one.
        timeout = httpx.Timeout(self._timeout, read=STREAM_SILENCE_SECONDS)
        try:
            async with self._http.stream(
                "GET",
                self.base_url + path,
                headers=self._headers(request_id, extra),
                timeout=timeout,
            ) as response:
                if response.status_code == 204:  # resumed after the final event
                    return
                if response.status_code != 200:
                    await response.aread()
                    raise error_from_response(response, request_id)
                async for name, event_id, data in sse_messages(response.aiter_lines()):
                    yield event_from_json(name, event_id, job_id, json.loads(data))
        except httpx.TransportError as error:
            raise network_error(f"GET {path}", error, request_id) from None

    async def cancel(self, job_id: str) -> Job:
        return job_from_json(await self._call("POST", f"/api/jobs/{quote(job_id, safe='')}/cancel"))

    async def estimate(self, spec: Spec) -> Estimate:
        return estimate_from_json(await self._call("POST", "/api/cost/estimate", spec_json(spec)))

    async def lookup(self, spec: Spec, seed_agnostic: bool) -> CacheHit | None:
        body = {**spec_json(spec), "seed_agnostic": seed_agnostic}
        data = await self._call("POST", "/api/cache/lookup", body)
        if not data.get("hit"):
            return None
        job_id = str(data.get("run_id", ""))
        return CacheHit(
            job_id=job_id,
            seed=int(data.get("seed") or 0),
            hit_count=int(data.get("hit_count") or 0),
            expires_at=parse_time(data.get("expires_at")),
            variants=tuple(variant_from_json(a, job_id) for a in data.get("artifacts") or []),
        )

    async def models(self) -> list[Model]:
        data = await self._call("GET", "/api/models")
        return [model_from_json(m) for m in data.get("models") or []]

    async def presign(self, content_type: str, sha256: str, size: int) -> PresignedUpload:
        body = {"content_type": content_type, "sha256": sha256, "size_bytes": size}
        data = await self._call("POST", "/api/uploads/presign", body)
        return PresignedUpload(
            key=str(data["key"]),
            method=str(data.get("method") or "PUT").upper(),
            upload_url=str(data["upload_url"]),
            headers={str(k): str(v) for k, v in (data.get("headers") or {}).items()},
            fields={str(k): str(v) for k, v in (data.get("fields") or {}).items()},
            max_bytes=int(data.get("max_bytes") or 0),
        )

    async def aclose(self) -> None:
        """The httpx client belongs to the SDK client, which closes it."""


async def sse_messages(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str, str]]:
    """(event name, id, data) of each message of a text/event-stream (the WHATWG rules:
    comments skipped, data lines joined, one optional space after the colon)."""
    name, event_id = "", ""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield name or "message", event_id, "\n".join(data)
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
        elif key == "id" and "\0" not in value:
            event_id = value


# JSON -> SDK types


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:  # fromisoformat takes at most microseconds
        return datetime.fromisoformat(_FRACTION.sub(r"\1", value))
    except ValueError:
        return None


def status_of(value: Any) -> JobStatus:
    try:
        return JobStatus(str(value))
    except ValueError:
        return JobStatus.UNKNOWN


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def scores_from_json(a: Mapping[str, Any]) -> Scores | None:
    if a.get("semantic_score") is None and not a.get("clip_model"):
        return None
    return Scores(
        clip_score=_float(a.get("semantic_score")),
        lpips_diversity=_float(a.get("perceptual_score")),
        lpips_to_reference=_float(a.get("lpips_to_reference")),
        clip_model=str(a.get("clip_model") or ""),
        clip_calibrated=bool(a.get("clip_calibrated")),
        lpips_model=str(a.get("lpips_model") or ""),
        lpips_calibrated=bool(a.get("lpips_calibrated")),
    )


def variant_from_json(a: Mapping[str, Any], job_id: str) -> Variant:
    return Variant(
        job_id=job_id,
        index=int(a.get("variant_index") or 0),
        key=str(a.get("key") or ""),
        url=str(a.get("url") or ""),
        sha256=str(a.get("sha256") or ""),
        width=int(a.get("width") or 0),
        height=int(a.get("height") or 0),
        seed=int(a.get("seed") or 0),
        id=str(a.get("id") or ""),
        is_primary=bool(a.get("is_primary")),
        scores=scores_from_json(a),
    )


def job_from_json(
    d: Mapping[str, Any], estimate: Estimate | None = None, idempotent_replay: bool = False
) -> Job:
    job_id = str(d.get("run_id", ""))
    request = d.get("request") or {}
    spec = Spec(
        prompt=str(request.get("prompt") or ""),
        fibo_json=request.get("fibo_json"),
        negative_prompt=str(request.get("negative_prompt") or ""),
        model=str(request.get("model") or ""),
        seed=d.get("seed"),
        width=int(request.get("width") or 0),
        height=int(request.get("height") or 0),
        num_variants=int(request.get("num_variants") or 0),
        steps=int(request.get("steps") or 0),
        guidance_scale=_float(request.get("guidance_scale")),
        guidance_images=tuple(
            GuidanceImage(str(g.get("key") or ""), str(g.get("role") or ""))
            for g in request.get("guidance_images") or []
        ),
        controlnet=controlnet_from_json(request.get("controlnet")),
        strength=_float(request.get("strength")),
        preview_every=int(request.get("preview_every") or 0),
    )
    return Job(
        id=job_id,
        status=status_of(d.get("status")),
        stage=str(d.get("stage") or ""),
        progress_percent=float(d.get("progress_percent") or 0.0),
        spec=spec,
        cost_cents=int(d.get("cost_cents") or 0),
        cache_hit=bool(d.get("cached_hit")),
        variants=tuple(variant_from_json(a, job_id) for a in d.get("artifacts") or []),
        withheld=tuple(
            Withheld(int(w.get("variant_index") or 0), str(w.get("category") or ""))
            for w in d.get("withheld") or []
        ),
        error=str(d.get("error") or ""),
        retryable=bool(d.get("retryable", False)),
        attempts=int(d.get("attempts") or 0),
        engine_version=str(d.get("engine_version") or ""),
        evaluator_models=tuple(str(m) for m in d.get("evaluator_models") or []),
        notices=tuple(str(n) for n in d.get("notices") or []),
        created_at=parse_time(d.get("created_at")),
        updated_at=parse_time(d.get("updated_at")),
        estimate=estimate,
        idempotent_replay=idempotent_replay,
    )


def controlnet_from_json(d: Mapping[str, Any] | None) -> ControlNet | None:
    if not d:
        return None
    return ControlNet(str(d.get("name") or ""), float(d.get("weight") or 0.0), d.get("mask") or "")


def estimate_from_json(d: Mapping[str, Any]) -> Estimate:
    breakdown = d.get("breakdown") or {}
    return Estimate(
        total_cents=int(d.get("est_cost_cents") or 0),
        base_cents=float(breakdown.get("base_cents") or 0.0),
        steps_factor=float(breakdown.get("steps_factor") or 0.0),
        controlnet_cents=float(breakdown.get("controlnet_cents") or 0.0),
        guidance_cents=float(breakdown.get("guidance_cents") or 0.0),
        model_multiplier=float(breakdown.get("model_multiplier") or 0.0),
    )


def model_from_json(m: Mapping[str, Any]) -> Model:
    return Model(
        id=str(m["id"]),
        family=str(m.get("family") or ""),
        version=str(m.get("version") or ""),
        is_default=bool(m.get("is_default")),
        default_steps=int(m.get("default_steps") or 0),
        default_width=int(m.get("default_width") or 0),
        default_height=int(m.get("default_height") or 0),
        default_guidance=float(m.get("default_guidance") or 0.0),
        min_size=int(m.get("min_size") or 0),
        max_size=int(m.get("max_size") or 0),
        size_multiple=int(m.get("size_multiple") or 0),
        max_steps=int(m.get("max_steps") or 0),
        max_variants=int(m.get("max_variants") or 0),
        price_multiplier=float(m.get("price_multiplier") or 0.0),
        guidance_roles=tuple(str(r) for r in m.get("guidance_roles") or []),
        controlnets=tuple(str(c) for c in m.get("controlnets") or []),
    )


def event_from_json(name: str, event_id: str, job_id: str, data: Mapping[str, Any]) -> Event:
    if name == "status":
        return Status(event_id, job_id, status_of(data.get("status")), str(data.get("stage", "")))
    if name == "progress":
        return Progress(
            event_id,
            job_id,
            variant=int(data.get("variant_index") or 0),
            step=int(data.get("step") or 0),
            total=int(data.get("total_steps") or 0),
            percent=float(data.get("percent") or 0.0),
            eta_ms=int(data.get("eta_ms") or 0),
        )
    if name == "preview":
        image = str(data.get("image") or "")
        png = base64.b64decode(image.partition(",")[2]) if image else b""
        return Preview(
            event_id, job_id, int(data.get("variant_index") or 0), int(data.get("step") or 0), png
        )
    if name == "artifact":
        return Artifact(
            event_id,
            job_id,
            variant_from_json(data, job_id),
            render_ms=float(data.get("render_ms") or 0.0),
            encode_ms=float(data.get("encode_ms") or 0.0),
            store_ms=float(data.get("store_ms") or 0.0),
        )
    if name == "evaluation":
        return Evaluation(
            event_id,
            job_id,
            tuple(variant_from_json(a, job_id) for a in data.get("artifacts") or []),
            tuple(str(m) for m in data.get("models") or []),
        )
    if name == "error":
        return Error(event_id, job_id, str(data.get("message") or ""), bool(data.get("retrying")))
    if name == "final":
        return Final(event_id, job_id, job_from_json(data))
    return Event(event_id, job_id)  # a kind this SDK does not know yet


# SDK types -> JSON


def spec_json(spec: Spec) -> dict[str, Any]:
    """The request fields of `spec`; what is left at its default is not sent."""
    body: dict[str, Any] = {}
    if spec.fibo_json is not None:
        body["fibo_json"] = dict(spec.fibo_json)
    if spec.prompt or spec.fibo_json is None:
        body["prompt"] = spec.prompt
    optional: dict[str, Any] = {
        "negative_prompt": spec.negative_prompt or None,
        "model": spec.model or None,
        "seed": spec.seed,
        "width": spec.width or None,
        "height": spec.height or None,
        "num_variants": spec.num_variants or None,
        "steps": spec.steps or None,
        "guidance_scale": spec.guidance_scale,
        "strength": spec.strength,
        "preview_every": spec.preview_every or None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if spec.guidance_images:
        body["guidance_images"] = [{"key": g.key, "role": g.role} for g in spec.guidance_images]
    if spec.controlnet is not None:
        body["controlnet"] = controlnet_json(spec.controlnet)
    return body


def controlnet_json(controlnet: ControlNet) -> dict[str, Any]:
    value: dict[str, Any] = {"name": controlnet.name, "weight": controlnet.weight}
    if controlnet.mask:
        value["mask"] = controlnet.mask
    return value


def options_json(options: Options) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if options.cache is not None:
        body["cache"] = options.cache.value
    if options.seed_agnostic_cache:
        body["seed_agnostic_cache"] = True
    if options.priority is not None:
        body["priority"] = options.priority.value
    if options.max_cost_cents is not None:
        body["max_cost_cents"] = options.max_cost_cents
    if options.webhook is not None:
        body["webhook_url"] = options.webhook.url
        if options.webhook.events:
            body["webhook_events"] = list(options.webhook.events)
    return body
