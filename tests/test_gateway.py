"""The gateway (ImageService, CostService and the HTTP facade) with a real cache service, over real
gRPC and HTTP on 127.0.0.1, and no generator: jobs stay queued unless the cache answers them."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import grpc
import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from imagegen import grpc_transport
from imagegen.v1 import (
    cache_service_pb2,
    cache_service_pb2_grpc,
    cost_service_pb2,
    cost_service_pb2_grpc,
    events_pb2,
    image_service_pb2,
    image_service_pb2_grpc,
    types_pb2,
)
from PIL import Image

from services.common import db
from services.common.events import EventLog
from services.common.objectstore import LocalStore, content_key, open_store
from services.common.queue import JobQueue
from services.common.settings import GatewaySettings
from services.gateway.jobs import WATCH_IDLE_SECONDS
from services.jobs.lifecycle import JobLifecycle
from services.jobs.records import CacheMode
from tests.conftest import Mesh, ServiceEnv, start_in_process
from tests.helpers import stored_upload, violations

IMAGE_SERVICE = "imagegen.v1.ImageService"
COST_SERVICE = "imagegen.v1.CostService"
WAIT = 10.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache", "gateway"))
    yield started
    await started.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(
        mesh.addr("gateway"), interceptors=mesh.auth_interceptors
    ) as opened:
        yield opened


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cache_channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.addr("cache")) as opened:
        yield opened


@pytest.fixture
def images(channel: grpc.aio.Channel) -> image_service_pb2_grpc.ImageServiceStub:
    return image_service_pb2_grpc.ImageServiceStub(channel)


@pytest.fixture
def costs(channel: grpc.aio.Channel) -> cost_service_pb2_grpc.CostServiceStub:
    return cost_service_pb2_grpc.CostServiceStub(channel)


@pytest.fixture
def cache(cache_channel: grpc.aio.Channel) -> cache_service_pb2_grpc.CacheServiceStub:
    return cache_service_pb2_grpc.CacheServiceStub(cache_channel)


@pytest_asyncio.fixture(loop_scope="session")
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=WAIT) as client:
        yield client


@pytest.fixture(scope="module")
def objects(env: ServiceEnv) -> LocalStore:
    """The gateway's object store (the same folder and signing key)."""
    store = open_store(env.settings(GatewaySettings))
    assert isinstance(store, LocalStore)
    return store


def spec(prompt: str = "", seed: int | None = 5, **fields: Any) -> types_pb2.GenerationSpec:
    """A small tiny-sd request with a prompt no other test uses."""
    values: dict[str, Any] = {
        "text": prompt or f"a windmill {uuid.uuid4().hex}",
        "width_px": 64,
        "height_px": 64,
        "steps": 4,
    }
    values.update(fields)
    message = types_pb2.GenerationSpec(**values)
    if seed is not None:
        message.seed = seed
    return message


async def create(
    images: image_service_pb2_grpc.ImageServiceStub,
    request_spec: types_pb2.GenerationSpec,
    **kw: Any,
) -> image_service_pb2.CreateJobResponse:
    response: image_service_pb2.CreateJobResponse = await images.CreateJob(
        image_service_pb2.CreateJobRequest(spec=request_spec, **kw)
    )
    return response


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def event_order(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


class Watch:
    """A WatchJob stream read into a queue; None marks its end, an AioRpcError its failure."""

    def __init__(
        self, images: image_service_pb2_grpc.ImageServiceStub, job_id: str, after: str = ""
    ) -> None:
        self.call = images.WatchJob(
            image_service_pb2.WatchJobRequest(job_id=job_id, after_event_id=after)
        )
        self.queue: asyncio.Queue[events_pb2.JobEvent | grpc.aio.AioRpcError | None] = (
            asyncio.Queue()
        )
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for response in self.call:
                await self.queue.put(response.event)
        except grpc.aio.AioRpcError as error:
            await self.queue.put(error)
            return
        await self.queue.put(None)

    async def next(self) -> events_pb2.JobEvent | grpc.aio.AioRpcError | None:
        return await asyncio.wait_for(self.queue.get(), WAIT)

    async def event(self) -> events_pb2.JobEvent:
        item = await self.next()
        assert isinstance(item, events_pb2.JobEvent), item
        return item

    async def rest(self) -> list[events_pb2.JobEvent]:
        """Every event up to the end of the stream, which must end cleanly."""
        events = []
        while (item := await self.next()) is not None:
            assert isinstance(item, events_pb2.JobEvent), item
            events.append(item)
        return events

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.call.cancel()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


# Admission


async def test_create_job_queues_it_with_a_resolved_seed_and_its_price(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    response = await create(
        images, spec(seed=None, width_px=512, height_px=512, num_variants=2, steps=30)
    )
    job = response.job
    assert job.status == types_pb2.JOB_STATUS_QUEUED
    uuid.UUID(job.id)
    assert job.spec.HasField("seed")
    assert job.spec.model == "tiny-sd"
    assert (job.spec.steps, job.spec.num_variants) == (30, 2)
    assert job.spec.HasField("guidance_scale")
    assert not job.cache_hit
    # 2 variants x 0.25 MP x 3 cents = 1.5, x 30/20 steps = 2.25, rounded up.
    assert response.estimate.base_cents == pytest.approx(1.5)
    assert response.estimate.steps_factor == pytest.approx(1.5)
    assert response.estimate.total_cents == 3
    assert job.cost_cents == 3
    assert job.engine_version
    assert job.HasField("create_time")


async def test_create_job_chooses_a_different_seed_each_time_none_is_given(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    seeds = {(await create(images, spec("a windmill", seed=None))).job.spec.seed for _ in range(4)}
    assert len(seeds) > 1


async def test_create_job_with_an_idempotency_key_returns_the_first_job(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    key = f"retry-{uuid.uuid4()}"
    request_spec = spec(seed=None)
    first = await create(images, request_spec, idempotency_key=key)
    second = await create(images, request_spec, idempotency_key=key)
    assert second.job.id == first.job.id
    assert (first.idempotent_replay, second.idempotent_replay) == (False, True)
    assert second.job.spec.seed == first.job.spec.seed
    other = await create(images, request_spec, idempotency_key=f"retry-{uuid.uuid4()}")
    assert other.job.id != first.job.id


async def test_create_job_reusing_an_idempotency_key_for_another_request_is_refused(
    images: image_service_pb2_grpc.ImageServiceStub, http: httpx.AsyncClient
) -> None:
    key = f"retry-{uuid.uuid4()}"
    await create(images, spec(), idempotency_key=key)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(images, spec(), idempotency_key=key)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    response = await http.post(
        "/api/generate/text-to-image",
        json={"prompt": "something else", "width": 64, "height": 64},
        headers={"Idempotency-Key": key},
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "ALREADY_EXISTS"


async def test_create_job_with_a_too_long_idempotency_key_names_that_field(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(images, spec(), idempotency_key="k" * 201)
    assert violations(caught.value) == ["idempotency_key"]


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ({"text": ""}, {"spec.text"}),
        ({"width_px": 70}, {"spec.width_px"}),
        ({"model": "sdxl-turbo"}, {"spec.model"}),
        ({"num_variants": 50}, {"spec.num_variants"}),
        ({"steps": 1000}, {"spec.steps"}),
        (
            # The tiny model has no recoloring ControlNet, 2.0 is out of range, and there is no
            # reference image to make the control image from.
            {"controlnet": types_pb2.ControlNet(name="recoloring", weight=2.0)},
            {"spec.controlnet.name", "spec.controlnet.weight", "spec.controlnet"},
        ),
        (
            {"guidance_images": [types_pb2.GuidanceImage(key="uploads/ab/none.png")]},
            {"spec.guidance_images[0].role"},
        ),
    ],
    ids=["empty-prompt", "width", "model", "variants", "steps", "controlnet-weight", "role"],
)
async def test_create_job_with_a_bad_field_is_invalid_naming_it(
    images: image_service_pb2_grpc.ImageServiceStub, change: dict[str, Any], fields: set[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(images, spec(**change))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(caught.value)) == fields


async def test_create_job_names_every_bad_field_at_once(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(images, spec(text="", width_px=70, height_px=4096, num_variants=50))
    assert set(violations(caught.value)) == {
        "spec.text",
        "spec.width_px",
        "spec.height_px",
        "spec.num_variants",
    }


async def test_create_job_rejects_a_guidance_image_that_was_never_uploaded(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    missing = types_pb2.GuidanceImage(
        key=f"uploads/00/{uuid.uuid4().hex}.png", role=types_pb2.GUIDANCE_ROLE_REFERENCE
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(images, spec(guidance_images=[missing]))
    assert violations(caught.value) == ["spec.guidance_images[0].key"]


async def test_create_job_accepts_an_uploaded_guidance_image_and_prices_it(
    images: image_service_pb2_grpc.ImageServiceStub, env: ServiceEnv
) -> None:
    key = await stored_upload(env, png((10, 200, 30)))
    guidance = types_pb2.GuidanceImage(key=key, role=types_pb2.GUIDANCE_ROLE_REFERENCE)
    response = await create(images, spec(guidance_images=[guidance]))
    assert response.job.status == types_pb2.JOB_STATUS_QUEUED
    assert response.estimate.guidance_cents == 0.5
    assert list(response.job.spec.guidance_images) == [guidance]


# Reading, listing, cancelling


async def test_get_job_returns_the_created_job(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    created = (await create(images, spec())).job
    got = await images.GetJob(image_service_pb2.GetJobRequest(job_id=created.id))
    assert got.job.id == created.id
    assert got.job.status == types_pb2.JOB_STATUS_QUEUED
    assert got.job.spec == created.spec
    assert got.job.cost_cents == created.cost_cents


async def test_get_job_of_an_unknown_job_is_not_found(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.GetJob(image_service_pb2.GetJobRequest(job_id=str(uuid.uuid4())))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("job_id", ["not-a-uuid", ""])
async def test_get_and_cancel_with_a_bad_job_id_are_invalid_naming_job_id(
    images: image_service_pb2_grpc.ImageServiceStub, job_id: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.GetJob(image_service_pb2.GetJobRequest(job_id=job_id))
    assert violations(caught.value) == ["job_id"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.CancelJob(image_service_pb2.CancelJobRequest(job_id=job_id))
    assert violations(caught.value) == ["job_id"]


async def list_all(
    images: image_service_pb2_grpc.ImageServiceStub,
    page_size: int,
    status: types_pb2.JobStatus.ValueType = types_pb2.JOB_STATUS_UNSPECIFIED,
) -> list[types_pb2.Job]:
    jobs: list[types_pb2.Job] = []
    token = ""
    for _ in range(1000):
        page = await images.ListJobs(
            image_service_pb2.ListJobsRequest(page_size=page_size, page_token=token, status=status)
        )
        assert len(page.jobs) <= page_size
        jobs += page.jobs
        token = page.next_page_token
        if not token:
            return jobs
    raise AssertionError("the listing did not end")


async def test_list_jobs_pages_newest_first_without_duplicates(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    created = [(await create(images, spec())).job.id for _ in range(5)]

    first = await images.ListJobs(image_service_pb2.ListJobsRequest(page_size=2))
    assert [j.id for j in first.jobs] == created[::-1][:2]
    assert first.next_page_token
    assert all(not j.artifacts for j in first.jobs)

    paged = await list_all(images, page_size=2)
    ids = [j.id for j in paged]
    assert len(ids) == len(set(ids))
    assert ids[:5] == created[::-1]
    times = [j.create_time.ToDatetime() for j in paged]
    assert times == sorted(times, reverse=True)
    whole = await images.ListJobs(image_service_pb2.ListJobsRequest(page_size=100))
    assert len(whole.jobs) < 100, "the module made too many jobs for this check"
    assert [j.id for j in whole.jobs] == ids


async def test_list_jobs_filters_by_status(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    kept = (await create(images, spec())).job.id
    cancelled = (await create(images, spec())).job.id
    await images.CancelJob(image_service_pb2.CancelJobRequest(job_id=cancelled))

    listed = await list_all(images, page_size=3, status=types_pb2.JOB_STATUS_CANCELLED)
    assert cancelled in [j.id for j in listed]
    assert kept not in [j.id for j in listed]
    assert {j.status for j in listed} == {types_pb2.JOB_STATUS_CANCELLED}

    queued = await list_all(images, page_size=50, status=types_pb2.JOB_STATUS_QUEUED)
    assert kept in [j.id for j in queued]
    assert cancelled not in [j.id for j in queued]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [({"page_size": 101}, "page_size"), ({"page_token": "not a token"}, "page_token")],
)
async def test_list_jobs_with_a_bad_page_is_invalid_naming_the_field(
    images: image_service_pb2_grpc.ImageServiceStub, request_fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.ListJobs(image_service_pb2.ListJobsRequest(**request_fields))
    assert violations(caught.value) == [field]


async def test_cancel_of_a_queued_job_ends_it_at_once_and_watch_yields_its_final_event(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    job = (await create(images, spec())).job
    cancelled = await images.CancelJob(image_service_pb2.CancelJobRequest(job_id=job.id))
    assert cancelled.job.status == types_pb2.JOB_STATUS_CANCELLED
    got = await images.GetJob(image_service_pb2.GetJobRequest(job_id=job.id))
    assert got.job.status == types_pb2.JOB_STATUS_CANCELLED

    async with Watch(images, job.id) as watch:
        events = await watch.rest()
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds == ["status", "final"]
    assert events[0].status.status == types_pb2.JOB_STATUS_QUEUED
    assert events[-1].final.job.status == types_pb2.JOB_STATUS_CANCELLED
    assert all(e.job_id == job.id for e in events)

    again = await images.CancelJob(image_service_pb2.CancelJobRequest(job_id=job.id))
    assert again.job.status == types_pb2.JOB_STATUS_CANCELLED
    async with Watch(images, job.id) as watch:
        assert [e.id for e in await watch.rest()] == [e.id for e in events]


async def test_watch_follows_a_job_live_and_resumes_after_an_event_without_duplicates(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    job = (await create(images, spec())).job
    async with Watch(images, job.id) as live:
        queued = await live.event()
        assert queued.status.status == types_pb2.JOB_STATUS_QUEUED
        async with Watch(images, job.id, after=queued.id) as resumed:
            await asyncio.sleep(0.2)
            assert resumed.queue.empty()  # nothing after the queued event yet
            await images.CancelJob(image_service_pb2.CancelJobRequest(job_id=job.id))
            live_rest = await live.rest()
            resumed_events = await resumed.rest()
    assert [e.WhichOneof("payload") for e in live_rest] == ["final"]
    assert [e.id for e in resumed_events] == [e.id for e in live_rest]
    assert event_order(live_rest[0].id) > event_order(queued.id)

    async with Watch(images, job.id) as replay:
        replayed = await replay.rest()
    assert [e.id for e in replayed] == [queued.id, live_rest[0].id]
    async with Watch(images, job.id, after=queued.id) as replay_after:
        assert [e.id for e in await replay_after.rest()] == [live_rest[0].id]


async def test_watch_of_a_job_queued_longer_than_a_poll_keeps_following_it(
    mesh: Mesh, images: image_service_pb2_grpc.ImageServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over a channel that pings while the stream is quiet, as the SDK's does (more often here):
    # the gateway takes the pings, where gRPC's default answers "Too many pings" by the third.
    monkeypatch.setattr(grpc_transport, "KEEPALIVE_SECONDS", 1.5)
    pinging = grpc.aio.insecure_channel(
        mesh.addr("gateway"),
        options=grpc_transport.channel_options(),
        interceptors=mesh.auth_interceptors,
    )
    job = (await create(images, spec())).job
    async with pinging, Watch(image_service_pb2_grpc.ImageServiceStub(pinging), job.id) as watch:
        queued = await watch.event()
        # Nothing happens for longer than one blocking read of the event stream.
        await asyncio.sleep(WATCH_IDLE_SECONDS + 1.0)
        assert watch.queue.empty(), watch.queue.get_nowait()
        await images.CancelJob(image_service_pb2.CancelJobRequest(job_id=job.id))
        rest = await watch.rest()
    assert [e.WhichOneof("payload") for e in rest] == ["final"]
    assert event_order(rest[0].id) > event_order(queued.id)


async def test_an_sse_stream_says_it_is_alive_while_its_job_waits(
    http: httpx.AsyncClient,
) -> None:
    """A queued job's stream is quiet until a worker takes it: after each quiet while it sends an
    SSE comment, so that proxies and clients with read timeouts keep the connection."""
    body = {"prompt": f"a windmill {uuid.uuid4().hex}", "width": 64, "height": 64, "steps": 4}
    run_id = (await http.post("/api/generate/text-to-image", json=body)).json()["run_id"]
    lines: list[str] = []
    opened = time.monotonic()
    quiet = 0.0
    async with http.stream("GET", f"/api/status/stream/{run_id}") as stream:
        async for line in stream.aiter_lines():
            lines.append(line)
            if line == ": keep-alive" and not quiet:
                quiet = time.monotonic() - opened
                await http.post(f"/api/jobs/{run_id}/cancel")
            if line.startswith("data: ") and lines[-2] == "event: final":
                break
    assert WATCH_IDLE_SECONDS - 0.5 < quiet < WAIT
    keepalive = lines.index(": keep-alive")
    # The queued status first, the comment as a message of its own, then the cancel's end.
    assert "event: status" in lines[:keepalive] and lines[keepalive - 1 : keepalive + 2] == [
        "",
        ": keep-alive",
        "",
    ]
    assert "event: final" in lines[keepalive:]


async def test_watch_of_an_unknown_job_is_not_found(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    async with Watch(images, str(uuid.uuid4())) as watch:
        error = await watch.next()
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_with_a_bad_event_id_is_invalid_naming_after_event_id(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    job = (await create(images, spec())).job
    async with Watch(images, job.id, after="yesterday") as watch:
        error = await watch.next()
    assert isinstance(error, grpc.aio.AioRpcError)
    assert violations(error) == ["after_event_id"]


# Pricing


async def test_estimate_cost_over_grpc_and_http_agree_on_the_formula(
    costs: cost_service_pb2_grpc.CostServiceStub, http: httpx.AsyncClient
) -> None:
    # 3 variants x 1 MP (1024x1024) x 3 cents = 9, x 40/20 steps = 18.
    grpc_cost = await costs.EstimateCost(
        cost_service_pb2.EstimateCostRequest(
            spec=spec(width_px=1024, height_px=1024, num_variants=3, steps=40)
        )
    )
    response = await http.post(
        "/api/cost/estimate",
        json={
            "prompt": "a windmill",
            "width": 1024,
            "height": 1024,
            "num_variants": 3,
            "steps": 40,
        },
    )
    assert response.status_code == 200
    body = response.json()
    breakdown = grpc_cost.breakdown
    assert breakdown.total_cents == 18
    assert body["est_cost_cents"] == 18
    assert body["breakdown"]["base_cents"] == pytest.approx(breakdown.base_cents) == 9.0
    assert body["breakdown"]["steps_factor"] == breakdown.steps_factor == 2.0
    assert body["breakdown"]["model_multiplier"] == breakdown.model_multiplier == 1.0
    assert body["breakdown"]["controlnet_cents"] == breakdown.controlnet_cents == 0.0
    assert body["breakdown"]["guidance_cents"] == breakdown.guidance_cents == 0.0


async def test_estimate_cost_of_a_bad_request_is_invalid_over_both_apis(
    costs: cost_service_pb2_grpc.CostServiceStub, http: httpx.AsyncClient
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await costs.EstimateCost(cost_service_pb2.EstimateCostRequest(spec=spec(width_px=70)))
    assert violations(caught.value) == ["spec.width_px"]
    response = await http.post("/api/cost/estimate", json={"prompt": "a", "width": 70})
    assert response.status_code == 422
    assert [v["field"] for v in response.json()["error"]["field_violations"]] == ["width"]


# The cache


async def store_result(
    cache: cache_service_pb2_grpc.CacheServiceStub,
    objects: LocalStore,
    request_spec: types_pb2.GenerationSpec,
) -> list[types_pb2.Artifact]:
    """Stores a two-variant result for `request_spec` with real PNGs in the object store."""
    artifacts = []
    for index in range(2):
        data = png((40 * index, 90, 160))
        key = content_key(data, "images", "png")
        await objects.put(key, data, "image/png")
        artifacts.append(
            types_pb2.Artifact(
                id=str(uuid.uuid4()),
                key=key,
                width_px=64,
                height_px=64,
                variant_index=index,
                seed=request_spec.seed + index,
                sha256=hashlib.sha256(data).hexdigest(),
                evaluation=types_pb2.Evaluation(clip_score=30.0 - index, lpips_diversity=0.25),
                is_primary=index == 0,
            )
        )
    await cache.Store(
        cache_service_pb2.StoreRequest(
            spec=request_spec,
            job_id=str(uuid.uuid4()),
            artifacts=artifacts,
            namespace="tests",  # the cache of the mesh key's tenant
        )
    )
    return artifacts


async def test_create_job_of_a_cached_spec_completes_at_once_at_no_cost(
    images: image_service_pb2_grpc.ImageServiceStub,
    cache: cache_service_pb2_grpc.CacheServiceStub,
    objects: LocalStore,
    http: httpx.AsyncClient,
) -> None:
    request_spec = spec(num_variants=2)
    stored = await store_result(cache, objects, request_spec)

    response = await create(images, request_spec)
    job = response.job
    assert job.status == types_pb2.JOB_STATUS_COMPLETED
    assert job.cache_hit
    assert job.cost_cents == 0
    assert response.estimate.total_cents >= 1
    assert job.progress_percent == 100
    assert [(a.variant_index, a.key, a.sha256) for a in job.artifacts] == [
        (a.variant_index, a.key, a.sha256) for a in stored
    ]
    assert [a.is_primary for a in job.artifacts] == [True, False]
    assert job.artifacts[0].evaluation.clip_score == 30.0
    assert {a.id for a in job.artifacts}.isdisjoint({a.id for a in stored})

    got = await images.GetJob(image_service_pb2.GetJobRequest(job_id=job.id))
    assert [a.key for a in got.job.artifacts] == [a.key for a in stored]
    for artifact in got.job.artifacts:
        download = await http.get(artifact.url)
        assert download.status_code == 200
        assert download.headers["content-type"] == "image/png"
        assert hashlib.sha256(download.content).hexdigest() == artifact.sha256

    async with Watch(images, job.id) as watch:
        events = await watch.rest()
    assert [e.WhichOneof("payload") for e in events] == ["final"]
    assert events[0].final.job.cache_hit
    assert [a.key for a in events[0].final.job.artifacts] == [a.key for a in stored]


async def test_create_job_skipping_the_cache_queues_a_cached_spec(
    images: image_service_pb2_grpc.ImageServiceStub,
    cache: cache_service_pb2_grpc.CacheServiceStub,
    objects: LocalStore,
) -> None:
    request_spec = spec()
    await store_result(cache, objects, request_spec)
    job = (await create(images, request_spec, skip_cache=True)).job
    assert job.status == types_pb2.JOB_STATUS_QUEUED
    assert not job.cache_hit and job.cost_cents >= 1


async def test_seed_agnostic_create_job_answers_from_another_seed_and_records_it(
    images: image_service_pb2_grpc.ImageServiceStub,
    cache: cache_service_pb2_grpc.CacheServiceStub,
    objects: LocalStore,
) -> None:
    prompt = f"a windmill {uuid.uuid4().hex}"
    stored = await store_result(cache, objects, spec(prompt, seed=5))

    aware = (await create(images, spec(prompt, seed=6))).job
    assert aware.status == types_pb2.JOB_STATUS_QUEUED

    agnostic = (await create(images, spec(prompt, seed=6), seed_agnostic_cache=True)).job
    assert agnostic.status == types_pb2.JOB_STATUS_COMPLETED
    assert agnostic.cache_hit
    assert agnostic.spec.seed == 5  # the seed the cached images were made with
    assert [a.key for a in agnostic.artifacts] == [a.key for a in stored]


# Cache modes (whether the worker stores what it renders: tests/test_cache_modes.py)

USE = image_service_pb2.CACHE_MODE_USE
REFRESH = image_service_pb2.CACHE_MODE_REFRESH
OFF = image_service_pb2.CACHE_MODE_OFF


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def lifecycle(env: ServiceEnv) -> AsyncIterator[JobLifecycle]:
    """The job records, read as the generator's worker reads them."""
    pool = await db.connect(env.database_url, max_size=1)
    redis = aioredis.from_url(env.redis_url)
    try:
        yield JobLifecycle(pool, redis, EventLog(redis, 600), JobQueue(redis))
    finally:
        await redis.aclose()
        await pool.close()


@pytest.mark.parametrize(
    ("fields", "stored"),
    [
        ({}, CacheMode.USE),
        ({"cache": USE}, CacheMode.USE),
        ({"cache": REFRESH}, CacheMode.REFRESH),
        ({"cache": OFF}, CacheMode.OFF),
        ({"skip_cache": True}, CacheMode.REFRESH),
        ({"skip_cache": True, "cache": REFRESH}, CacheMode.REFRESH),
    ],
    ids=["unspecified", "use", "refresh", "off", "skip-cache", "skip-cache-and-refresh"],
)
async def test_create_job_records_its_cache_mode_for_the_worker(
    images: image_service_pb2_grpc.ImageServiceStub,
    lifecycle: JobLifecycle,
    fields: dict[str, Any],
    stored: CacheMode,
) -> None:
    job = (await create(images, spec(), **fields)).job
    assert job.status == types_pb2.JOB_STATUS_QUEUED
    assert (await lifecycle.get(job.id)).cache_mode is stored


@pytest.mark.parametrize("mode", [REFRESH, OFF], ids=["refresh", "off"])
async def test_create_job_with_cache_refresh_or_off_does_not_read_a_cached_spec(
    images: image_service_pb2_grpc.ImageServiceStub,
    cache: cache_service_pb2_grpc.CacheServiceStub,
    objects: LocalStore,
    mode: int,
) -> None:
    request_spec = spec()
    await store_result(cache, objects, request_spec)
    assert (await create(images, request_spec, cache=USE)).job.cache_hit
    job = (await create(images, request_spec, cache=mode)).job
    assert job.status == types_pb2.JOB_STATUS_QUEUED
    assert not job.cache_hit and job.cost_cents >= 1


async def test_create_job_with_an_unknown_cache_mode_is_invalid_naming_cache(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(images, spec(), cache=7)
    assert violations(caught.value) == ["cache"]


@pytest.mark.parametrize(("mode", "name"), [(USE, "use"), (OFF, "off")], ids=["use", "off"])
async def test_skip_cache_with_another_cache_mode_is_invalid_naming_skip_cache(
    images: image_service_pb2_grpc.ImageServiceStub, http: httpx.AsyncClient, mode: int, name: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(images, spec(), skip_cache=True, cache=mode)
    assert violations(caught.value) == ["skip_cache"]
    body = {"prompt": "a windmill", "width": 64, "height": 64, "skip_cache": True, "cache": name}
    response = await http.post("/api/generate/text-to-image", json=body)
    assert response.status_code == 422
    assert [v["field"] for v in response.json()["error"]["field_violations"]] == ["skip_cache"]


async def test_an_idempotency_key_replays_only_for_the_same_cache_mode(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    key = f"retry-{uuid.uuid4()}"
    request_spec = spec()
    first = await create(images, request_spec, idempotency_key=key, skip_cache=True)
    again = await create(images, request_spec, idempotency_key=key, cache=REFRESH)
    assert again.job.id == first.job.id  # skip_cache is cache=refresh: the same request
    for mode in (USE, OFF):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(images, request_spec, idempotency_key=key, cache=mode)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


# HTTP facade


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"width": 70}, "width"),
        ({"model": "sdxl-turbo"}, "model"),
        ({"num_variants": 50}, "num_variants"),
    ],
    ids=["empty-prompt", "width", "model", "variants"],
)
async def test_http_generate_with_a_bad_field_answers_422_naming_it(
    http: httpx.AsyncClient, change: dict[str, Any], field: str
) -> None:
    body = {"prompt": "a windmill", "width": 64, "height": 64, "steps": 4, **change}
    response = await http.post("/api/generate/text-to-image", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in error["field_violations"]] == [field]


async def test_http_generate_queues_a_job_and_replays_it_for_the_same_idempotency_key(
    http: httpx.AsyncClient, images: image_service_pb2_grpc.ImageServiceStub
) -> None:
    body = {"prompt": f"a windmill {uuid.uuid4().hex}", "width": 64, "height": 64, "steps": 4}
    headers = {"Idempotency-Key": f"http-{uuid.uuid4()}"}
    first = await http.post("/api/generate/text-to-image", json=body, headers=headers)
    assert first.status_code == 201
    created = first.json()
    assert created["status"] == "queued"
    assert created["cached_hit"] is False
    assert isinstance(created["seed"], int)
    assert created["est_cost_cents"] == created["cost_cents"] == 1

    again = await http.post("/api/generate/text-to-image", json=body, headers=headers)
    assert again.status_code == 200
    assert again.json()["run_id"] == created["run_id"]
    assert again.json()["idempotent_replay"] is True

    status = await http.get(f"/api/status/{created['run_id']}")
    assert status.status_code == 200
    assert status.json()["status"] == "queued"
    got = await images.GetJob(image_service_pb2.GetJobRequest(job_id=created["run_id"]))
    assert got.job.spec.seed == created["seed"]


async def test_http_generate_of_a_cached_spec_is_a_free_hit(
    http: httpx.AsyncClient, cache: cache_service_pb2_grpc.CacheServiceStub, objects: LocalStore
) -> None:
    prompt = f"a windmill {uuid.uuid4().hex}"
    stored = await store_result(cache, objects, spec(prompt, seed=5, num_variants=2))
    body = {"prompt": prompt, "seed": 5, "width": 64, "height": 64, "steps": 4, "num_variants": 2}
    response = await http.post("/api/generate/text-to-image", json=body)
    assert response.status_code == 201
    job = response.json()
    assert job["status"] == "completed"
    assert job["cached_hit"] is True
    assert job["cost_cents"] == 0
    assert [a["key"] for a in job["artifacts"]] == [a.key for a in stored]
    assert [a["semantic_score"] for a in job["artifacts"]] == [30.0, 29.0]


async def test_http_generate_cache_use_hits_while_refresh_and_off_render(
    http: httpx.AsyncClient, cache: cache_service_pb2_grpc.CacheServiceStub, objects: LocalStore
) -> None:
    prompt = f"a windmill {uuid.uuid4().hex}"
    await store_result(cache, objects, spec(prompt, seed=5))
    body = {"prompt": prompt, "seed": 5, "width": 64, "height": 64, "steps": 4}
    outcomes = {}
    for mode in ("use", "refresh", "off"):
        response = await http.post("/api/generate/text-to-image", json={**body, "cache": mode})
        assert response.status_code == 201, response.text
        outcomes[mode] = (response.json()["status"], response.json()["cached_hit"])
    assert outcomes == {
        "use": ("completed", True),
        "refresh": ("queued", False),
        "off": ("queued", False),
    }


@pytest.mark.parametrize(
    "value",
    ["sometimes", "USE", " use", "skip", "", 1, True, ["use"], {"mode": "use"}],
    ids=["word", "upper", "space", "skip", "empty", "number", "bool", "array", "object"],
)
async def test_http_generate_with_a_bad_cache_mode_answers_422_naming_cache(
    http: httpx.AsyncClient, value: Any
) -> None:
    body = {"prompt": "a windmill", "width": 64, "height": 64, "cache": value}
    response = await http.post("/api/generate/text-to-image", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in error["field_violations"]] == ["cache"]


async def test_http_cache_lookup_misses_then_finds_a_stored_result_with_urls(
    http: httpx.AsyncClient, cache: cache_service_pb2_grpc.CacheServiceStub, objects: LocalStore
) -> None:
    prompt = f"a lantern {uuid.uuid4().hex}"
    body = {"prompt": prompt, "seed": 5, "width": 64, "height": 64, "steps": 4, "num_variants": 2}
    assert (await http.post("/api/cache/lookup", json=body)).json() == {"hit": False}
    stored = await store_result(cache, objects, spec(prompt, seed=5, num_variants=2))
    hit = (await http.post("/api/cache/lookup", json=body)).json()
    assert hit["hit"] is True and hit["seed"] == 5 and hit["hit_count"] == 1
    assert [a["key"] for a in hit["artifacts"]] == [a.key for a in stored]
    download = await http.get(hit["artifacts"][0]["url"])
    assert download.status_code == 200 and download.content == await objects.get(stored[0].key)
    agnostic = (
        await http.post("/api/cache/lookup", json={**body, "seed": 6, "seed_agnostic": True})
    ).json()
    assert agnostic["hit"] is True and agnostic["seed"] == 5


async def test_http_lists_jobs_newest_first_with_their_resolved_request(
    http: httpx.AsyncClient,
) -> None:
    made = []
    for width in (64, 72, 80):
        body = {"prompt": f"a listed job {uuid.uuid4().hex}", "width": width, "height": 64}
        made.append((await http.post("/api/generate/text-to-image", json=body)).json())
    page = (await http.get("/api/jobs", params={"page_size": 2})).json()
    assert [j["run_id"] for j in page["jobs"]] == [made[2]["run_id"], made[1]["run_id"]]
    assert page["jobs"][0]["request"]["width"] == 80
    assert page["jobs"][0]["request"]["steps"] == 20  # the model's default, resolved
    after = (
        await http.get("/api/jobs", params={"page_size": 1, "page_token": page["next_page_token"]})
    ).json()
    assert [j["run_id"] for j in after["jobs"]] == [made[0]["run_id"]]
    bad = await http.get("/api/jobs", params={"page_size": "many"})
    assert bad.status_code == 422
    assert [v["field"] for v in bad.json()["error"]["field_violations"]] == ["page_size"]


async def test_http_status_of_an_unknown_run_is_404(http: httpx.AsyncClient) -> None:
    response = await http.get(f"/api/status/{uuid.uuid4()}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "NOT_FOUND"


async def test_http_status_of_a_malformed_run_id_is_422(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/status/not-a-uuid")
    assert response.status_code == 422
    assert [v["field"] for v in response.json()["error"]["field_violations"]] == ["job_id"]


async def test_openapi_is_json_describing_the_http_routes(http: httpx.AsyncClient) -> None:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.text)
    assert document["openapi"].startswith("3.")
    for path in (
        "/api/generate/text-to-image",
        "/api/status/{run_id}",
        "/api/status/stream/{run_id}",
        "/api/cost/estimate",
        "/api/cache/lookup",
        "/api/uploads/presign",
    ):
        assert path in document["paths"], path
    schema = document["components"]["schemas"]["GenerateRequest"]["properties"]
    for name in ("prompt", "fibo_json", "model", "seed", "width", "height", "num_variants"):
        assert name in schema


async def test_files_are_served_only_with_a_valid_unexpired_signature(
    http: httpx.AsyncClient, objects: LocalStore
) -> None:
    data = png((1, 2, 3))
    key = content_key(data, "images", "png")
    await objects.put(key, data, "image/png")
    url = objects.download_url(key)
    good = await http.get(url)
    assert good.status_code == 200 and good.content == data

    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    bad_signature = {**query, "signature": "0" * 64}
    later = {**query, "expires": str(int(query["expires"]) + 60)}
    expired_at = 1_000_000_000
    expired = {"expires": str(expired_at), "signature": objects.signature("GET", key, expired_at)}
    for params in (bad_signature, later, expired, {"expires": query["expires"]}):
        response = await http.get(f"{parts.path}?{urlencode(params)}")
        assert response.status_code == 403, params
    other = await http.get(f"/files/images/00/{'0' * 64}.png?{parts.query}")
    assert other.status_code == 403
    # Unsigned, a file is the key owner's only: an image no job of this tenant made is unknown.
    assert (await http.get(parts.path)).status_code == 404
    assert (await http.get(parts.path, headers={"Authorization": ""})).status_code == 401


# Health and reflection


async def test_health_reports_image_and_cost_services_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in (IMAGE_SERVICE, COST_SERVICE, ""):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_reflection_lists_image_and_cost_services(channel: grpc.aio.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    response = await call.read()
    call.cancel()
    names = {s.name for s in response.list_services_response.service}
    assert {IMAGE_SERVICE, COST_SERVICE, "grpc.health.v1.Health"} <= names
