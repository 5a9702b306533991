"""What a transport does: one call of the public API each, no retries (the client retries).

Two implement it: `HttpTransport` (the HTTP facade and its SSE stream) and `GrpcTransport`
(ImageService and CostService). Both raise the SDK's exceptions, never httpx's or grpc's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from imagegen.types import CacheHit, Estimate, Event, Job, Model, Options, Spec

USER_AGENT = "imagegen-python/0.1.0"


@dataclass(frozen=True)
class PresignedUpload:
    """How to send an upload's bytes: PUT them to `upload_url` with `headers` (the local
    store), or POST a multipart form of `fields` then `file` (S3). No API key on either."""

    key: str
    method: str
    upload_url: str
    headers: dict[str, str] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    max_bytes: int = 0


class Transport(Protocol):
    async def create(self, spec: Spec, options: Options, idempotency_key: str) -> Job: ...

    async def get(self, job_id: str) -> Job: ...

    def watch(self, job_id: str, after: str) -> AsyncIterator[Event]:
        """One connection's events after `after` ('' for the start); raises Unavailable when
        the connection breaks, ends after the Final event (or at once when the job ended
        before `after`)."""
        ...

    async def cancel(self, job_id: str) -> Job: ...

    async def estimate(self, spec: Spec) -> Estimate: ...

    async def lookup(self, spec: Spec, seed_agnostic: bool) -> CacheHit | None: ...

    async def models(self) -> list[Model]: ...

    async def presign(self, content_type: str, sha256: str, size: int) -> PresignedUpload: ...

    async def aclose(self) -> None: ...
