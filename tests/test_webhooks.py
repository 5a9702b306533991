"""Webhook deliveries: the URL check at submission, and the dispatcher sending jobs' ends to a
real HTTP receiver on 127.0.0.1, signed per Standard Webhooks (verified with the independent
`standardwebhooks` package), retried with backoff, refused for private destinations, and kept
running through a Postgres blip. Jobs end through the real lifecycle (admitted, then cancelled),
which writes the delivery rows in real Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import standardwebhooks
from google.protobuf import json_format

from services.common import db
from services.common.errors import InvalidArgument
from services.common.events import EventLog
from services.common.queue import JobQueue
from services.gateway.outbound import check_webhook_url
from services.gateway.webhooks import Delivery, DeliveryStatus, WebhookDispatcher
from services.jobs.lifecycle import JobLifecycle
from services.jobs.records import Webhook
from services.tenants.keys import KeyStore
from tests.conftest import ServiceEnv, bearer, new_key, start_in_process
from tests.helpers import queued_job

TENANT = "tenant-a"
WAIT = 10.0


@dataclass
class Received:
    host: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP/1.1 server on 127.0.0.1:0: records each request in `requests` and answers with
    the next of `answers` (status, extra headers), then 200."""

    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/hook"

    async def next(self) -> Received:
        return await asyncio.wait_for(self.requests.get(), WAIT)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status, extra = self.answers.pop(0) if self.answers else (200, {})
            self.requests.put_nowait(Received(headers.get("host", ""), headers, body))
            lines = [f"HTTP/1.1 {status} Answer", "content-length: 0", "connection: close"]
            lines += [f"{k}: {v}" for k, v in extra.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            await writer.drain()
        finally:
            writer.close()


@dataclass
class Jobs:
    """The module's database, its jobs and their deliveries."""

    pool: asyncpg.Pool
    lifecycle: JobLifecycle
    keys: KeyStore
    secret: str

    async def render(self, job_id: str) -> dict[str, Any]:
        """The job as its snapshot holds it, in protobuf JSON (the gateway passes its HTTP
        API's rendering)."""
        return json_format.MessageToDict(await self.lifecycle.snapshot(job_id))

    async def ended_job(self, url: str) -> str:
        """A job of TENANT with a webhook to `url`, admitted and cancelled: its end is due for
        delivery."""
        job = queued_job()
        job.tenant = TENANT
        job.webhook = Webhook(url)
        await self.lifecycle.admit(job)
        await self.lifecycle.cancel(job.id)
        return job.id

    def dispatcher(self, pool: asyncpg.Pool | None = None, **options: Any) -> WebhookDispatcher:
        settings: dict[str, Any] = {
            "allow_private": True,
            "timeout_seconds": 5.0,
            "max_attempts": 5,
            "base_backoff_seconds": 0.05,
        }
        settings.update(options)
        pool = pool or self.pool
        return WebhookDispatcher(pool, KeyStore(pool), self.render, **settings)

    async def delivery(self, job_id: str) -> Delivery:
        (found,) = await self.dispatcher().deliveries(job_id)
        return found


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def jobs(env: ServiceEnv) -> AsyncIterator[Jobs]:
    pool = await db.connect(env.database_url)
    redis = aioredis.from_url(env.redis_url)
    lifecycle = JobLifecycle(pool, redis, EventLog(redis, 600), JobQueue(redis))
    tenant = await KeyStore(pool).ensure_tenant(TENANT)
    yield Jobs(pool, lifecycle, KeyStore(pool), tenant.webhook_secret)
    await redis.aclose()
    await pool.close()


@pytest_asyncio.fixture(loop_scope="session")
async def receiver(jobs: Jobs) -> AsyncIterator[Receiver]:
    """A receiver of the test's own; the test's deliveries go with it."""
    started = Receiver()
    await started.start()
    yield started
    await started.stop()
    await jobs.pool.execute("DELETE FROM webhook_deliveries")


@contextlib.asynccontextmanager
async def dispatching(dispatcher: WebhookDispatcher) -> AsyncIterator[asyncio.Task[None]]:
    """`dispatcher` running; on leaving, stopped (the pass under way finishes and records)."""
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


def refusal_field(url: str, allow_private: bool = False) -> list[str]:
    with pytest.raises(InvalidArgument) as refused:
        check_webhook_url(url, allow_private)
    return [v.field for v in refused.value.violations]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://10.0.0.1/",
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost:8080/",
        "http://hooks.localhost/",
        "http://LOCALHOST./",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://017700000001/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fd00::1]/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "ftp://x/",
        "http://user:pw@example.com/",
        "http:///no-host",
        "https://example.com/a b",
        "https://example.com/\nx",
        "https://example.com/" + "a" * 2048,
    ],
)
def test_check_webhook_url_refuses_private_hosts_and_malformed_urls(url: str) -> None:
    assert refusal_field(url) == ["webhook.url"]


@pytest.mark.parametrize(
    "url", ["https://example.com/hook", "http://8.8.8.8:8080/x", "https://[2606:4700::1111]/"]
)
def test_check_webhook_url_accepts_public_hosts(url: str) -> None:
    assert check_webhook_url(url, allow_private=False) == url


def test_check_webhook_url_allows_private_hosts_when_told_to() -> None:
    assert check_webhook_url("http://127.0.0.1:9/", allow_private=True) == "http://127.0.0.1:9/"
    assert refusal_field("http://user@127.0.0.1:9/", allow_private=True) == ["webhook.url"]
    assert refusal_field("http://127.0.0.1:9/", allow_private=False) == ["webhook.url"]


async def test_a_delivery_is_signed_per_standard_webhooks_and_carries_the_rendered_job(
    jobs: Jobs, receiver: Receiver
) -> None:
    job_id = await jobs.ended_job(receiver.url())

    assert await jobs.dispatcher().deliver_due() == 1

    request = receiver.requests.get_nowait()
    delivery = await jobs.delivery(job_id)
    assert request.headers["webhook-id"] == delivery.webhook_id
    assert request.headers["content-type"] == "application/json"
    verified = standardwebhooks.Webhook(jobs.secret).verify(request.body, request.headers)
    assert verified["type"] == "job.cancelled"
    assert verified["timestamp"].endswith("Z")
    assert verified["data"] == await jobs.render(job_id)
    assert verified["data"]["id"] == job_id
    assert request.body == json.dumps(verified, separators=(",", ":")).encode()
    tampered = request.body.replace(b"job.cancelled", b"job.completed")
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(jobs.secret).verify(tampered, request.headers)
    assert delivery.status is DeliveryStatus.DELIVERED
    assert delivery.delivered_at is not None
    assert [a.status_code for a in delivery.history] == [200]


async def test_a_failed_attempt_is_retried_after_backoff_with_the_same_id_and_body(
    jobs: Jobs, receiver: Receiver
) -> None:
    receiver.answers = [(500, {})]
    job_id = await jobs.ended_job(receiver.url())
    dispatcher = jobs.dispatcher(base_backoff_seconds=0.5)

    assert await dispatcher.deliver_due() == 1
    assert await dispatcher.deliver_due() == 0  # not due again before its backoff
    async with dispatching(dispatcher):
        first, second = receiver.requests.get_nowait(), await receiver.next()

    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    for request in (first, second):
        standardwebhooks.Webhook(jobs.secret).verify(request.body, request.headers)
    delivery = await jobs.delivery(job_id)
    assert delivery.status is DeliveryStatus.DELIVERED
    assert [a.status_code for a in delivery.history] == [500, 200]
    gap = delivery.history[1].attempted_at - delivery.history[0].attempted_at
    assert gap.total_seconds() >= 0.5


async def test_backoff_doubles_per_attempt_and_follows_retry_after(
    jobs: Jobs, receiver: Receiver
) -> None:
    receiver.answers = [(500, {}), (500, {}), (429, {"retry-after": "3"})]
    job_id = await jobs.ended_job(receiver.url())
    dispatcher = jobs.dispatcher(base_backoff_seconds=60.0)
    waits = []
    for _ in range(3):
        assert await dispatcher.deliver_due() == 1
        delivery = await jobs.delivery(job_id)
        waits.append((delivery.next_attempt_at - delivery.history[-1].attempted_at).total_seconds())
        await jobs.pool.execute(
            "UPDATE webhook_deliveries SET next_attempt_at = now() WHERE job_id = $1",
            uuid.UUID(job_id),
        )

    assert 60 <= waits[0] <= 67
    assert 120 <= waits[1] <= 133
    assert 2.5 <= waits[2] <= 3.5
    assert [a.status_code for a in delivery.history] == [500, 500, 429]
    assert delivery.status is DeliveryStatus.PENDING


async def test_a_delivery_fails_for_good_after_max_attempts(jobs: Jobs, receiver: Receiver) -> None:
    # A redirect counts as a failure (and is not followed), whatever it points at.
    receiver.answers = [(500, {}), (302, {"location": "http://10.0.0.1/"}), (200, {})]
    job_id = await jobs.ended_job(receiver.url())
    dispatcher = jobs.dispatcher(max_attempts=2, base_backoff_seconds=0.01)

    async with dispatching(dispatcher):
        await receiver.next()
        await receiver.next()

    assert await dispatcher.deliver_due() == 0
    assert receiver.requests.empty()
    delivery = await jobs.delivery(job_id)
    assert delivery.status is DeliveryStatus.FAILED
    assert [a.status_code for a in delivery.history] == [500, 302]
    assert delivery.last_error.startswith("gave up after 2 attempts")


async def test_private_destinations_are_refused_without_a_request(
    jobs: Jobs, receiver: Receiver
) -> None:
    # Its own name resolves to a loopback or private address here; the submission check does
    # not resolve it, so only the check at delivery stands between it and the receiver.
    own_name = socket.gethostname()
    urls = [receiver.url(), receiver.url("localhost"), receiver.url(own_name)]
    assert check_webhook_url(receiver.url(own_name), allow_private=False)
    job_ids = [await jobs.ended_job(url) for url in urls]

    assert await jobs.dispatcher(allow_private=False).deliver_due() == 3

    assert receiver.requests.empty()
    for job_id in job_ids:
        delivery = await jobs.delivery(job_id)
        assert delivery.status is DeliveryStatus.FAILED
        assert delivery.last_error.startswith("refused: ")
        assert [(a.status_code, a.error) for a in delivery.history] == [(None, delivery.last_error)]
    assert "resolves to" in (await jobs.delivery(job_ids[2])).last_error


async def test_a_resolved_name_is_sent_to_its_checked_address_under_its_own_host(
    jobs: Jobs, receiver: Receiver
) -> None:
    job_id = await jobs.ended_job(receiver.url("localhost"))

    assert await jobs.dispatcher(allow_private=True).deliver_due() == 1

    assert receiver.requests.get_nowait().host == f"localhost:{receiver.port}"
    assert (await jobs.delivery(job_id)).status is DeliveryStatus.DELIVERED


async def test_the_dispatcher_keeps_delivering_through_a_postgres_blip(
    jobs: Jobs, receiver: Receiver, env: ServiceEnv
) -> None:
    own_pool = await db.connect(env.database_url)
    try:
        async with dispatching(jobs.dispatcher(pool=own_pool)) as task:
            # The attempts table is locked, so the dispatcher's record of its first attempt
            # waits; then every connection to the database but the lock's is cut, that record
            # and the dispatcher's listener among them.
            async with jobs.pool.acquire() as holder:
                async with holder.transaction():
                    await holder.execute("LOCK TABLE webhook_attempts IN EXCLUSIVE MODE")
                    cut_off = await jobs.ended_job(receiver.url())
                    await receiver.next()
                    await _waiting_on_a_lock(holder)
                    await holder.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                await jobs.pool.expire_connections()  # the test's own, cut too
                later = await jobs.ended_job(receiver.url())
                arrived = await receiver.next()
            assert not task.done()
    finally:
        await own_pool.close()

    delivered = await jobs.delivery(later)
    assert arrived.headers["webhook-id"] == delivered.webhook_id
    assert delivered.status is DeliveryStatus.DELIVERED
    # The attempt whose record was cut is claimed again when its lease runs out.
    unrecorded = await jobs.delivery(cut_off)
    assert (unrecorded.status, unrecorded.attempts, unrecorded.history) == (
        DeliveryStatus.PENDING,
        1,
        (),
    )


async def _waiting_on_a_lock(conn: asyncpg.Connection) -> None:
    """Returns once another backend of the database waits on a lock."""
    async with asyncio.timeout(WAIT):
        while True:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
            if waiting:
                return
            await asyncio.sleep(0.02)


async def test_the_gateway_announces_a_jobs_end_to_its_webhook_signed_and_after_a_500(
    env: ServiceEnv, receiver: Receiver
) -> None:
    """Through the whole gateway: a job asked over HTTP with a webhook_url is cancelled; the
    gateway's own dispatcher delivers `job.cancelled`, first answered 500, then 200."""
    allowed = dataclasses.replace(env, overrides={**env.overrides, "webhook_allow_private": True})
    mesh = await start_in_process(allowed, ("cache", "gateway"))
    try:
        key = await new_key(env.database_url, "tenant-hooked")
        pool = await db.connect(env.database_url)
        secret = (await KeyStore(pool).tenant("tenant-hooked")).webhook_secret
        await pool.close()
        receiver.answers.append((500, {}))
        async with httpx.AsyncClient(base_url=mesh.http_url, headers=bearer(key)) as http:
            made = await http.post(
                "/api/generate/text-to-image",
                json={
                    "prompt": f"a pier {uuid.uuid4().hex}",
                    "width": 64,
                    "height": 64,
                    "cache": "off",
                    "webhook_url": receiver.url(),
                    "webhook_events": ["job.cancelled"],
                },
            )
            assert made.status_code == 201, made.text
            run_id = made.json()["run_id"]  # no generator here: it stays queued
            assert (await http.post(f"/api/jobs/{run_id}/cancel")).status_code == 200
        first, second = await receiver.next(), await receiver.next()
    finally:
        await mesh.stop()
    assert first.body == second.body
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    event = standardwebhooks.Webhook(secret).verify(second.body, second.headers)
    assert event["type"] == "job.cancelled"
    assert event["data"]["run_id"] == run_id and event["data"]["status"] == "cancelled"
