"""CacheService over real gRPC on 127.0.0.1:0, backed by a real Postgres and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from imagegen.v1 import cache_service_pb2 as pb
from imagegen.v1 import cache_service_pb2_grpc, types_pb2

from services.cache import store as cache_store
from tests.conftest import Mesh, ServiceEnv, start_in_process
from tests.helpers import violations as field_violations

CACHE_SERVICE = "imagegen.v1.CacheService"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache",))
    yield started
    await started.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.addr("cache")) as opened:
        yield opened


@pytest.fixture
def cache(channel: grpc.aio.Channel) -> cache_service_pb2_grpc.CacheServiceStub:
    return cache_service_pb2_grpc.CacheServiceStub(channel)


@pytest_asyncio.fixture(loop_scope="session")
async def redis(env: ServiceEnv) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(env.redis_url)
    yield client
    await client.aclose()


def spec(prompt: str = "", seed: int | None = 7, **fields: object) -> types_pb2.GenerationSpec:
    """A small tiny-sd request with a prompt no other test uses."""
    values: dict[str, object] = {
        "text": prompt or f"a lighthouse {uuid.uuid4().hex}",
        "width_px": 64,
        "height_px": 64,
        "steps": 4,
    }
    values.update(fields)
    message = types_pb2.GenerationSpec(**values)  # type: ignore[arg-type]
    if seed is not None:
        message.seed = seed
    return message


def artifacts(seed: int, count: int = 2) -> list[types_pb2.Artifact]:
    return [
        types_pb2.Artifact(
            id=str(uuid.uuid4()),
            key=f"images/{i:02x}/{uuid.uuid4().hex}.png",
            width_px=64,
            height_px=64,
            variant_index=i,
            seed=seed + i,
            sha256=uuid.uuid4().hex * 2,
            evaluation=types_pb2.Evaluation(clip_score=20.0 + i, lpips_diversity=0.5),
            is_primary=i == 0,
        )
        for i in range(count)
    ]


async def store(
    cache: cache_service_pb2_grpc.CacheServiceStub,
    request_spec: types_pb2.GenerationSpec,
    ttl_seconds: int = 0,
) -> pb.CacheEntry:
    response = await cache.Store(
        pb.StoreRequest(
            spec=request_spec,
            job_id=str(uuid.uuid4()),
            artifacts=artifacts(request_spec.seed),
            ttl_seconds=ttl_seconds,
        )
    )
    return response.entry


def artifact_keys(entry: pb.CacheEntry) -> list[tuple[int, str, str]]:
    return [(a.variant_index, a.key, a.sha256) for a in entry.artifacts]


async def test_namespaces_keep_tenants_caches_apart(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    request_spec = spec()
    await cache.Store(
        pb.StoreRequest(
            spec=request_spec,
            job_id=str(uuid.uuid4()),
            artifacts=artifacts(request_spec.seed),
            namespace="a",
        )
    )
    for seed_agnostic in (False, True):
        found = {
            namespace: (
                await cache.Lookup(
                    pb.LookupRequest(
                        spec=request_spec, seed_agnostic=seed_agnostic, namespace=namespace
                    )
                )
            ).hit
            for namespace in ("a", "b", "")
        }
        assert found == {"a": True, "b": False, "": False}


async def test_lookup_misses_then_hits_after_store_with_the_same_artifacts(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    request_spec = spec()
    miss = await cache.Lookup(pb.LookupRequest(spec=request_spec))
    assert not miss.hit
    assert len(miss.key) == 64

    stored = await store(cache, request_spec)
    assert stored.key == miss.key
    assert stored.seed == 7
    assert stored.hit_count == 0

    hit = await cache.Lookup(pb.LookupRequest(spec=request_spec))
    assert hit.hit
    assert hit.key == miss.key
    assert hit.entry.key == stored.key
    assert hit.entry.job_id == stored.job_id
    assert hit.entry.seed == 7
    assert artifact_keys(hit.entry) == artifact_keys(stored)
    assert [a.evaluation.clip_score for a in hit.entry.artifacts] == [20.0, 21.0]
    assert [a.is_primary for a in hit.entry.artifacts] == [True, False]
    assert hit.entry.expire_time.ToDatetime() > hit.entry.create_time.ToDatetime()


async def test_lookup_of_an_equivalent_prompt_hits_the_same_entry(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    words = uuid.uuid4().hex
    stored = await store(cache, spec(f"A Lighthouse  at dusk {words}"))
    hit = await cache.Lookup(pb.LookupRequest(spec=spec(f"  a lighthouse at DUSK\n{words} ")))
    assert hit.hit and hit.entry.key == stored.key


async def test_lookup_with_defaults_left_out_hits_an_entry_stored_with_them_spelled_out(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    prompt = f"a harbour {uuid.uuid4().hex}"
    explicit = types_pb2.GenerationSpec(
        text=prompt,
        model="tiny-sd",
        seed=3,
        width_px=256,
        height_px=256,
        steps=20,
        num_variants=1,
        guidance_scale=7.5,
    )
    stored = await store(cache, explicit)
    hit = await cache.Lookup(pb.LookupRequest(spec=types_pb2.GenerationSpec(text=prompt, seed=3)))
    assert hit.hit and hit.entry.key == stored.key


async def test_seed_aware_lookup_with_another_seed_misses(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    await store(cache, spec(prompt, seed=7))
    other = await cache.Lookup(pb.LookupRequest(spec=spec(prompt, seed=8)))
    assert not other.hit


async def test_seed_agnostic_lookup_hits_a_result_made_with_another_seed(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    stored = await store(cache, spec(prompt, seed=7))
    hit = await cache.Lookup(pb.LookupRequest(spec=spec(prompt, seed=8), seed_agnostic=True))
    assert hit.hit
    assert hit.entry.seed == 7
    assert hit.entry.key == stored.key
    assert hit.entry.seedless_key == stored.seedless_key
    # The request key is the request's own seed-aware key, not the entry's.
    assert hit.key != stored.key


async def test_seed_agnostic_lookup_needs_no_seed(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    stored = await store(cache, spec(prompt, seed=11))
    hit = await cache.Lookup(pb.LookupRequest(spec=spec(prompt, seed=None), seed_agnostic=True))
    assert hit.hit and hit.entry.seed == 11 and hit.entry.key == stored.key


async def test_seed_agnostic_lookup_returns_the_newest_result(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    await store(cache, spec(prompt, seed=1))
    newest = await store(cache, spec(prompt, seed=2))
    hit = await cache.Lookup(pb.LookupRequest(spec=spec(prompt, seed=9), seed_agnostic=True))
    assert hit.hit and hit.entry.seed == 2 and hit.entry.key == newest.key


@pytest.mark.parametrize(
    "change",
    [
        {"steps": 5},
        {"width_px": 72},
        {"negative_prompt": "fog"},
        {"guidance_scale": 3.0},
        {"num_variants": 2},
    ],
    ids=lambda change: next(iter(change)),
)
async def test_lookup_of_a_request_that_changes_the_pixels_misses_even_seed_agnostic(
    cache: cache_service_pb2_grpc.CacheServiceStub, change: dict[str, object]
) -> None:
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    await store(cache, spec(prompt))
    changed = spec(prompt, **change)
    assert not (await cache.Lookup(pb.LookupRequest(spec=changed))).hit
    assert not (await cache.Lookup(pb.LookupRequest(spec=changed, seed_agnostic=True))).hit
    assert (await cache.Lookup(pb.LookupRequest(spec=spec(prompt)))).hit


async def test_every_hit_increments_the_hit_count(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    await store(cache, spec(prompt))
    counts = []
    for seed_agnostic in (False, True, False):
        hit = await cache.Lookup(pb.LookupRequest(spec=spec(prompt), seed_agnostic=seed_agnostic))
        counts.append(hit.entry.hit_count)
    assert counts == [1, 2, 3]


async def test_store_again_replaces_the_result_and_keeps_the_hit_count(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    request_spec = spec()
    await store(cache, request_spec)
    await cache.Lookup(pb.LookupRequest(spec=request_spec))
    second = await store(cache, request_spec)
    hit = await cache.Lookup(pb.LookupRequest(spec=request_spec))
    assert hit.entry.job_id == second.job_id
    assert artifact_keys(hit.entry) == artifact_keys(second)
    assert hit.entry.hit_count == 2


async def test_a_replaced_result_is_what_postgres_and_seed_agnostic_lookups_return(
    cache: cache_service_pb2_grpc.CacheServiceStub, redis: aioredis.Redis
) -> None:
    # What a job with cache=refresh relies on: its store replaces the entry everywhere.
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    first = await store(cache, spec(prompt))
    second = await store(cache, spec(prompt))
    assert artifact_keys(second) != artifact_keys(first)
    agnostic = await cache.Lookup(pb.LookupRequest(spec=spec(prompt, seed=99), seed_agnostic=True))
    assert agnostic.hit and agnostic.entry.job_id == second.job_id
    assert artifact_keys(agnostic.entry) == artifact_keys(second)

    await redis.delete(cache_store._HOT + second.key, cache_store._SEEDLESS + second.seedless_key)
    from_postgres = await cache.Lookup(pb.LookupRequest(spec=spec(prompt)))
    assert from_postgres.hit and from_postgres.entry.job_id == second.job_id
    assert artifact_keys(from_postgres.entry) == artifact_keys(second)


async def test_entry_expires_after_its_ttl_from_redis_and_postgres(
    cache: cache_service_pb2_grpc.CacheServiceStub, redis: aioredis.Redis
) -> None:
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    stored = await store(cache, spec(prompt), ttl_seconds=2)
    # The hot index holds the entry no longer than the entry lives.
    hot_ttl_ms = await redis.pttl(cache_store._HOT + stored.key)
    assert 0 < hot_ttl_ms <= 2000
    assert (await cache.Lookup(pb.LookupRequest(spec=spec(prompt)))).hit
    lifetime = stored.expire_time.ToDatetime() - stored.create_time.ToDatetime()
    assert lifetime.total_seconds() == pytest.approx(2, abs=0.01)

    await asyncio.sleep(2.2)
    assert not (await cache.Lookup(pb.LookupRequest(spec=spec(prompt)))).hit
    assert not (
        await cache.Lookup(pb.LookupRequest(spec=spec(prompt, seed=1), seed_agnostic=True))
    ).hit


async def test_entry_with_a_one_second_ttl_expires_from_postgres(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    await store(cache, spec(prompt), ttl_seconds=1)
    assert (await cache.Lookup(pb.LookupRequest(spec=spec(prompt)))).hit
    await asyncio.sleep(1.2)
    assert not (await cache.Lookup(pb.LookupRequest(spec=spec(prompt)))).hit
    assert not (await cache.Lookup(pb.LookupRequest(spec=spec(prompt), seed_agnostic=True))).hit


async def test_lookup_falls_back_to_postgres_without_the_hot_keys_and_rewarms_them(
    cache: cache_service_pb2_grpc.CacheServiceStub, redis: aioredis.Redis
) -> None:
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    stored = await store(cache, spec(prompt))
    hot = cache_store._HOT + stored.key
    seedless = cache_store._SEEDLESS + stored.seedless_key
    assert await redis.exists(hot, seedless) == 2

    assert await redis.delete(hot, seedless) == 2
    hit = await cache.Lookup(pb.LookupRequest(spec=spec(prompt)))
    assert hit.hit and artifact_keys(hit.entry) == artifact_keys(stored)
    assert await redis.exists(hot, seedless) == 2

    assert await redis.delete(hot, seedless) == 2
    agnostic = await cache.Lookup(pb.LookupRequest(spec=spec(prompt, seed=99), seed_agnostic=True))
    assert agnostic.hit and agnostic.entry.key == stored.key
    assert agnostic.entry.hit_count == 2


async def test_invalidate_by_key_removes_only_that_entry(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    older = await store(cache, spec(prompt, seed=1))
    newer = await store(cache, spec(prompt, seed=2))

    removed = await cache.Invalidate(pb.InvalidateRequest(key=newer.key))
    assert removed.removed == 1
    assert not (await cache.Lookup(pb.LookupRequest(spec=spec(prompt, seed=2)))).hit
    assert (await cache.Lookup(pb.LookupRequest(spec=spec(prompt, seed=1)))).hit
    # The seed-agnostic lookup now falls back to the older entry.
    agnostic = await cache.Lookup(pb.LookupRequest(spec=spec(prompt, seed=2), seed_agnostic=True))
    assert agnostic.hit and agnostic.entry.key == older.key

    again = await cache.Invalidate(pb.InvalidateRequest(key=newer.key))
    assert again.removed == 0


async def test_stats_count_entries_hits_and_misses(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    before = await cache.Stats(pb.StatsRequest())
    request_spec = spec()
    await cache.Lookup(pb.LookupRequest(spec=request_spec))
    await store(cache, request_spec)
    await cache.Lookup(pb.LookupRequest(spec=request_spec))
    await cache.Lookup(pb.LookupRequest(spec=request_spec, seed_agnostic=True))
    after = await cache.Stats(pb.StatsRequest())
    assert after.entries - before.entries == 1
    assert after.hits - before.hits == 2
    assert after.misses - before.misses == 1
    assert after.total_hit_count - before.total_hit_count == 2


async def test_invalidate_all_removes_every_entry(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    specs = [spec(), spec()]
    for request_spec in specs:
        await store(cache, request_spec)
    live = (await cache.Stats(pb.StatsRequest())).entries
    assert live >= 2

    removed = await cache.Invalidate(pb.InvalidateRequest(all=True))
    assert removed.removed >= live
    stats = await cache.Stats(pb.StatsRequest())
    assert stats.entries == 0
    assert stats.total_hit_count == 0
    for request_spec in specs:
        assert not (await cache.Lookup(pb.LookupRequest(spec=request_spec))).hit
        assert not (await cache.Lookup(pb.LookupRequest(spec=request_spec, seed_agnostic=True))).hit


async def test_store_without_a_seed_is_invalid_naming_spec_seed(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cache.Store(
            pb.StoreRequest(spec=spec(seed=None), job_id=str(uuid.uuid4()), artifacts=artifacts(0))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == ["spec.seed"]


async def test_seed_aware_lookup_without_a_seed_is_invalid_naming_spec_seed(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cache.Lookup(pb.LookupRequest(spec=spec(seed=None)))
    assert field_violations(caught.value) == ["spec.seed"]


async def test_unknown_model_is_invalid_naming_spec_model(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    for call in (
        cache.Lookup(pb.LookupRequest(spec=spec(model="sdxl-turbo"))),
        cache.Store(
            pb.StoreRequest(
                spec=spec(model="sdxl-turbo"), job_id=str(uuid.uuid4()), artifacts=artifacts(7)
            )
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert field_violations(caught.value) == ["spec.model"]


async def test_bad_spec_fields_are_all_named_by_their_protobuf_paths(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cache.Lookup(
            pb.LookupRequest(spec=spec(text="", width_px=70, num_variants=50, steps=1000))
        )
    assert set(field_violations(caught.value)) == {
        "spec.text",
        "spec.width_px",
        "spec.num_variants",
        "spec.steps",
    }


async def test_store_without_job_id_or_artifacts_is_invalid(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cache.Store(pb.StoreRequest(spec=spec(), artifacts=artifacts(7)))
    assert field_violations(caught.value) == ["job_id"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cache.Store(pb.StoreRequest(spec=spec(), job_id=str(uuid.uuid4())))
    assert field_violations(caught.value) == ["artifacts"]


async def test_invalidate_without_a_target_is_invalid(
    cache: cache_service_pb2_grpc.CacheServiceStub,
) -> None:
    for request in (pb.InvalidateRequest(), pb.InvalidateRequest(all=False)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cache.Invalidate(request)
        assert field_violations(caught.value) == ["target"]


async def test_health_reports_the_cache_service_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in (CACHE_SERVICE, ""):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="imagegen.v1.NoSuchService"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_cache_service(channel: grpc.aio.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    response = await call.read()
    call.cancel()
    names = {s.name for s in response.list_services_response.service}
    assert CACHE_SERVICE in names
    assert "grpc.health.v1.Health" in names
