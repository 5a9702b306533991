"""Starts the generator: the engine (default model loaded before health says SERVING), the
GeneratorService, and the queue workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from imagegen.v1 import generator_service_pb2, generator_service_pb2_grpc

from services.cache.client import CacheClient
from services.common import db
from services.common.clients import open_channel
from services.common.events import EventLog
from services.common.jobstore import JobStore
from services.common.models import load_registry
from services.common.objectstore import open_store
from services.common.queue import JobQueue
from services.common.redis import connect_redis
from services.common.server import Service, Servicer, start_server
from services.common.settings import GeneratorSettings
from services.common.torch_compat import prepare_torch

SERVICE_NAME = generator_service_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


async def start(settings: GeneratorSettings) -> Service:
    prepare_torch()
    from services.evaluator.client import EvaluatorClient
    from services.generator.engine import Engine
    from services.generator.grpc_api import GeneratorServicer
    from services.generator.worker import QueueWorker

    pool = await db.connect(settings.database_url)
    redis = connect_redis(settings.redis_url)
    registry = load_registry(settings.model_registry, settings.model_dir)
    objects = open_store(settings)
    engine = Engine(registry, settings.device)
    servicer = GeneratorServicer(engine, registry, objects)
    running = await start_server(
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
        serving=False,
    )
    await engine.load()
    servicer.ready = True
    await running.set_serving(True)

    channels = [
        open_channel(addr, settings.rpc_timeout_seconds, settings.max_message_bytes)
        for addr in (settings.evaluator_addr, settings.cache_addr)
    ]
    consumer = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
    stop = asyncio.Event()
    workers = [
        QueueWorker(
            engine,
            JobStore(pool),
            EventLog(redis, settings.event_ttl_seconds),
            JobQueue(redis, settings.claim_idle_ms),
            objects,
            EvaluatorClient(channels[0]),
            CacheClient(channels[1]),
            consumer=f"{consumer}-{i}",
            max_attempts=settings.job_max_attempts,
        )
        for i in range(settings.workers)
    ]
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    if workers:
        tasks.append(asyncio.create_task(_sweep(settings, JobStore(pool), JobQueue(redis), stop)))

    async def stop_workers() -> None:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close() -> None:
        for channel in channels:
            await channel.close()
        await redis.aclose()
        await pool.close()
        engine.close()

    return Service(running, [close, stop_workers])


async def _sweep(
    settings: GeneratorSettings, store: JobStore, queue: JobQueue, stop: asyncio.Event
) -> None:
    from services.generator.worker import sweep_unqueued

    while not stop.is_set():
        try:
            await sweep_unqueued(store, queue, settings.sweep_after_seconds)
        except Exception:  # a store away: the next round tries again
            logging.getLogger("imagegen.sweep").exception("sweep failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.sweep_interval_seconds)
