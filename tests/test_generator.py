"""The generator with its queue worker, the evaluator, the cache and the gateway, in process on
127.0.0.1 with the tiny models: direct Generate streams, jobs run by the worker end to end,
cancelling, retries after a worker-side failure, and the cache hit that follows a job."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen.v1 import (
    events_pb2,
    generator_service_pb2,
    generator_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    types_pb2,
)
from PIL import Image

from services.common import db
from services.common.events import EventLog, stream_key
from services.common.queue import DEAD_LETTERS, JobQueue
from services.common.settings import ROOT, CommonSettings, EvaluatorSettings, GeneratorSettings
from services.jobs.lifecycle import JobLifecycle
from services.jobs.records import JobRecord, JobStatus
from tests.conftest import Mesh, ServiceEnv, start_in_process
from tests.helpers import queued_job, stored_upload, violations

WAIT = 30.0
TINY = json.loads((ROOT / "deploy" / "models" / "tiny.json").read_text())
TINY_SD = next(m for m in TINY["models"] if m["id"] == "tiny-sd")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"), workers=1)
    yield started
    await started.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gateway_channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(
        mesh.addr("gateway"), interceptors=mesh.auth_interceptors
    ) as opened:
        yield opened


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def generator_channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.addr("generator")) as opened:
        yield opened


@pytest.fixture
def images(gateway_channel: grpc.aio.Channel) -> image_service_pb2_grpc.ImageServiceStub:
    return image_service_pb2_grpc.ImageServiceStub(gateway_channel)


@pytest.fixture
def generator(
    generator_channel: grpc.aio.Channel,
) -> generator_service_pb2_grpc.GeneratorServiceStub:
    return generator_service_pb2_grpc.GeneratorServiceStub(generator_channel)


@pytest_asyncio.fixture(loop_scope="session")
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=WAIT) as client:
        yield client


def spec(prompt: str = "", seed: int | None = 1234, **fields: Any) -> types_pb2.GenerationSpec:
    """A 64x64, 4-step tiny-sd request with a prompt no other test uses."""
    values: dict[str, Any] = {
        "text": prompt or f"a lighthouse on a cliff {uuid.uuid4().hex}",
        "width_px": 64,
        "height_px": 64,
        "steps": 4,
    }
    values.update(fields)
    message = types_pb2.GenerationSpec(**values)
    if seed is not None:
        message.seed = seed
    return message


def event_order(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


class Stream:
    """A server stream read into a queue; None marks its end, an AioRpcError its failure."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for response in self.call:
                await self.queue.put(response)
        except grpc.aio.AioRpcError as error:
            await self.queue.put(error)
            return
        await self.queue.put(None)

    async def next(self) -> Any:
        return await asyncio.wait_for(self.queue.get(), WAIT)

    async def rest(self) -> list[Any]:
        """Every message up to the end of the stream, which must end cleanly."""
        items = []
        while (item := await self.next()) is not None:
            assert not isinstance(item, grpc.aio.AioRpcError), item
            items.append(item)
        return items

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.call.cancel()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def generate(
    generator: generator_service_pb2_grpc.GeneratorServiceStub,
    request_spec: types_pb2.GenerationSpec,
) -> Stream:
    return Stream(generator.Generate(generator_service_pb2.GenerateRequest(spec=request_spec)))


def watch(images: image_service_pb2_grpc.ImageServiceStub, job_id: str) -> Stream:
    return Stream(images.WatchJob(image_service_pb2.WatchJobRequest(job_id=job_id)))


async def job_events(
    images: image_service_pb2_grpc.ImageServiceStub, job_id: str
) -> list[events_pb2.JobEvent]:
    """The job's events from the start until its final event ends the stream."""
    async with watch(images, job_id) as stream:
        return [response.event for response in await stream.rest()]


async def artifacts_of(
    generator: generator_service_pb2_grpc.GeneratorServiceStub,
    request_spec: types_pb2.GenerationSpec,
) -> list[types_pb2.Artifact]:
    async with generate(generator, request_spec) as stream:
        responses = await stream.rest()
    return [r.artifact.artifact for r in responses if r.WhichOneof("event") == "artifact"]


async def download_sha256(http: httpx.AsyncClient, artifact: types_pb2.Artifact) -> str:
    response = await http.get(artifact.url)
    assert response.status_code == 200
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    return hashlib.sha256(response.content).hexdigest()


def kinds(events: list[events_pb2.JobEvent]) -> list[str]:
    return [e.WhichOneof("payload") or "" for e in events]


# GeneratorService, without the queue


async def test_generate_streams_progress_for_every_step_of_the_batched_variants_then_images(
    generator: generator_service_pb2_grpc.GeneratorServiceStub,
) -> None:
    async with generate(generator, spec(num_variants=2)) as stream:
        responses = await stream.rest()
    kinds = [r.WhichOneof("event") for r in responses]
    progress = [r.progress for r in responses if r.WhichOneof("event") == "progress"]
    # Both variants share one batch: their steps advance together, each step reported in order
    # (the steps of the two rows may arrive as one event or two).
    steps = [p.step for p in progress]
    assert sorted(set(steps)) == [1, 2, 3, 4] and steps == sorted(steps)
    assert all(p.total_steps == 4 for p in progress)
    percents = [p.percent for p in progress]
    assert percents == sorted(percents) and percents[-1] == pytest.approx(100.0)

    artifacts = [r.artifact.artifact for r in responses if r.WhichOneof("event") == "artifact"]
    assert sorted((a.variant_index, a.seed) for a in artifacts) == [(0, 1234), (1, 1235)]
    assert all((a.width_px, a.height_px) == (64, 64) for a in artifacts)
    # The images come once every step is done.
    assert kinds[-2:] == ["artifact", "artifact"] and "artifact" not in kinds[:-2]


async def test_generate_stores_the_pngs_under_their_content_addressed_keys(
    generator: generator_service_pb2_grpc.GeneratorServiceStub, http: httpx.AsyncClient
) -> None:
    (artifact,) = await artifacts_of(generator, spec())
    digest = await download_sha256(http, artifact)
    assert digest == artifact.sha256
    assert artifact.key == f"images/{digest[:2]}/{digest}.png"


async def test_generate_is_byte_identical_for_the_same_request_and_differs_for_another_seed(
    generator: generator_service_pb2_grpc.GeneratorServiceStub, http: httpx.AsyncClient
) -> None:
    request_spec = spec(num_variants=2)
    first = await artifacts_of(generator, request_spec)
    second = await artifacts_of(generator, request_spec)
    first_bytes = [await download_sha256(http, a) for a in first]
    second_bytes = [await download_sha256(http, a) for a in second]
    assert first_bytes == second_bytes == [a.sha256 for a in first]
    assert first_bytes[0] != first_bytes[1]  # variant 1 has its own seed

    other_seed = spec(request_spec.text, seed=999, num_variants=2)
    other = await artifacts_of(generator, other_seed)
    assert {a.sha256 for a in other}.isdisjoint(first_bytes)


async def test_generate_variant_i_is_the_image_of_seed_plus_i_alone(
    generator: generator_service_pb2_grpc.GeneratorServiceStub,
) -> None:
    prompt = f"a red fox {uuid.uuid4().hex}"
    pair = await artifacts_of(generator, spec(prompt, seed=40, num_variants=2))
    (alone,) = await artifacts_of(generator, spec(prompt, seed=41))
    assert pair[1].sha256 == alone.sha256


async def test_concurrent_generate_calls_give_the_same_bytes_as_solo_ones(
    generator: generator_service_pb2_grpc.GeneratorServiceStub,
) -> None:
    first, second = spec(num_variants=2), spec(seed=77, num_variants=2, width_px=72)
    solo = [await artifacts_of(generator, s) for s in (first, second)]
    together = await asyncio.gather(*(artifacts_of(generator, s) for s in (first, second)))
    assert [[a.sha256 for a in run] for run in together] == [
        [a.sha256 for a in run] for run in solo
    ]


async def test_generate_without_a_seed_is_invalid_naming_spec_seed(
    generator: generator_service_pb2_grpc.GeneratorServiceStub,
) -> None:
    async with generate(generator, spec(seed=None)) as stream:
        error = await stream.next()
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error) == ["spec.seed"]


async def test_generate_with_too_many_steps_is_invalid_naming_spec_steps(
    generator: generator_service_pb2_grpc.GeneratorServiceStub,
) -> None:
    async with generate(generator, spec(steps=TINY_SD["max_steps"] + 1)) as stream:
        error = await stream.next()
    assert isinstance(error, grpc.aio.AioRpcError)
    assert violations(error) == ["spec.steps"]


async def test_cancelling_a_generate_stream_frees_the_device_for_the_next_request(
    generator: generator_service_pb2_grpc.GeneratorServiceStub,
) -> None:
    # One 512x512 variant of 100 steps takes seconds; the small request after it must not wait.
    big = spec(width_px=512, height_px=512, steps=TINY_SD["max_steps"], num_variants=2)
    async with generate(generator, big) as stream:
        first = await stream.next()
        assert first.WhichOneof("event") == "progress"
    started = time.perf_counter()
    (artifact,) = await artifacts_of(generator, spec())
    assert artifact.sha256
    assert time.perf_counter() - started < 2.0


async def test_list_models_lists_tiny_sd_as_the_default(
    generator: generator_service_pb2_grpc.GeneratorServiceStub,
) -> None:
    response = await generator.ListModels(generator_service_pb2.ListModelsRequest())
    models = {m.id: m for m in response.models}
    assert TINY["default"] == "tiny-sd"
    tiny = models["tiny-sd"]
    assert tiny.is_default
    assert [m.id for m in response.models if m.is_default] == ["tiny-sd"]
    assert tiny.family == "sd"
    assert (tiny.default_width_px, tiny.default_height_px) == (256, 256)
    assert tiny.default_steps == TINY_SD["default_steps"]
    assert tiny.max_steps == TINY_SD["max_steps"]
    assert (tiny.min_size_px, tiny.max_size_px, tiny.size_multiple_px) == (64, 1024, 8)
    assert tiny.price_multiplier == 1.0


async def test_generator_and_evaluator_report_serving(mesh: Mesh) -> None:
    for name, service in (
        ("generator", "imagegen.v1.GeneratorService"),
        ("evaluator", "imagegen.v1.EvaluatorService"),
    ):
        async with grpc.aio.insecure_channel(mesh.addr(name)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            response = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING, name


# Jobs through the queue worker


@dataclass(frozen=True)
class FinishedJob:
    spec: types_pb2.GenerationSpec
    job: types_pb2.Job
    events: list[events_pb2.JobEvent]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def finished_job(gateway_channel: grpc.aio.Channel) -> FinishedJob:
    """A two-variant job created through ImageService and run to its end by the worker."""
    images = image_service_pb2_grpc.ImageServiceStub(gateway_channel)
    request_spec = spec(num_variants=2)
    created = await images.CreateJob(image_service_pb2.CreateJobRequest(spec=request_spec))
    assert created.job.status == types_pb2.JOB_STATUS_QUEUED
    events = await job_events(images, created.job.id)
    job = (await images.GetJob(image_service_pb2.GetJobRequest(job_id=created.job.id))).job
    return FinishedJob(request_spec, job, events)


async def test_a_created_job_is_run_by_the_worker_to_completed_with_scored_variants(
    finished_job: FinishedJob, http: httpx.AsyncClient
) -> None:
    job = finished_job.job
    assert job.status == types_pb2.JOB_STATUS_COMPLETED
    assert job.progress_percent == 100
    assert job.attempts == 1
    assert not job.cache_hit and job.cost_cents >= 1
    assert not job.error
    assert len(job.artifacts) == 2
    assert sorted(a.variant_index for a in job.artifacts) == [0, 1]
    for artifact in job.artifacts:
        assert artifact.seed == job.spec.seed + artifact.variant_index
        assert artifact.evaluation.HasField("clip_score")
        assert artifact.evaluation.clip_score >= 0
        assert artifact.evaluation.HasField("lpips_diversity")
        assert artifact.evaluation.lpips_diversity > 0
        assert await download_sha256(http, artifact) == artifact.sha256
    primaries = [a for a in job.artifacts if a.is_primary]
    assert len(primaries) == 1
    assert job.artifacts[0].is_primary  # primary first
    best = max(a.evaluation.clip_score for a in job.artifacts)
    assert primaries[0].evaluation.clip_score == best


async def test_a_job_streams_every_step_each_image_its_scores_and_a_final_event_last(
    finished_job: FinishedJob,
) -> None:
    events = finished_job.events
    ids = [event_order(e.id) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(e.job_id == finished_job.job.id for e in events)

    # The two variants share a batch: every step is reported, in order.
    steps = [e.progress.step for e in events if e.HasField("progress")]
    assert sorted(set(steps)) == [1, 2, 3, 4] and steps == sorted(steps)
    assert all(e.progress.total_steps == 4 for e in events if e.HasField("progress"))

    order = kinds(events)
    assert order.count("artifact") == 2
    assert order.count("evaluation") == 1
    assert order.count("final") == 1 and order[-1] == "final"
    assert "error" not in order
    last_progress = max(i for i, kind in enumerate(order) if kind == "progress")
    assert last_progress < order.index("evaluation") < order.index("final")
    assert max(i for i, kind in enumerate(order) if kind == "artifact") < order.index("evaluation")

    statuses = [e.status.status for e in events if e.HasField("status")]
    assert statuses[:2] == [types_pb2.JOB_STATUS_QUEUED, types_pb2.JOB_STATUS_RUNNING]
    assert set(statuses[2:]) == {types_pb2.JOB_STATUS_RUNNING}  # stage changes
    stages = [e.status.stage for e in events if e.HasField("status")][2:]
    # The stages, in the order the job went through them (the model was loaded at start).
    seen = list(dict.fromkeys(stages))
    expected = ["encoding_prompt", "denoising", "decoding", "encoding_png", "uploading"]
    assert seen == [*expected, "evaluating"]

    evaluation = events[order.index("evaluation")].evaluation
    assert len(evaluation.models) >= 2
    assert evaluation.artifacts[0].is_primary
    assert all(a.evaluation.HasField("clip_score") for a in evaluation.artifacts)

    final = events[-1].final.job
    assert final.status == types_pb2.JOB_STATUS_COMPLETED
    # Events carry keys; the gateway signs a fresh download URL into every artifact it streams.
    streamed_artifacts = [
        *(e.artifact.artifact for e in events if e.HasField("artifact")),
        *evaluation.artifacts,
        *final.artifacts,
    ]
    assert all(a.url.startswith("http") and a.key in a.url for a in streamed_artifacts)
    assert sorted(a.sha256 for a in final.artifacts) == sorted(
        a.sha256 for a in finished_job.job.artifacts
    )
    streamed = {e.artifact.artifact.sha256 for e in events if e.HasField("artifact")}
    assert streamed == {a.sha256 for a in finished_job.job.artifacts}


async def test_a_job_makes_the_same_bytes_as_a_direct_generate(
    finished_job: FinishedJob, generator: generator_service_pb2_grpc.GeneratorServiceStub
) -> None:
    direct = await artifacts_of(generator, finished_job.spec)
    by_variant = {a.variant_index: a.sha256 for a in finished_job.job.artifacts}
    assert {a.variant_index: a.sha256 for a in direct} == by_variant


async def test_resubmitting_a_finished_spec_is_a_cache_hit_with_the_same_images(
    finished_job: FinishedJob, images: image_service_pb2_grpc.ImageServiceStub
) -> None:
    again = await images.CreateJob(image_service_pb2.CreateJobRequest(spec=finished_job.spec))
    job = again.job
    assert job.id != finished_job.job.id
    assert job.status == types_pb2.JOB_STATUS_COMPLETED
    assert job.cache_hit
    assert job.cost_cents == 0
    assert [(a.variant_index, a.sha256, a.is_primary) for a in job.artifacts] == [
        (a.variant_index, a.sha256, a.is_primary) for a in finished_job.job.artifacts
    ]
    assert [a.evaluation.clip_score for a in job.artifacts] == [
        a.evaluation.clip_score for a in finished_job.job.artifacts
    ]


async def test_two_hundred_watchers_of_one_running_job_each_receive_every_event_once(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    created = await images.CreateJob(
        image_service_pb2.CreateJobRequest(spec=spec(steps=12), skip_cache=True)
    )
    streams = [watch(images, created.job.id) for _ in range(200)]
    try:
        seen = [[r.event.id for r in await stream.rest()] for stream in streams]
    finally:
        for stream in streams:
            await stream.__aexit__()
    events = await job_events(images, created.job.id)
    assert kinds(events).count("progress") == 12 and kinds(events)[-1] == "final"
    assert all(ids == [e.id for e in events] for ids in seen)


async def test_watching_after_the_final_event_ends_at_once_with_nothing_more(
    images: image_service_pb2_grpc.ImageServiceStub, http: httpx.AsyncClient
) -> None:
    created = await images.CreateJob(image_service_pb2.CreateJobRequest(spec=spec()))
    last = (await job_events(images, created.job.id))[-1].id
    started = time.monotonic()
    resumed = images.WatchJob(
        image_service_pb2.WatchJobRequest(job_id=created.job.id, after_event_id=last)
    )
    async with Stream(resumed) as stream:
        assert await stream.rest() == []
    assert time.monotonic() - started < 2.0
    response = await http.get(
        f"/api/status/stream/{created.job.id}", headers={"Last-Event-ID": last}
    )
    assert response.status_code == 204


@contextlib.asynccontextmanager
async def lifecycle_of(env: ServiceEnv) -> AsyncIterator[tuple[JobLifecycle, Any, Any]]:
    """A JobLifecycle on the module's stores (as a second gateway would have), with its pool
    and Redis client."""
    pool = await db.connect(env.database_url, max_size=2)
    redis = aioredis.from_url(env.redis_url)
    try:
        yield JobLifecycle(pool, redis, EventLog(redis, 600), JobQueue(redis)), pool, redis
    finally:
        await redis.aclose()
        await pool.close()


async def test_a_queued_job_whose_queue_entry_was_lost_is_queued_again_and_runs(
    images: image_service_pb2_grpc.ImageServiceStub, env: ServiceEnv
) -> None:
    async with lifecycle_of(env) as (lifecycle, _, redis):
        # Admitted while Redis was away: the row exists, the queue entry does not.
        job = queued_job()
        await lifecycle.admit(job)
        await JobQueue(redis).discard(job.id)
        events = await job_events(images, job.id)
    assert events[-1].final.job.status == types_pb2.JOB_STATUS_COMPLETED
    assert events[-1].final.job.attempts == 1


async def admitted_off_queue(lifecycle: JobLifecycle, redis: aioredis.Redis) -> JobRecord:
    """A queued job with no queue entry (on stores no worker reads: see `private_env`)."""
    job = queued_job()
    await lifecycle.admit(job)
    assert await JobQueue(redis).discard(job.id)
    return job


async def test_a_job_that_ended_while_redis_was_away_gets_its_final_event_from_the_reconciler(
    private_env: ServiceEnv,
) -> None:
    async with lifecycle_of(private_env) as (lifecycle, pool, redis):
        job = await admitted_off_queue(lifecycle, redis)
        cancelled = await lifecycle.cancel(job.id)
        assert cancelled.status.value == "cancelled"
        # As if Redis had been away when it ended: its stream holds no final event.
        await redis.delete(stream_key(job.id))
        await pool.execute(
            "UPDATE jobs SET final_announced = false, updated_at = now() - interval '1 minute'"
            " WHERE id = $1",
            uuid.UUID(job.id),
        )
        assert job.id in await lifecycle.announce_missing_finals()
        events = await EventLog(redis, 600).read(job.id, "0-0")
        assert [e.WhichOneof("payload") for e in events] == ["final"]
        assert events[0].final.job.status == types_pb2.JOB_STATUS_CANCELLED
        # Announced once: the next round finds nothing to do.
        assert job.id not in await lifecycle.announce_missing_finals()


async def test_a_running_job_is_held_by_one_attempt_until_its_lease_runs_out(
    private_env: ServiceEnv,
) -> None:
    async with lifecycle_of(private_env) as (lifecycle, pool, redis):
        job = await admitted_off_queue(lifecycle, redis)
        first = await lifecycle.start_attempt(job.id)
        assert first is not None and first.number == 1
        # A second delivery of the same job (a duplicate entry) finds it held ...
        assert await lifecycle.start_attempt(job.id) is None
        assert await lifecycle.renew(first)
        # ... until the lease of the first runs out (its worker died): then it is taken over,
        await pool.execute(
            "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(job.id),
        )
        second = await lifecycle.start_attempt(job.id)
        assert second is not None and second.number == 2
        # and the first attempt, come back to life, can change nothing.
        assert not await lifecycle.renew(first)
        assert not await lifecycle.complete(first)
        assert await lifecycle.complete(second)
        assert not await lifecycle.complete(second)  # completed once
        assert await lifecycle.start_attempt(job.id) is None
        ended = await lifecycle.get(job.id)
    assert ended.status is JobStatus.COMPLETED and ended.attempts == 2
    assert ended.cost_cents == 1


async def test_cancelling_a_running_job_ends_it_cancelled_before_all_steps_ran(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    request_spec = spec(width_px=128, height_px=128, steps=TINY_SD["max_steps"], num_variants=8)
    created = await images.CreateJob(
        image_service_pb2.CreateJobRequest(spec=request_spec, skip_cache=True)
    )
    job_id = created.job.id
    async with watch(images, job_id) as stream:
        while not (await stream.next()).event.HasField("progress"):
            pass
        cancelled = await images.CancelJob(image_service_pb2.CancelJobRequest(job_id=job_id))
        assert cancelled.job.status in (
            types_pb2.JOB_STATUS_RUNNING,
            types_pb2.JOB_STATUS_CANCELLED,
        )
        rest = [response.event for response in await stream.rest()]
    assert kinds(rest)[-1] == "final"
    assert rest[-1].final.job.status == types_pb2.JOB_STATUS_CANCELLED
    steps_run = 1 + sum(1 for e in rest if e.HasField("progress"))
    assert steps_run < TINY_SD["max_steps"] * 8
    assert "evaluation" not in kinds(rest)

    job = (await images.GetJob(image_service_pb2.GetJobRequest(job_id=job_id))).job
    assert job.status == types_pb2.JOB_STATUS_CANCELLED
    assert job.attempts == 1


async def test_the_worker_takes_the_next_job_after_a_cancelled_one(
    images: image_service_pb2_grpc.ImageServiceStub,
) -> None:
    created = await images.CreateJob(image_service_pb2.CreateJobRequest(spec=spec()))
    events = await job_events(images, created.job.id)
    assert events[-1].final.job.status == types_pb2.JOB_STATUS_COMPLETED


# Failure: keep this last, it stops the evaluator (and starts it again afterwards).


async def test_a_job_failing_for_a_reason_retrying_cannot_fix_fails_on_its_first_attempt(
    images: image_service_pb2_grpc.ImageServiceStub, env: ServiceEnv
) -> None:
    settings = env.settings(CommonSettings)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (uuid.uuid4().int % 256, 40, 90)).save(buffer, format="PNG")
    key = await stored_upload(env, buffer.getvalue())
    request_spec = spec(width_px=256, height_px=256, steps=60)
    request_spec.guidance_images.add(key=key, role=types_pb2.GUIDANCE_ROLE_REFERENCE)
    created = await images.CreateJob(
        image_service_pb2.CreateJobRequest(spec=request_spec, skip_cache=True)
    )
    # The upload disappears after admission (an expiry rule removed it): the evaluator cannot
    # read the reference, and no retry can bring it back.
    (settings.objects_root() / key).unlink()
    events = await job_events(images, created.job.id)
    errors = [e.error for e in events if e.HasField("error")]
    assert [e.retrying for e in errors] == [False]  # the evaluator's INVALID_ARGUMENT
    final = events[-1].final.job
    assert final.status == types_pb2.JOB_STATUS_FAILED and final.attempts == 1


async def test_a_job_whose_evaluation_fails_is_retried_then_failed_and_dead_lettered(
    mesh: Mesh, env: ServiceEnv, images: image_service_pb2_grpc.ImageServiceStub
) -> None:
    from services.evaluator.service import start as start_evaluator

    max_attempts = GeneratorSettings().job_max_attempts
    redis = aioredis.from_url(env.redis_url)
    port = mesh.services["evaluator"].port
    await mesh.services["evaluator"].stop(0)
    try:
        dead_before = await redis.xlen(DEAD_LETTERS)
        created = await images.CreateJob(
            image_service_pb2.CreateJobRequest(spec=spec(), skip_cache=True)
        )
        events = await job_events(images, created.job.id)

        errors = [e.error for e in events if e.HasField("error")]
        assert [e.retrying for e in errors] == [True] * (max_attempts - 1) + [False]
        assert all(e.message for e in errors)
        statuses = [
            (e.status.status, e.status.attempt)
            for e in events
            if e.HasField("status") and e.status.attempt
        ]
        statuses = [s for i, s in enumerate(statuses) if i == 0 or s != statuses[i - 1]]
        running, queued = types_pb2.JOB_STATUS_RUNNING, types_pb2.JOB_STATUS_QUEUED
        # Each attempt runs; each retried one goes back to the queue before the next.
        assert (
            statuses
            == [s for n in range(1, max_attempts + 1) for s in [(running, n), (queued, n)]][:-1]
        )
        assert kinds(events)[-1] == "final"
        assert "evaluation" not in kinds(events)
        final = events[-1].final.job
        assert final.status == types_pb2.JOB_STATUS_FAILED
        assert final.error

        job = (await images.GetJob(image_service_pb2.GetJobRequest(job_id=created.job.id))).job
        assert job.status == types_pb2.JOB_STATUS_FAILED
        assert job.attempts == max_attempts
        assert job.cost_cents == 0  # only completed jobs are charged
        assert job.error == errors[-1].message

        dead = await redis.xrange(DEAD_LETTERS, count=1000)
        assert await redis.xlen(DEAD_LETTERS) == dead_before + 1
        assert dead[-1][1][b"job_id"].decode() == created.job.id
    finally:
        await redis.aclose()
        mesh.services["evaluator"] = await start_evaluator(
            env.settings(EvaluatorSettings, listen_addr=f"127.0.0.1:{port}")
        )
