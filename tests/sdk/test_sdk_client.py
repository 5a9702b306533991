"""The Python SDK against the real mesh (tests/sdk/conftest.py): every behaviour over both
transports, with the async client and the sync one.

The sync Client runs its calls on a thread of its own; here they are called through
`asyncio.to_thread`, since the mesh serves from this test's event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from imagegen import (
    AsyncClient,
    CacheHit,
    Client,
    ControlNet,
    Event,
    Final,
    GuidanceImage,
    InvalidArgument,
    Job,
    JobFailed,
    JobStatus,
    NotFound,
    Progress,
    Status,
    Unauthenticated,
    Unsupported,
    grpc_transport,
    http_transport,
)
from PIL import Image

from tests.conftest import Mesh
from tests.helpers import png_bytes
from tests.sdk.proxy import TcpProxy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = {"width": 64, "height": 64, "steps": 4}
WAIT = 60.0


class Api:
    """One SDK client, async or sync, called the same way from the tests."""

    def __init__(self, client: AsyncClient | Client) -> None:
        self.client = client

    @property
    def transport(self) -> str:
        return self.client.transport

    @property
    def sync(self) -> bool:
        return isinstance(self.client, Client)

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        call = getattr(self.client, method)
        if self.sync:
            return await asyncio.to_thread(call, *args, **kwargs)
        return await asyncio.wait_for(call(*args, **kwargs), WAIT)

    async def events(
        self, job_id: str, after: str | None = None, each: Callable[[Event], None] | None = None
    ) -> list[Event]:
        """The job's stream read to its end; `each` sees every event as it arrives."""
        seen: list[Event] = []

        def keep(event: Event) -> None:
            seen.append(event)
            if each is not None:
                each(event)

        if isinstance(self.client, Client):
            client = self.client

            def read() -> None:
                for event in client.stream(job_id, after):
                    keep(event)

            await asyncio.wait_for(asyncio.to_thread(read), WAIT)
        else:

            async def follow(client: AsyncClient) -> None:
                async for event in client.stream(job_id, after):
                    keep(event)

            await asyncio.wait_for(follow(self.client), WAIT)
        return seen

    async def close(self) -> None:
        if isinstance(self.client, Client):
            await asyncio.to_thread(self.client.close)
        else:
            await self.client.aclose()


def open_api(target: str, sync: bool, **kwargs: Any) -> Api:
    return Api(Client(target, **kwargs) if sync else AsyncClient(target, **kwargs))


KINDS = [("http", False), ("http", True), ("grpc", False), ("grpc", True)]


def kind_id(kind: tuple[str, bool]) -> str:
    return f"{kind[0]}-{'sync' if kind[1] else 'async'}"


@pytest.fixture(params=KINDS, ids=kind_id)
def kind(request: pytest.FixtureRequest) -> tuple[str, bool]:
    value: tuple[str, bool] = request.param
    return value


def target_of(mesh: Mesh, transport: str, port: int | None = None) -> str:
    if transport == "http":
        return f"http://127.0.0.1:{port or mesh.services['gateway'].http_port}"
    return f"grpc://127.0.0.1:{port or mesh.services['gateway'].port}"


@pytest_asyncio.fixture(loop_scope="session")
async def api(mesh: Mesh, kind: tuple[str, bool]) -> AsyncIterator[Api]:
    transport, sync = kind
    opened = open_api(target_of(mesh, transport), sync, api_key=mesh.key, http_url=mesh.http_url)
    yield opened
    await opened.close()


@pytest.fixture
def proxy(mesh: Mesh, kind: tuple[str, bool]) -> Any:
    gateway = mesh.services["gateway"]
    made = TcpProxy(gateway.http_port if kind[0] == "http" else gateway.port)
    yield made
    made.close()


@pytest_asyncio.fixture(loop_scope="session")
async def proxied(mesh: Mesh, kind: tuple[str, bool], proxy: TcpProxy) -> AsyncIterator[Api]:
    """A client whose connections to the gateway go through `proxy`."""
    transport, sync = kind
    opened = open_api(
        target_of(mesh, transport, proxy.port), sync, api_key=mesh.key, http_url=mesh.http_url
    )
    yield opened
    await opened.close()


def prompt(subject: str) -> str:
    return f"{subject} {uuid.uuid4().hex}"


def check_png(data: bytes, sha256: str, size: tuple[int, int]) -> None:
    assert data[:8] == PNG_SIGNATURE
    assert Image.open(io.BytesIO(data)).size == size
    assert hashlib.sha256(data).hexdigest() == sha256


# Generating and downloading


async def test_generate_writes_pngs_whose_sha256_match_the_jobs_artifacts(
    api: Api, mesh: Mesh, tmp_path: Path
) -> None:
    events: list[Event] = []
    job: Job = await api(
        "generate", prompt("a red fox"), seed=7, num_variants=2, on_event=events.append, **SMALL
    )
    assert job.status == JobStatus.COMPLETED
    assert sorted((v.index, v.seed) for v in job.variants) == [(0, 7), (1, 8)]
    assert job.estimate is not None and job.estimate.total_cents == job.cost_cents
    assert job.engine_version and job.evaluator_models and not job.retryable
    # The server's own record of the artifacts, read over plain HTTP.
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth) as http:
        record = (await http.get(f"/api/status/{job.id}")).json()
    digests = {a["variant_index"]: a["sha256"] for a in record["artifacts"]}
    for variant in job.variants:
        path = await api("save", variant, tmp_path)
        assert path == tmp_path / f"{job.id}-{variant.index}.png"
        check_png(path.read_bytes(), digests[variant.index], (64, 64))
        again = await asyncio.to_thread(variant.save, tmp_path / "again.png")
        assert again.read_bytes() == path.read_bytes()
    progress = [e for e in events if isinstance(e, Progress)]
    # Batched variants step together; a step of several is one event, naming one of them.
    assert {p.step for p in progress} == {1, 2, 3, 4}
    assert {p.variant for p in progress} <= {0, 1} and all(p.total == 4 for p in progress)
    percents = [p.percent for p in progress]
    assert percents == sorted(percents) and percents[-1] == pytest.approx(100)
    assert any(isinstance(e, Status) and e.status == JobStatus.RUNNING for e in events)
    assert isinstance(events[-1], Final) and events[-1].job.id == job.id


async def test_the_same_seed_with_cache_refresh_renders_identical_bytes(api: Api) -> None:
    request = {"seed": 11, "cache": "refresh", **SMALL}
    text = prompt("a lighthouse")
    first: Job = await api("generate", text, **request)
    second: Job = await api("generate", text, **request)
    assert first.id != second.id
    assert not first.cache_hit and not second.cache_hit
    assert await api("download", first.variants[0]) == await api("download", second.variants[0])


async def test_a_repeated_request_is_answered_from_the_cache_with_the_same_bytes(api: Api) -> None:
    text = prompt("a harbour")
    first: Job = await api("generate", text, seed=3, **SMALL)
    hit: Job = await api("generate", text, seed=3, **SMALL)
    assert hit.cache_hit and hit.cost_cents == 0 and hit.id != first.id
    assert [v.sha256 for v in hit.variants] == [v.sha256 for v in first.variants]
    assert await api("download", hit.variants[0]) == await api("download", first.variants[0])


async def test_estimate_matches_the_servers_price_and_breakdown(api: Api, mesh: Mesh) -> None:
    request = {"prompt": "a meadow", "width": 512, "height": 512, "steps": 30, "num_variants": 2}
    estimate = await api("estimate", **request)
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth) as http:
        server = (await http.post("/api/cost/estimate", json=request)).json()
    assert estimate.total_cents == server["est_cost_cents"] == 3
    breakdown = server["breakdown"]
    assert estimate.base_cents == pytest.approx(breakdown["base_cents"])
    assert estimate.steps_factor == pytest.approx(breakdown["steps_factor"])
    assert estimate.model_multiplier == pytest.approx(breakdown["model_multiplier"])


async def test_an_uploaded_image_guides_a_job(api: Api, tmp_path: Path) -> None:
    image = tmp_path / "reference.png"
    image.write_bytes(png_bytes(64))
    from_path = await api("upload", image)
    from_bytes = await api("upload", png_bytes(64))
    assert from_path.startswith("uploads/") and from_bytes.startswith("uploads/")
    job: Job = await api(
        "generate",
        prompt("a guided lamp"),
        guidance_images=[GuidanceImage(from_path, "reference")],
        strength=0.6,
        seed=1,
        **SMALL,
    )
    assert job.status == JobStatus.COMPLETED and len(job.variants) == 1
    # The job says what guided it, over either transport.
    assert job.spec.guidance_images == (GuidanceImage(from_path, "reference"),)
    assert job.spec.strength == pytest.approx(0.6)


async def test_lookup_misses_then_finds_the_generated_result(api: Api) -> None:
    text = prompt("a glacier")
    assert await api("lookup", text, seed=5, **SMALL) is None
    job: Job = await api("generate", text, seed=5, **SMALL)
    hit: CacheHit = await api("lookup", text, seed=5, **SMALL)
    assert hit.job_id == job.id and hit.seed == 5
    assert [v.sha256 for v in hit.variants] == [v.sha256 for v in job.variants]
    assert await api("lookup", text, seed=6, **SMALL) is None
    agnostic: CacheHit = await api("lookup", text, seed=6, seed_agnostic=True, **SMALL)
    assert agnostic.job_id == job.id


async def test_models_lists_the_served_models(api: Api) -> None:
    models = await api("models")
    default = [m for m in models if m.is_default]
    assert [m.id for m in default] == ["tiny-sd"]
    assert "reference" in default[0].guidance_roles and "canny" in default[0].controlnets


async def test_over_grpc_without_an_http_url_uploads_and_models_are_unsupported(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IMAGEGEN_URL", raising=False)
    monkeypatch.delenv("IMAGEGEN_HTTP_URL", raising=False)
    async with AsyncClient(target_of(mesh, "grpc"), api_key=mesh.key) as client:
        with pytest.raises(Unsupported):
            await client.models()
        with pytest.raises(Unsupported):
            await client.upload(png_bytes())


# Cancelling and failing


async def test_cancel_ends_the_job_cancelled_and_wait_raises_job_failed(api: Api) -> None:
    job: Job = await api("submit", prompt("a slow city"), width=256, height=256, steps=100)
    cancelled: Job = await api("cancel", job.id)
    assert cancelled.id == job.id and cancelled.status == JobStatus.CANCELLED
    ended: Job = await api("wait", job.id, check=False)
    assert ended.status == JobStatus.CANCELLED
    with pytest.raises(JobFailed) as caught:
        await api("wait", job.id)
    assert caught.value.job.status == JobStatus.CANCELLED


# Errors


async def test_invalid_fields_raise_invalid_argument_naming_their_paths(api: Api) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await api("submit", "a kite", width=7, height=64, steps=4)
    assert "width" in caught.value.fields
    assert caught.value.request_id
    with pytest.raises(InvalidArgument) as nested:
        await api("estimate", "a kite", controlnet=ControlNet("canny", weight=3.0), **SMALL)
    assert "controlnet.weight" in nested.value.fields


async def test_an_unknown_job_is_not_found(api: Api) -> None:
    with pytest.raises(NotFound) as caught:
        await api("get", str(uuid.uuid4()))
    assert caught.value.request_id


async def test_a_wrong_key_is_unauthenticated(mesh: Mesh, kind: tuple[str, bool]) -> None:
    transport, sync = kind
    wrong = open_api(target_of(mesh, transport), sync, api_key="igk_" + "0" * 40)
    try:
        with pytest.raises(Unauthenticated) as caught:
            await wrong("estimate", "a kite", **SMALL)
        assert caught.value.request_id
    finally:
        await wrong.close()


# Broken connections


def ordered(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.id, type(e).__name__) for e in events]


async def resumed_after_breaking(
    api: Api, proxied: Api, proxy: TcpProxy, job: Job, breaking: Callable[[], None]
) -> tuple[list[Event], str]:
    """Reads the job's events through `proxy`, calling `breaking` at the first progress event,
    and checks the client resumed on a new connection with every event once, in order, to the
    final one. The whole stream and the id of the event it broke at."""
    broken_at: list[str] = []

    def break_once(event: Event) -> None:
        if isinstance(event, Progress) and not broken_at:
            broken_at.append(event.id)
            breaking()

    resumed = await proxied.events(job.id, each=break_once)
    assert broken_at and proxy.connections >= 2
    everything = await api.events(job.id)  # the whole stream again, read in one go
    assert ordered(resumed) == ordered(everything)
    assert isinstance(resumed[-1], Final) and resumed[-1].job.status == JobStatus.COMPLETED
    return everything, broken_at[0]


async def test_a_stream_cut_mid_job_resumes_without_lost_or_repeated_events(
    api: Api, proxied: Api, proxy: TcpProxy
) -> None:
    job: Job = await api("submit", prompt("a river"), seed=2, num_variants=2, **SMALL)
    everything, cut_at = await resumed_after_breaking(api, proxied, proxy, job, proxy.cut)
    # Resuming after an event id replays only what came after it.
    tail = await api.events(job.id, after=cut_at)
    assert (
        ordered(tail) == ordered(everything)[ordered(everything).index((cut_at, "Progress")) + 1 :]
    )


async def test_a_stream_gone_silent_is_taken_for_dead_and_resumed_on_a_new_connection(
    api: Api, proxied: Api, proxy: TcpProxy, kind: tuple[str, bool], monkeypatch: Any
) -> None:
    """A connection that stays open but carries nothing (a peer gone without closing it): over
    HTTP the server speaks at least every 5 s, so the client takes a longer silence for a dead
    connection; over gRPC an unanswered keepalive ping says so. Either resumes after the last
    event on a new connection."""
    monkeypatch.setattr(http_transport, "STREAM_SILENCE_SECONDS", 2.0)
    monkeypatch.setattr(grpc_transport, "KEEPALIVE_SECONDS", 2.0)
    monkeypatch.setattr(grpc_transport, "KEEPALIVE_TIMEOUT_SECONDS", 1.0)
    job: Job = await api("submit", prompt("a quarry"), seed=3, **SMALL)
    await resumed_after_breaking(api, proxied, proxy, job, proxy.freeze)


async def test_a_submit_whose_answer_was_lost_is_retried_to_the_same_job(
    proxied: Api, proxy: TcpProxy, mesh: Mesh
) -> None:
    await proxied("estimate", "a warm-up", **SMALL)  # the connection is up: its next answer goes
    proxy.swallow = True
    text = prompt("an orchard")
    submitting = asyncio.ensure_future(proxied("submit", text, seed=4, **SMALL))
    # The server answered (so it admitted the job) and the answer was dropped: break the
    # connection, and the client, which never saw it, must retry.
    assert await asyncio.to_thread(proxy.answered.wait, WAIT)
    proxy.cut()
    job: Job = await submitting
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth) as http:
        listed = (await http.get("/api/jobs", params={"page_size": 100})).json()["jobs"]
    assert [j["run_id"] for j in listed if j["request"]["prompt"] == text] == [job.id]
    assert job.idempotent_replay
    await proxied("wait", job.id)
