"""Starts the gateway: the gRPC ImageService and CostService, and the HTTP facade beside them,
in one process sharing one JobService; with them the webhook dispatcher and the periodic
retention cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Iterator

import uvicorn
from imagegen.v1 import (
    cost_service_pb2,
    cost_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
)

from services.cache.client import CacheClient
from services.common import db
from services.common.clients import open_channel
from services.common.convert import signed_job
from services.common.events import EventLog
from services.common.health import monitor, postgres_check
from services.common.models import load_registry
from services.common.objectstore import open_store
from services.common.queue import JobQueue
from services.common.redis import connect_redis
from services.common.server import (
    PortInUse,
    Service,
    Servicer,
    StartupRefused,
    check_free,
    check_secrets,
    prepare_observability,
    start_server,
)
from services.common.settings import GatewaySettings
from services.evaluator.client import EvaluatorClient
from services.gateway.auth import (
    Authenticator,
    AuthInterceptor,
    allowed_hosts,
    allowed_origins,
    method_scopes,
)
from services.gateway.grpc_api import CostServicer, ImageServicer
from services.gateway.http_api import build_app
from services.gateway.http_json import job_json
from services.gateway.hub import EventHub
from services.gateway.jobs import JobService
from services.gateway.retention import Retention, clean_forever
from services.gateway.uploads import Uploads
from services.gateway.webhooks import WebhookDispatcher
from services.jobs.lifecycle import JobLifecycle
from services.safety.policy import PolicyError, load_policy
from services.safety.prompts import PromptModerator
from services.tenants.keys import KeyStore
from services.tenants.limits import RateLimiter

IMAGE_SERVICE = image_service_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
COST_SERVICE = cost_service_pb2.DESCRIPTOR.services_by_name["CostService"].full_name


class _HttpServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the process's own signal handling stops this server


async def start(settings: GatewaySettings) -> Service:
    check_free(settings.listen_addr)
    prepare_observability("gateway", settings.metrics_host, settings.metrics_port)
    check_free(f"{settings.http_host}:{settings.http_port}")
    check_secrets(settings)
    try:
        moderator = PromptModerator(load_policy(settings.safety_policy).prompt)
    except PolicyError as error:
        raise StartupRefused(str(error)) from None
    pool = await db.connect(settings.database_url)
    redis = connect_redis(settings.redis_url)
    registry = load_registry(settings.model_registry, settings.model_dir)
    objects = open_store(settings)
    cache_channel = open_channel(
        settings.cache_addr, settings.rpc_timeout_seconds, settings.max_message_bytes
    )
    evaluator_channel = open_channel(
        settings.evaluator_addr, settings.rpc_timeout_seconds, settings.max_message_bytes
    )
    events = EventLog(redis, settings.event_ttl_seconds)
    hub = EventHub(redis, events)
    queue = JobQueue(redis)
    lifecycle = JobLifecycle(
        pool,
        redis,
        events,
        queue,
        idempotency_ttl_seconds=settings.idempotency_ttl_seconds,
    )
    keys = KeyStore(pool)
    jobs = JobService(
        lifecycle,
        events,
        hub,
        CacheClient(cache_channel),
        registry,
        objects,
        moderator,
        EvaluatorClient(evaluator_channel),
        keys,
        RateLimiter(redis),
        Uploads(objects, pool, settings.url_ttl_seconds),
        queue,
        url_ttl_seconds=settings.url_ttl_seconds,
        shared_cache=settings.shared_cache,
        webhook_allow_private=settings.webhook_allow_private,
    )
    authenticator = Authenticator(keys)
    image, cost = ImageServicer(jobs), CostServicer(jobs)
    scopes = method_scopes(
        [
            image_service_pb2.DESCRIPTOR.services_by_name["ImageService"],
            cost_service_pb2.DESCRIPTOR.services_by_name["CostService"],
        ],
        generate=("CreateJob", "CancelJob", "EvaluateImages"),
    )
    running = await start_server(
        "gateway",
        settings.listen_addr,
        [
            Servicer(
                IMAGE_SERVICE,
                lambda s: image_service_pb2_grpc.add_ImageServiceServicer_to_server(image, s),
            ),
            Servicer(
                COST_SERVICE,
                lambda s: cost_service_pb2_grpc.add_CostServiceServicer_to_server(cost, s),
            ),
        ],
        settings.max_message_bytes,
        metrics_host=settings.metrics_host,
        metrics_port=settings.metrics_port,
        interceptors=[AuthInterceptor(authenticator, scopes)],
    )

    async def render(job_id: str) -> dict[str, object]:
        """A job as the HTTP API shows it: a webhook's `data`."""
        return dict(job_json(signed_job(await lifecycle.snapshot(job_id), objects.download_url)))

    stop_background = asyncio.Event()
    dispatcher = WebhookDispatcher(
        pool,
        keys,
        render,
        allow_private=settings.webhook_allow_private,
        timeout_seconds=settings.webhook_timeout_seconds,
        max_attempts=settings.webhook_max_attempts,
    )
    retention = Retention.from_settings(settings)
    background = [
        asyncio.create_task(dispatcher.run(stop_background)),
        asyncio.create_task(
            clean_forever(
                lifecycle,
                pool,
                redis,
                objects,
                retention,
                settings.cleanup_interval_seconds,
                stop_background,
            )
        ),
    ]

    # Admission needs Postgres (the record); Redis only carries hints, so it is not a check.
    health = asyncio.create_task(monitor(running, {"postgres": postgres_check(pool)}))
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets that say so, and without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.http_host, settings.http_port))
    except OSError as error:
        sock.close()
        health.cancel()
        for task in background:
            task.cancel()
        await running.stop(0)
        raise PortInUse(
            f"cannot listen on {settings.http_host}:{settings.http_port} for HTTP: {error}"
        ) from None
    http = _HttpServer(
        uvicorn.Config(
            build_app(
                jobs,
                authenticator,
                allowed_hosts(settings.allowed_hosts, settings.public_base_url),
                allowed_origins(settings.allowed_origins, settings.public_base_url),
                pool,
            ),
            log_level="warning",
            lifespan="off",
            # Open SSE streams get the grace to end (then they are closed): whole seconds.
            timeout_graceful_shutdown=max(1, math.ceil(settings.grace_seconds)),
        )
    )
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    # uvicorn offers no "started" event to wait on
    while not http.started and not http_task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    if http_task.done():
        http_task.result()

    async def stop_http() -> None:
        http.should_exit = True
        await http_task

    async def stop_health() -> None:
        health.cancel()
        await asyncio.gather(health, return_exceptions=True)

    async def stop_background_tasks() -> None:
        stop_background.set()
        await asyncio.gather(*background, return_exceptions=True)

    return Service(
        running,
        [
            pool.close,
            redis.aclose,
            cache_channel.close,
            evaluator_channel.close,
            hub.close,
            stop_background_tasks,
            stop_health,
        ],
        http_port=sock.getsockname()[1],
        drains=[stop_http],
    )
