"""A cached result, and its protobuf form (shared by the cache service and its clients)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from imagegen.v1 import cache_service_pb2

from services.common.convert import artifact_from_pb, artifact_to_pb
from services.jobs.records import ArtifactRecord, encode_artifact


@dataclass
class CacheEntry:
    key: str
    seedless_key: str
    job_id: str
    seed: int
    artifacts: list[ArtifactRecord]
    created_at: datetime
    expires_at: datetime
    hit_count: int = 0

    def artifacts_json(self) -> list[dict[str, Any]]:
        return [encode_artifact(a) for a in self.artifacts]


def entry_to_pb(
    entry: CacheEntry, url_for: Callable[[str], str] | None = None
) -> cache_service_pb2.CacheEntry:
    message = cache_service_pb2.CacheEntry(
        key=entry.key,
        seedless_key=entry.seedless_key,
        job_id=entry.job_id,
        seed=entry.seed,
        artifacts=[artifact_to_pb(a, url_for) for a in entry.artifacts],
        hit_count=entry.hit_count,
    )
    message.create_time.FromDatetime(entry.created_at)
    message.expire_time.FromDatetime(entry.expires_at)
    return message


def entry_from_pb(message: cache_service_pb2.CacheEntry) -> CacheEntry:
    return CacheEntry(
        key=message.key,
        seedless_key=message.seedless_key,
        job_id=message.job_id,
        seed=message.seed,
        artifacts=[artifact_from_pb(a, message.job_id) for a in message.artifacts],
        created_at=message.create_time.ToDatetime(),
        expires_at=message.expire_time.ToDatetime(),
        hit_count=message.hit_count,
    )
