"""Cache modes end to end: the gateway, the cache, the evaluator and the generator's queue worker in
process with the tiny models. `use` answers from the cache and stores what it renders; `refresh`
renders without reading and replaces the entry; `off` neither reads nor writes. (What admission
does with each mode, without a worker, is in tests/test_gateway.py.)"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from imagegen.v1 import (
    cache_service_pb2,
    cache_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    types_pb2,
)
from PIL import Image

from services.common.objectstore import LocalStore, content_key, open_store
from services.common.settings import GatewaySettings
from tests.conftest import Mesh, ServiceEnv, start_in_process
from tests.helpers import run_to_end

WAIT = 60.0
USE = image_service_pb2.CACHE_MODE_USE
REFRESH = image_service_pb2.CACHE_MODE_REFRESH
OFF = image_service_pb2.CACHE_MODE_OFF


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"), workers=1)
    yield started
    await started.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cache(mesh: Mesh) -> AsyncIterator[cache_service_pb2_grpc.CacheServiceStub]:
    async with grpc.aio.insecure_channel(mesh.addr("cache")) as channel:
        yield cache_service_pb2_grpc.CacheServiceStub(channel)


@pytest.fixture(scope="module")
def objects(env: ServiceEnv) -> LocalStore:
    store = open_store(env.settings(GatewaySettings))
    assert isinstance(store, LocalStore)
    return store


# The tenant of the mesh's key: its jobs read and write the cache under this namespace.
TENANT = "tests"


def spec() -> types_pb2.GenerationSpec:
    """A one-variant 64x64, 4-step tiny-sd request with a prompt no other test uses."""
    return types_pb2.GenerationSpec(
        text=f"a harbour at night {uuid.uuid4().hex}", width_px=64, height_px=64, steps=4, seed=21
    )


async def create(
    images: image_service_pb2_grpc.ImageServiceStub,
    request_spec: types_pb2.GenerationSpec,
    **fields: Any,
) -> types_pb2.Job:
    response = await images.CreateJob(
        image_service_pb2.CreateJobRequest(spec=request_spec, **fields)
    )
    job: types_pb2.Job = response.job
    return job


async def rendered(
    images: image_service_pb2_grpc.ImageServiceStub,
    request_spec: types_pb2.GenerationSpec,
    **fields: Any,
) -> types_pb2.Job:
    """A job that the worker renders (not answered from the cache), run to its end."""
    created = await create(images, request_spec, **fields)
    assert created.status == types_pb2.JOB_STATUS_QUEUED and not created.cache_hit
    job = await run_to_end(images, created.id)
    assert job.status == types_pb2.JOB_STATUS_COMPLETED, job.error
    return job


async def lookup(
    cache: cache_service_pb2_grpc.CacheServiceStub, request_spec: types_pb2.GenerationSpec
) -> cache_service_pb2.LookupResponse:
    response: cache_service_pb2.LookupResponse = await cache.Lookup(
        cache_service_pb2.LookupRequest(spec=request_spec, namespace=TENANT)
    )
    return response


async def store_placeholder(
    cache: cache_service_pb2_grpc.CacheServiceStub,
    objects: LocalStore,
    request_spec: types_pb2.GenerationSpec,
) -> cache_service_pb2.CacheEntry:
    """A cached result for `request_spec` made of a flat grey PNG, which no model renders."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, format="PNG")
    data = buffer.getvalue()
    key = content_key(data, "images", "png")
    await objects.put(key, data, "image/png")
    artifact = types_pb2.Artifact(
        id=str(uuid.uuid4()),
        key=key,
        width_px=64,
        height_px=64,
        variant_index=0,
        seed=request_spec.seed,
        sha256=hashlib.sha256(data).hexdigest(),
        evaluation=types_pb2.Evaluation(clip_score=20.0),
        is_primary=True,
    )
    stored = await cache.Store(
        cache_service_pb2.StoreRequest(
            spec=request_spec, job_id=str(uuid.uuid4()), artifacts=[artifact], namespace=TENANT
        )
    )
    entry: cache_service_pb2.CacheEntry = stored.entry
    return entry


def shas(artifacts: Any) -> list[str]:
    return [a.sha256 for a in artifacts]


async def test_use_stores_what_it_renders_and_the_next_use_is_a_hit_with_it(
    images: image_service_pb2_grpc.ImageServiceStub,
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    request_spec = spec()
    first = await rendered(images, request_spec, cache=USE)
    found = await lookup(cache, request_spec)
    assert found.hit and found.entry.job_id == first.id
    again = await create(images, request_spec, cache=USE)
    assert again.status == types_pb2.JOB_STATUS_COMPLETED and again.cache_hit
    assert again.cost_cents == 0
    assert shas(again.artifacts) == shas(first.artifacts)


@pytest.mark.parametrize(
    "fields", [{"cache": REFRESH}, {"skip_cache": True}], ids=["refresh", "skip-cache"]
)
async def test_refresh_renders_over_a_cached_result_and_the_next_use_gets_the_new_one(
    images: image_service_pb2_grpc.ImageServiceStub,
    cache: cache_service_pb2_grpc.CacheServiceStub,
    objects: LocalStore,
    fields: dict[str, Any],
) -> None:
    request_spec = spec()
    placeholder = await store_placeholder(cache, objects, request_spec)
    refreshed = await rendered(images, request_spec, **fields)
    assert shas(refreshed.artifacts) != shas(placeholder.artifacts)

    found = await lookup(cache, request_spec)
    assert found.hit and found.entry.job_id == refreshed.id
    assert shas(found.entry.artifacts) == shas(refreshed.artifacts)
    after = await create(images, request_spec, cache=USE)
    assert after.cache_hit
    assert shas(after.artifacts) == shas(refreshed.artifacts)


async def test_off_neither_reads_nor_writes_the_cache(
    images: image_service_pb2_grpc.ImageServiceStub,
    cache: cache_service_pb2_grpc.CacheServiceStub,
    objects: LocalStore,
) -> None:
    cached_spec = spec()
    placeholder = await store_placeholder(cache, objects, cached_spec)
    over_cached = await rendered(images, cached_spec, cache=OFF)  # not answered from the cache
    assert shas(over_cached.artifacts) != shas(placeholder.artifacts)
    found = await lookup(cache, cached_spec)
    assert found.hit and found.entry.job_id == placeholder.job_id  # not replaced
    assert shas(found.entry.artifacts) == shas(placeholder.artifacts)

    uncached_spec = spec()
    await rendered(images, uncached_spec, cache=OFF)
    assert not (await lookup(cache, uncached_spec)).hit  # not stored
    assert not (await create(images, uncached_spec, cache=USE)).cache_hit
