"""Tenants and API keys through the real gateway (HTTP and gRPC) with a real cache, generator and
evaluator: tenant B can see, read, cancel, stream, look up and download nothing of tenant A's;
without a key every route but health and the page is 401; limits answer 429 /
RESOURCE_EXHAUSTED with the details a client needs to wait; Host and Origin are checked."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import httpx
import pytest
import pytest_asyncio
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import (
    cost_service_pb2,
    cost_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    types_pb2,
)
from PIL import Image

from services.common import db
from services.common.interceptors import bearer_interceptors
from services.gateway.cli import ensure_dev_key
from services.tenants.keys import KeyStore, Scope
from tests.conftest import Mesh, ServiceEnv, bearer, new_key, start_in_process
from tests.helpers import run_to_end, violations

WAIT = 60.0
# Every HTTP route of the gateway, and what it needs. A route added to the app and not here
# fails test_the_route_table_is_the_one_listed_here.
OPEN_ROUTES = {("GET", "/"), ("GET", "/admin"), ("GET", "/healthz"), ("GET", "/metrics")}
# The pages' scripts and the vendored charting library, open as the pages are: a path in it.
ASSET_ROUTES = {("GET", "/static/{path:path}"): "/static/admin.js"}
KEYED_ROUTES = {
    ("POST", "/api/generate/text-to-image"),
    ("GET", "/api/status/stream/{run_id}"),
    ("GET", "/api/status/{run_id}"),
    ("GET", "/api/jobs"),
    ("POST", "/api/jobs/{run_id}/cancel"),
    ("POST", "/api/cost/estimate"),
    ("POST", "/api/cache/lookup"),
    ("GET", "/api/models"),
    ("POST", "/api/uploads/presign"),
    ("POST", "/api/evaluate"),
    ("GET", "/api/admin/safety"),
    ("GET", "/api/admin/queue"),
    ("GET", "/api/admin/stats"),
    ("GET", "/openapi.json"),
}
# Authorized by their URL's signature (or, for GET, the owner's key).
SIGNED_ROUTES = {("GET", "/files/{key:path}"), ("PUT", "/files/{key:path}")}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"))
    yield started
    await started.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def keys(env: ServiceEnv, mesh: Mesh) -> dict[str, str]:
    """Keys of tenants A and B (every scope), a read-only key of B, and a key of C with a
    rate limit of 2 a minute."""
    return {
        "a": await new_key(env.database_url, "tenant-a"),
        "b": await new_key(env.database_url, "tenant-b"),
        "b-read": await new_key(env.database_url, "tenant-b", (Scope.READ,)),
        "c-rate": await new_key(env.database_url, "tenant-c", rate_per_minute=2),
    }


def body(prompt: str = "", **fields: Any) -> dict[str, Any]:
    return {
        "prompt": prompt or f"a lighthouse {uuid.uuid4().hex}",
        "width": 64,
        "height": 64,
        "steps": 4,
        "seed": 11,
        **fields,
    }


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (seed % 256, 40, 90)).save(out, format="PNG")
    return out.getvalue()


async def upload(http: httpx.AsyncClient, key: str, data: bytes) -> str:
    presigned = await http.post(
        "/api/uploads/presign",
        headers=bearer(key),
        json={
            "content_type": "image/png",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data),
        },
    )
    assert presigned.status_code == 200, presigned.text
    answer = presigned.json()
    assert answer["method"] == "PUT"
    stored = await http.put(answer["upload_url"], content=data, headers=answer["headers"])
    assert stored.status_code == 201, stored.text
    uploaded: str = answer["key"]
    return uploaded


def stub(mesh: Mesh, key: str) -> tuple[grpc.aio.Channel, image_service_pb2_grpc.ImageServiceStub]:
    channel = grpc.aio.insecure_channel(mesh.addr("gateway"), interceptors=bearer_interceptors(key))
    return channel, image_service_pb2_grpc.ImageServiceStub(channel)


async def test_without_a_key_every_route_is_401_but_health_and_the_page(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        for method, path in KEYED_ROUTES:
            concrete = path.replace("{run_id}", str(uuid.uuid4()))
            answer = await http.request(method, concrete)
            assert answer.status_code == 401, (method, path, answer.status_code)
            assert answer.json()["error"]["code"] == "UNAUTHENTICATED"
            assert answer.headers["www-authenticate"].startswith("Bearer")
        for method, path in [*OPEN_ROUTES, *ASSET_ROUTES]:
            concrete = ASSET_ROUTES.get((method, path), path)
            assert (await http.request(method, concrete)).status_code == 200, path
        wrong = await http.get("/api/jobs", headers=bearer("igk_" + "x" * 40))
        assert wrong.status_code == 401
        malformed = await http.get("/api/jobs", headers={"Authorization": "Basic abc"})
        assert malformed.status_code == 401


def test_the_app_has_no_route_outside_the_lists() -> None:
    from starlette.routing import Route

    from services.gateway.http_api import build_app

    # The app the gateway serves; building it calls nothing of what it is given.
    app = build_app(cast(Any, None), cast(Any, None), [], [], cast(Any, None))
    served = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}
    }
    assert served == OPEN_ROUTES | set(ASSET_ROUTES) | KEYED_ROUTES | SIGNED_ROUTES


async def test_without_a_key_every_rpc_is_unauthenticated_but_health(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.addr("gateway")) as channel:
        images = image_service_pb2_grpc.ImageServiceStub(channel)
        calls = [
            images.CreateJob(image_service_pb2.CreateJobRequest()),
            images.GetJob(image_service_pb2.GetJobRequest(job_id=str(uuid.uuid4()))),
            images.CancelJob(image_service_pb2.CancelJobRequest(job_id=str(uuid.uuid4()))),
            images.ListJobs(image_service_pb2.ListJobsRequest()),
            images.EvaluateImages(image_service_pb2.EvaluateImagesRequest()),
            cost_service_pb2_grpc.CostServiceStub(channel).EstimateCost(
                cost_service_pb2.EstimateCostRequest()
            ),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in images.WatchJob(
                image_service_pb2.WatchJobRequest(job_id=str(uuid.uuid4()))
            ):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_tenant_b_sees_nothing_of_tenant_a_on_any_route_or_rpc(
    mesh: Mesh, keys: dict[str, str]
) -> None:
    a, b = keys["a"], keys["b"]
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as http:
        guidance = await upload(http, a, png(7))
        prompt = f"a lighthouse {uuid.uuid4().hex}"
        made = await http.post("/api/generate/text-to-image", headers=bearer(a), json=body(prompt))
        assert made.status_code == 201, made.text
        run_id = made.json()["run_id"]
        channel_a, images_a = stub(mesh, a)
        async with channel_a:
            job = await run_to_end(images_a, run_id)
        assert job.status == types_pb2.JOB_STATUS_COMPLETED, job.error
        artifact = job.artifacts[0]
        unknown = str(uuid.uuid4())

        # HTTP: every route that names A's job answers B as for a job that does not exist.
        for method, path in [
            ("GET", f"/api/status/{run_id}"),
            ("GET", f"/api/status/stream/{run_id}"),
            ("POST", f"/api/jobs/{run_id}/cancel"),
        ]:
            theirs = await http.request(method, path, headers=bearer(b))
            missing = await http.request(method, path.replace(run_id, unknown), headers=bearer(b))
            assert theirs.status_code == missing.status_code == 404, path
            assert theirs.json()["error"]["message"] == missing.json()["error"]["message"]
        listed = await http.get("/api/jobs", headers=bearer(b))
        assert run_id not in {j["run_id"] for j in listed.json()["jobs"]}
        assert run_id in {
            j["run_id"] for j in (await http.get("/api/jobs", headers=bearer(a))).json()["jobs"]
        }
        # The cache: A's result is a hit for A and a miss for B.
        lookup = body(prompt)
        assert (await http.post("/api/cache/lookup", headers=bearer(a), json=lookup)).json()["hit"]
        assert not (await http.post("/api/cache/lookup", headers=bearer(b), json=lookup)).json()[
            "hit"
        ]
        again = await http.post("/api/generate/text-to-image", headers=bearer(b), json=body(prompt))
        assert again.status_code == 201 and not again.json()["cached_hit"]
        # Files: by key with the owner's key only; B gets what a missing file gets.
        own = await http.get(f"/files/{artifact.key}", headers=bearer(a))
        assert own.status_code == 200 and hashlib.sha256(own.content).hexdigest() == artifact.sha256
        theirs = await http.get(f"/files/{artifact.key}", headers=bearer(b))
        missing = await http.get("/files/images/" + "0" * 64 + ".png", headers=bearer(b))
        assert theirs.status_code == missing.status_code == 404
        assert (await http.get(f"/files/{guidance}", headers=bearer(b))).status_code == 404
        assert (await http.get(f"/files/{guidance}", headers=bearer(a))).status_code == 200
        # Uploads: A's key is "no such upload" to B, word for word as a made-up one.
        made_up = guidance.replace("tenant-a", "tenant-b")
        answers = []
        for key in (guidance, made_up):
            refused = await http.post(
                "/api/generate/text-to-image",
                headers=bearer(b),
                json=body(guidance_images=[{"key": key, "role": "reference"}], strength=0.5),
            )
            assert refused.status_code == 422
            answers.append(refused.json()["error"]["field_violations"])
        assert answers[0] == answers[1]
        evaluated = await http.post(
            "/api/evaluate", headers=bearer(b), json={"prompt": "x", "image_keys": [guidance]}
        )
        assert evaluated.status_code == 422
        assert evaluated.json()["error"]["field_violations"][0]["field"] == "image_keys[0]"

        # gRPC: the same, RPC by RPC.
        channel_b, images_b = stub(mesh, b)
        async with channel_b:
            for call in (
                images_b.GetJob(image_service_pb2.GetJobRequest(job_id=run_id)),
                images_b.CancelJob(image_service_pb2.CancelJobRequest(job_id=run_id)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in images_b.WatchJob(image_service_pb2.WatchJobRequest(job_id=run_id)):
                    pass
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            listing = await images_b.ListJobs(image_service_pb2.ListJobsRequest(page_size=100))
            assert run_id not in {j.id for j in listing.jobs}
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await images_b.EvaluateImages(
                    image_service_pb2.EvaluateImagesRequest(prompt="x", image_keys=[guidance])
                )
            assert violations(refused.value) == ["image_keys[0]"]
        # A's job is untouched by all of B's attempts.
        status = await http.get(f"/api/status/{run_id}", headers=bearer(a))
        assert status.json()["status"] == "completed"


async def test_a_key_without_the_scope_is_forbidden(mesh: Mesh, keys: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as http:
        reader = bearer(keys["b-read"])
        refused = await http.post("/api/generate/text-to-image", headers=reader, json=body())
        assert refused.status_code == 403
        assert (await http.get("/api/jobs", headers=reader)).status_code == 200
        assert (await http.get("/api/admin/safety", headers=reader)).status_code == 403
        assert (await http.get("/api/admin/safety", headers=bearer(keys["a"]))).status_code == 200
        assert (await http.get("/api/admin/queue", headers=reader)).status_code == 403
        depth = (await http.get("/api/admin/queue", headers=bearer(keys["a"]))).json()
        assert depth["backlog"] >= depth["claimed"] >= 0


async def test_the_rate_limit_answers_429_with_when_to_retry(
    mesh: Mesh, keys: dict[str, str]
) -> None:
    limited = keys["c-rate"]
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as http:
        answers = [
            await http.post("/api/cost/estimate", headers=bearer(limited), json=body()),
            *[
                await http.post("/api/generate/text-to-image", headers=bearer(limited), json=body())
                for _ in range(3)
            ],
        ]
    assert [a.status_code for a in answers] == [200, 201, 201, 429]  # estimates are not counted
    refused = answers[-1]
    assert 1 <= int(refused.headers["retry-after"]) <= 30  # 2 a minute: one every 30 s
    assert refused.headers["ratelimit-policy"] == "2;w=60"
    assert refused.headers["ratelimit-remaining"] == "0"
    assert refused.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    channel, images = stub(mesh, limited)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await images.CreateJob(image_service_pb2.CreateJobRequest())
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error.value)
    assert status is not None and status.code == code_pb2.RESOURCE_EXHAUSTED
    quota, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    assert any(d.Unpack(quota) for d in status.details)
    assert any(d.Unpack(retry) for d in status.details)
    assert quota.violations[0].subject.endswith("/rate")
    assert retry.retry_delay.seconds >= 1


async def test_concurrency_limit_budget_and_max_cost_refuse_before_queueing(
    env: ServiceEnv, mesh: Mesh
) -> None:
    one_at_a_time = await new_key(env.database_url, "tenant-d", max_concurrent=1)
    pool = await db.connect(env.database_url)
    try:
        await KeyStore(pool).update_tenant("tenant-e", budget_cents=0)
    finally:
        await pool.close()
    broke = await new_key(env.database_url, "tenant-e")
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as http:
        slow = body(width=256, height=256, steps=40)
        first = await http.post(
            "/api/generate/text-to-image", headers=bearer(one_at_a_time), json=slow
        )
        assert first.status_code == 201, first.text
        second = await http.post(
            "/api/generate/text-to-image", headers=bearer(one_at_a_time), json=body()
        )
        assert second.status_code == 429, second.text
        assert second.json()["error"]["quota_violation"]["subject"].endswith("/concurrent")
        await http.post(f"/api/jobs/{first.json()['run_id']}/cancel", headers=bearer(one_at_a_time))
        third = await http.post(
            "/api/generate/text-to-image", headers=bearer(one_at_a_time), json=body()
        )
        assert third.status_code == 201, third.text  # the cancelled job no longer counts

        over = await http.post("/api/generate/text-to-image", headers=bearer(broke), json=body())
        assert over.status_code == 429
        assert over.json()["error"]["quota_violation"]["subject"] == "tenant:tenant-e/budget"
        listed = await http.get("/api/jobs", headers=bearer(broke))
        assert listed.json()["jobs"] == []  # nothing was queued or charged

        dear = await http.post(
            "/api/generate/text-to-image",
            headers=bearer(one_at_a_time),
            json=body(max_cost_cents=0),
        )
        assert dear.status_code == 422
        assert dear.json()["error"]["field_violations"][0]["field"] == "max_cost_cents"


async def test_idempotency_keys_are_per_tenant(mesh: Mesh, keys: dict[str, str]) -> None:
    shared = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as http:
        request = body()
        of_a = await http.post(
            "/api/generate/text-to-image", headers={**bearer(keys["a"]), **shared}, json=request
        )
        of_b = await http.post(
            "/api/generate/text-to-image", headers={**bearer(keys["b"]), **shared}, json=request
        )
    assert of_a.status_code == of_b.status_code == 201
    assert of_a.json()["run_id"] != of_b.json()["run_id"]


async def test_host_and_origin_are_checked(mesh: Mesh, keys: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as http:
        rebound = await http.get("/healthz", headers={"Host": "attacker.example"})
        assert rebound.status_code == 400
        assert rebound.json()["error"]["field_violations"][0]["field"] == "Host"
        page = await http.get("/", headers={"Host": "attacker.example:8080"})
        assert page.status_code == 400
        cross = await http.post(
            "/api/generate/text-to-image",
            headers={**bearer(keys["a"]), "Origin": "https://attacker.example"},
            json=body(),
        )
        assert cross.status_code == 403
        same = await http.get("/api/jobs", headers={**bearer(keys["a"]), "Origin": mesh.http_url})
        assert same.status_code == 200
        assert (await http.get("/healthz", headers={"Host": "localhost:1234"})).status_code == 200


async def test_a_webhook_to_a_private_address_is_refused_at_submission(
    mesh: Mesh, keys: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as http:
        for url in ("http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://localhost/x"):
            refused = await http.post(
                "/api/generate/text-to-image",
                headers=bearer(keys["a"]),
                json=body(webhook_url=url),
            )
            assert refused.status_code == 422, url
            assert refused.json()["error"]["field_violations"][0]["field"] == "webhook_url"


async def test_the_keys_cli_creates_lists_and_revokes_against_database_url(
    env: ServiceEnv, mesh: Mesh
) -> None:
    command = [sys.executable, "-m", "services.gateway", "keys"]
    environment = {**os.environ, "DATABASE_URL": env.database_url}

    def run(*args: str) -> list[str]:
        done = subprocess.run(
            [*command, *args], env=environment, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()

    created = await asyncio.to_thread(
        run, "create", "--tenant", "cli-tenant", "--scopes", "read", "--rate", "100"
    )
    key = created[-1]
    assert key.startswith("igk_")
    listed = await asyncio.to_thread(run, "list", "--tenant", "cli-tenant")
    assert any(key[:12] in line and "rate=100/min" in line for line in listed)
    assert key not in "\n".join(listed)  # the key itself is never shown again
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as http:
        assert (await http.get("/api/jobs", headers=bearer(key))).status_code == 200
        await asyncio.to_thread(run, "revoke", key[:12])
        deadline = asyncio.get_running_loop().time() + 15
        while (await http.get("/api/jobs", headers=bearer(key))).status_code != 401:
            assert asyncio.get_running_loop().time() < deadline, "the revoked key still works"
            await asyncio.sleep(0.5)


async def test_the_dev_key_is_kept_private_and_reused(env: ServiceEnv, tmp_path: Any) -> None:
    path = tmp_path / "dev.key"
    first = await ensure_dev_key(env.database_url, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert await ensure_dev_key(env.database_url, path) == first
    path.write_text("igk_" + "y" * 40)  # a key that no longer works is replaced
    assert await ensure_dev_key(env.database_url, path) != first
