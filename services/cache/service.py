"""Starts the cache service: its stores, its servicer, its gRPC server, and health that says
NOT_SERVING while Postgres or Redis cannot be reached."""

from __future__ import annotations

import asyncio

from imagegen.v1 import cache_service_pb2, cache_service_pb2_grpc

from services.cache.grpc_api import CacheServicer
from services.cache.store import PromptCache
from services.common import db
from services.common.health import monitor, postgres_check, redis_check
from services.common.models import load_registry
from services.common.redis import connect_redis
from services.common.server import (
    Service,
    Servicer,
    check_free,
    check_secrets,
    prepare_observability,
    start_server,
)
from services.common.settings import CacheSettings

SERVICE_NAME = cache_service_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


async def start(settings: CacheSettings) -> Service:
    check_free(settings.listen_addr)
    prepare_observability("cache", settings.metrics_host, settings.metrics_port)
    check_secrets(settings)
    pool = await db.connect(settings.database_url)
    redis = connect_redis(settings.redis_url)
    registry = load_registry(settings.model_registry, settings.model_dir)
    cache = PromptCache(pool, redis, registry, settings.cache_ttl_seconds)
    servicer = CacheServicer(cache, registry)
    running = await start_server(
        "cache",
        settings.listen_addr,
        [
            Servicer(
                SERVICE_NAME,
                lambda s: cache_service_pb2_grpc.add_CacheServiceServicer_to_server(servicer, s),
            )
        ],
        settings.max_message_bytes,
        metrics_host=settings.metrics_host,
        metrics_port=settings.metrics_port,
    )
    health = asyncio.create_task(
        monitor(running, {"postgres": postgres_check(pool), "redis": redis_check(redis)})
    )

    async def stop_health() -> None:
        # Awaited, so that a ping it had in flight lets go of its connection before Redis closes.
        health.cancel()
        await asyncio.gather(health, return_exceptions=True)

    return Service(running, [pool.close, redis.aclose, stop_health])
