"""CacheService over gRPC: validate, convert, call PromptCache, convert back."""

from __future__ import annotations

from typing import Any

import grpc
from imagegen.v1 import cache_service_pb2 as pb
from imagegen.v1 import cache_service_pb2_grpc

from services.cache.entry import entry_to_pb
from services.cache.store import PromptCache
from services.common.convert import artifact_from_pb, spec_from_pb, with_pb_fields
from services.common.errors import InvalidArgument
from services.common.models import Registry
from services.common.spec import Spec, resolve

Context = grpc.aio.ServicerContext[Any, Any]


class CacheServicer(cache_service_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: PromptCache, registry: Registry) -> None:
        self._cache = cache
        self._registry = registry

    def _spec(self, request: pb.LookupRequest | pb.StoreRequest, seed_required: bool) -> Spec:
        try:
            return resolve(spec_from_pb(request.spec), self._registry, require_seed=seed_required)
        except InvalidArgument as error:
            raise with_pb_fields(error) from None

    async def Lookup(self, request: pb.LookupRequest, context: Context) -> pb.LookupResponse:
        spec = self._spec(request, seed_required=not request.seed_agnostic)
        key, entry = await self._cache.lookup(spec, request.seed_agnostic, request.namespace)
        if entry is None:
            return pb.LookupResponse(hit=False, key=key)
        return pb.LookupResponse(hit=True, key=key, entry=entry_to_pb(entry))

    async def Store(self, request: pb.StoreRequest, context: Context) -> pb.StoreResponse:
        spec = self._spec(request, seed_required=True)
        if not request.job_id:
            raise InvalidArgument.one("job_id", "must be set")
        if not request.artifacts:
            raise InvalidArgument.one("artifacts", "must not be empty")
        artifacts = [artifact_from_pb(a, request.job_id) for a in request.artifacts]
        entry = await self._cache.store(
            spec, request.job_id, artifacts, request.ttl_seconds, request.namespace
        )
        return pb.StoreResponse(entry=entry_to_pb(entry))

    async def Invalidate(
        self, request: pb.InvalidateRequest, context: Context
    ) -> pb.InvalidateResponse:
        target = request.WhichOneof("target")
        if target is None or (target == "all" and not request.all):
            raise InvalidArgument.one("target", "give a key or all=true")
        removed = await self._cache.invalidate(request.key if target == "key" else None)
        return pb.InvalidateResponse(removed=removed)

    async def Stats(self, request: pb.StatsRequest, context: Context) -> pb.StatsResponse:
        return pb.StatsResponse(**await self._cache.stats())
