"""The cache as other services see it: domain objects in, domain objects out."""

from __future__ import annotations

import grpc
from imagegen.v1 import cache_service_pb2 as pb
from imagegen.v1 import cache_service_pb2_grpc

from services.cache.entry import CacheEntry, entry_from_pb
from services.common.convert import artifact_to_pb, spec_to_pb
from services.common.errors import from_rpc_error
from services.common.spec import Spec
from services.jobs.records import ArtifactRecord


class CacheClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = cache_service_pb2_grpc.CacheServiceStub(channel)

    async def lookup(
        self, spec: Spec, seed_agnostic: bool, namespace: str = ""
    ) -> CacheEntry | None:
        """The live entry for `spec` in `namespace` (a tenant's cache; "" the shared one)."""
        try:
            response = await self._stub.Lookup(
                pb.LookupRequest(
                    spec=spec_to_pb(spec), seed_agnostic=seed_agnostic, namespace=namespace
                )
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return entry_from_pb(response.entry) if response.hit else None

    async def store(
        self, spec: Spec, job_id: str, artifacts: list[ArtifactRecord], namespace: str = ""
    ) -> None:
        request = pb.StoreRequest(
            spec=spec_to_pb(spec),
            job_id=job_id,
            artifacts=[artifact_to_pb(a) for a in artifacts],
            namespace=namespace,
        )
        try:
            await self._stub.Store(request)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
