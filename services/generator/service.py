"""Starts the generator: the engine (default model loaded before health says SERVING), the
GeneratorService, the supervised queue workers, the cancel listener and the reconciler. Health
is NOT_SERVING while Postgres or Redis cannot be reached or no worker is alive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from imagegen.v1 import generator_service_pb2, generator_service_pb2_grpc

from services.cache.client import CacheClient
from services.common import db, metrics
from services.common.clients import open_channel
from services.common.events import EventLog
from services.common.health import monitor, postgres_check, redis_check
from services.common.models import load_registry
from services.common.objectstore import open_store
from services.common.queue import JobQueue
from services.common.redis import connect_redis
from services.common.server import (
    Service,
    Servicer,
    check_free,
    check_secrets,
    prepare_observability,
    start_server,
)
from services.common.settings import GeneratorSettings
from services.common.torch_compat import prepare_torch, set_torch_threads
from services.jobs.cancels import CancelListener
from services.jobs.lifecycle import JobLifecycle
from services.jobs.reconciler import reconcile_forever

log = logging.getLogger("imagegen.generator")

SERVICE_NAME = generator_service_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


async def start(settings: GeneratorSettings) -> Service:
    check_free(settings.listen_addr)
    prepare_observability("generator", settings.metrics_host, settings.metrics_port)
    check_secrets(settings)
    prepare_torch()
    set_torch_threads(settings.torch_threads, settings.model_processes)
    from services.evaluator.client import EvaluatorClient
    from services.generator.engine import Engine
    from services.generator.grpc_api import GeneratorServicer
    from services.generator.worker import QueueWorker, Supervisor

    pool = await db.connect(settings.database_url)
    redis = connect_redis(settings.redis_url)
    registry = load_registry(settings.model_registry, settings.model_dir)
    objects = open_store(settings)
    engine = Engine(
        registry,
        settings.device,
        batch_window_s=settings.batch_window_ms / 1e3,
        memory_budget_bytes=settings.model_memory_budget_mb * 2**20,
    )
    channels = [
        open_channel(addr, settings.rpc_timeout_seconds, settings.max_message_bytes)
        for addr in (settings.evaluator_addr, settings.cache_addr)
    ]
    evaluator = EvaluatorClient(channels[0])
    servicer = GeneratorServicer(engine, registry, objects, evaluator)
    running = await start_server(
        "generator",
        settings.listen_addr,
        [
            Servicer(
                SERVICE_NAME,
                lambda s: generator_service_pb2_grpc.add_GeneratorServiceServicer_to_server(
                    servicer, s
                ),
            )
        ],
        settings.max_message_bytes,
        metrics_host=settings.metrics_host,
        metrics_port=settings.metrics_port,
        serving=False,
    )
    await engine.start()
    servicer.ready = True

    queue = JobQueue(redis, settings.claim_idle_ms)
    lifecycle = JobLifecycle(
        pool,
        redis,
        EventLog(redis, settings.event_ttl_seconds),
        queue,
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.job_max_attempts,
        idempotency_ttl_seconds=settings.idempotency_ttl_seconds,
    )
    cancels = CancelListener(redis)
    consumer = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
    stop = asyncio.Event()
    supervisor = Supervisor(
        [
            QueueWorker(
                engine,
                lifecycle,
                queue,
                objects,
                evaluator,
                CacheClient(channels[1]),
                cancels,
                consumer=f"{consumer}-{i}",
            )
            for i in range(settings.workers)
        ],
        stop,
    )
    checks = {"postgres": postgres_check(pool), "redis": redis_check(redis)}
    background = [asyncio.create_task(cancels.run())]
    if settings.workers:
        checks["workers"] = supervisor.any_alive
        background.append(
            asyncio.create_task(
                reconcile_forever(
                    lifecycle,
                    queue,
                    stop,
                    settings.reconcile_interval_seconds,
                    settings.requeue_after_seconds,
                )
            )
        )
    supervisor.start()
    background.append(asyncio.create_task(monitor(running, checks)))
    background.append(
        asyncio.create_task(watch_queue(queue, stop, settings.reconcile_interval_seconds))
    )

    async def stop_workers() -> None:
        # The gRPC drain, the workers and the pool share the grace period: jobs in hand get a
        # quarter of it to finish, then go back on the queue (a quarter more at most).
        await supervisor.stop(settings.grace_seconds / 4)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)

    async def close() -> None:
        for channel in channels:
            await channel.close()
        await redis.aclose()
        try:  # waits for connections in use; one that never comes back must not hold the exit
            await asyncio.wait_for(pool.close(), settings.grace_seconds / 4)
        except TimeoutError:
            pool.terminate()
        engine.close()

    return Service(running, [close, stop_workers])


async def watch_queue(queue: JobQueue, stop: asyncio.Event, interval_seconds: float) -> None:
    """Keeps the queue gauges (jobs waiting, the oldest one's age, per lane) fresh: one cheap
    script per interval. Every generator reports the same shared queue."""
    while not stop.is_set():
        try:
            for lane, (waiting, oldest_seconds) in (await queue.lanes()).items():
                metrics.QUEUE_WAITING.labels(lane.value).set(waiting)
                metrics.QUEUE_OLDEST_SECONDS.labels(lane.value).set(oldest_seconds)
        except Exception as error:  # noqa: BLE001 - the next round tries again
            log.debug("queue gauges not refreshed: %s", error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_seconds)
