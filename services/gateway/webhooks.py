"""Webhooks: the check of a webhook URL at submission, and the dispatcher that sends deliveries.

The job lifecycle writes one `webhook_deliveries` row (pending) in the transaction that ends a job
and NOTIFYs `imagegen_webhooks`. Every gateway replica runs a `WebhookDispatcher`: it claims due
rows with `FOR UPDATE SKIP LOCKED`, pushing their `next_attempt_at` forward as a lease in the
same transaction, sends them outside it, and records each attempt. A replica that dies mid-send
leaves the row to be claimed again when the lease runs out.

Deliveries follow Standard Webhooks (https://www.standardwebhooks.com): the body is built once, on
the first attempt, and stored, so every retry sends the same bytes under the same `webhook-id`;
each attempt is signed (HMAC-SHA256, `v1,`) with the tenant's current secret.

Server-side request forgery (services/gateway/outbound.py): a URL whose host is a non-public IP
literal or a localhost name is refused when it is submitted (no DNS there: admission stays fast).
At delivery the host is resolved and refused if any of its addresses is not public; the request
then goes to the address that was checked (the Host header and TLS server name carry the
original host), so a DNS answer that changes between the check and the connection cannot
redirect it. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx

from services.common.errors import InvalidArgument, NotFound
from services.common.retry import is_blip
from services.gateway.outbound import (
    IPAddress,
    check_webhook_url,
    ip_literal,
    is_public,
    refusal_for,
)
from services.jobs.records import parse_job_id
from services.tenants.keys import KeyStore

log = logging.getLogger("imagegen.webhooks")

CHANNEL = "imagegen_webhooks"
MAX_BACKOFF_SECONDS = 600.0
POLL_SECONDS = 1.0
USER_AGENT = "imagegen-webhooks/1"
_SECRET_PREFIX = "whsec_"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class DeliveryAttempt:
    """One try: the receiver's status code, or why there was none."""

    attempt: int
    attempted_at: datetime
    status_code: int | None
    error: str
    duration_ms: float


@dataclass(frozen=True)
class Delivery:
    id: str
    tenant: str
    job_id: str
    event_type: str
    url: str
    payload: str | None
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime
    last_error: str
    created_at: datetime
    delivered_at: datetime | None
    history: tuple[DeliveryAttempt, ...]

    @property
    def webhook_id(self) -> str:
        return webhook_id(self.id)


# Signing


def webhook_id(delivery_id: str) -> str:
    return "msg_" + uuid.UUID(delivery_id).hex


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` of one attempt: `v1,` and base64 of HMAC-SHA256 keyed with the
    secret's bytes over `{id}.{timestamp}.{body}`."""
    key = base64.b64decode(secret.removeprefix(_SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


# Delivering


@dataclass(frozen=True)
class _Outcome:
    """What an attempt came to: delivered (a 2xx), or not and then tried again unless `retry`
    is False; `retry_after` is the receiver's own Retry-After, in seconds."""

    status_code: int | None = None
    error: str = ""
    retry: bool = True
    retry_after: float | None = None
    duration_ms: float = 0.0

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class _Refused(Exception):
    """A delivery that must not be sent (and will not be retried): the reason is the message."""


class WebhookDispatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        keys: KeyStore,
        render: Callable[[str], Awaitable[dict[str, Any]]],
        *,
        allow_private: bool,
        timeout_seconds: float,
        max_attempts: int,
        base_backoff_seconds: float = 1.0,
    ) -> None:
        self._pool = pool
        self._keys = keys
        self._render = render
        self.allow_private = allow_private
        self.timeout_seconds = timeout_seconds
        self.max_attempts = max_attempts
        self.base_backoff_seconds = base_backoff_seconds
        # A claimed row is someone's for this long: its render and its send, with room to record.
        self.lease_seconds = 2 * timeout_seconds + 30.0
        self._tls = ssl.create_default_context()

    async def run(self, stop: asyncio.Event) -> None:
        """Delivers due rows until `stop` is set; between passes waits for a NOTIFY, the next
        due row or POLL_SECONDS, whichever comes first. Errors (a store blip above all) are
        logged and waited out, never ended on."""
        wake = asyncio.Event()
        listener = _Listener(self._pool, wake)
        error_delay = 0.1
        try:
            while not stop.is_set():
                try:
                    if not listener.listening:
                        await listener.close()
                        await listener.open()
                    wake.clear()
                    made = await self.deliver_due()
                    pause = 0.0 if made else await self._until_next_due()
                    error_delay = 0.1
                except Exception as error:
                    if is_blip(error):
                        log.warning(
                            "webhook store unavailable (%s: %s)", type(error).__name__, error
                        )
                    else:
                        log.exception("webhook dispatch failed")
                    pause = error_delay * (0.5 + random.random())
                    error_delay = min(error_delay * 2, 5.0)
                if pause > 0:
                    await _wait_any(stop, wake, pause)
        finally:
            await listener.close()

    async def deliver_due(self, limit: int = 20) -> int:
        """One pass: claims up to `limit` due deliveries, makes an attempt at each (at the same
        time), records them; the number of attempts made."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "UPDATE webhook_deliveries d"
                " SET attempts = d.attempts + 1,"
                " next_attempt_at = now() + make_interval(secs => $2)"
                " FROM (SELECT id FROM webhook_deliveries"
                " WHERE status = 'pending' AND next_attempt_at <= now()"
                " ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) due"
                " WHERE d.id = due.id"
                " RETURNING d.id, d.tenant, d.job_id, d.event_type, d.url, d.payload,"
                " d.attempts, d.created_at",
                limit,
                self.lease_seconds,
            )
        results = await asyncio.gather(
            *(self._attempt(row) for row in rows), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return len(rows)

    async def deliveries(self, job_id: str, tenant: str | None = None) -> list[Delivery]:
        """A job's deliveries, oldest first, each with its attempts. With `tenant`, only that
        tenant's."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, tenant, job_id, event_type, url, payload, status, attempts,"
                " next_attempt_at, last_error, created_at, delivered_at FROM webhook_deliveries"
                " WHERE job_id = $1 AND ($2::text IS NULL OR tenant = $2) ORDER BY created_at, id",
                parse_job_id(job_id),
                tenant,
            )
            tries = await conn.fetch(
                "SELECT delivery_id, attempt, attempted_at, status_code, error, duration_ms"
                " FROM webhook_attempts WHERE delivery_id = any($1::uuid[])"
                " ORDER BY delivery_id, attempt",
                [row["id"] for row in rows],
            )
        return [_delivery(row, [t for t in tries if t["delivery_id"] == row["id"]]) for row in rows]

    # One attempt

    async def _attempt(self, row: asyncpg.Record) -> None:
        delivery_id, attempt = str(row["id"]), row["attempts"]
        if attempt > self.max_attempts:
            # The previous claim ended without a record (its gateway stopped mid-send).
            outcome = _Outcome(error="the last attempt's outcome is unknown", retry=False)
        else:
            outcome = await self._send(row)
        await self._record(delivery_id, attempt, outcome)

    async def _send(self, row: asyncpg.Record) -> _Outcome:
        """Builds (first time) or reuses the body, then signs and sends it once."""
        try:
            check_webhook_url(row["url"], self.allow_private)
            secret = (await self._keys.tenant(row["tenant"])).webhook_secret
        except InvalidArgument as error:
            return _Outcome(error=f"refused: {error.violations[0].description}", retry=False)
        except NotFound:
            return _Outcome(error=f"refused: no tenant {row['tenant']!r}", retry=False)
        try:
            body = row["payload"] or await self._store_payload(row)
        except Exception as error:
            if is_blip(error):
                raise
            return _Outcome(error=f"could not render the job: {type(error).__name__}: {error}")
        msg_id = webhook_id(str(row["id"]))
        timestamp = int(time.time())
        headers = {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_seconds):
                response = await self._post(row["url"], headers, body.encode())
        except (_Refused, httpx.InvalidURL) as refused:
            return _Outcome(error=f"refused: {refused}", retry=False, duration_ms=_ms(started))
        except (TimeoutError, httpx.TimeoutException):
            return _Outcome(
                error=f"timed out after {self.timeout_seconds:g} s", duration_ms=_ms(started)
            )
        except (OSError, httpx.HTTPError) as error:
            return _Outcome(error=f"{type(error).__name__}: {error}", duration_ms=_ms(started))
        code = response.status_code
        retry_after = (
            _retry_after(response.headers.get("retry-after")) if code in (429, 503) else None
        )
        problem = "" if 200 <= code < 300 else f"HTTP {code}"
        if 300 <= code < 400:
            problem += " (redirects are not followed)"
        return _Outcome(code, problem, retry_after=retry_after, duration_ms=_ms(started))

    async def _store_payload(self, row: asyncpg.Record) -> str:
        """The body of every attempt, built on the first and stored (the first stored wins)."""
        async with asyncio.timeout(self.timeout_seconds):
            data = await self._render(str(row["job_id"]))
        created: datetime = row["created_at"]
        body = json.dumps(
            {
                "type": row["event_type"],
                "timestamp": created.astimezone(UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"),
                "data": data,
            },
            separators=(",", ":"),
        )
        async with self._pool.acquire() as conn:
            stored: str = await conn.fetchval(
                "UPDATE webhook_deliveries SET payload = coalesce(payload, $2) WHERE id = $1"
                " RETURNING payload",
                row["id"],
                body,
            )
        return stored

    async def _post(self, url: str, headers: dict[str, str], body: bytes) -> httpx.Response:
        """Resolves the host, refuses it (`_Refused`) if any address is not public (unless
        private ones are allowed), and posts to the checked addresses (in turn, while they
        refuse the connection) with the original host in the Host header and TLS server name."""
        target = httpx.URL(url)
        host = target.raw_host.decode("ascii")  # IDNA-encoded
        port = target.port or (443 if target.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise OSError(f"cannot resolve {host}: {error.strerror}") from error
        addresses = list(
            dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)
        )
        if not addresses:
            raise OSError(f"cannot resolve {host}")
        if not self.allow_private:
            refusal = refusal_for(host) or next(
                (
                    f"{host} resolves to {a}, not a public address"
                    for a in addresses
                    if not is_public(a)
                ),
                "",
            )
            if refusal:
                raise _Refused(refusal)
        headers = {**headers, "host": target.netloc.decode("ascii")}
        extensions = {}
        if target.scheme == "https" and ip_literal(host) is None:
            extensions["sni_hostname"] = host
        # A client per attempt: connections are never shared between hosts behind one address.
        async with httpx.AsyncClient(
            verify=self._tls,
            timeout=self.timeout_seconds,
            follow_redirects=False,
            trust_env=False,
        ) as client:

            async def post_to(address: IPAddress) -> httpx.Response:
                pinned = target.copy_with(host=str(address))
                request = client.build_request(
                    "POST", pinned, headers=headers, content=body, extensions=extensions
                )
                response = await client.send(request, stream=True)
                await response.aclose()  # the body is not read
                return response

            for address in addresses[:-1]:
                with contextlib.suppress(httpx.ConnectError):
                    return await post_to(address)
            return await post_to(addresses[-1])

    async def _record(self, delivery_id: str, attempt: int, outcome: _Outcome) -> None:
        """Writes the attempt and the delivery's next state, if the delivery is still this
        attempt's (its claim was not taken over after the lease ran out)."""
        if outcome.delivered:
            status, delay = DeliveryStatus.DELIVERED, 0.0
        elif not outcome.retry or attempt >= self.max_attempts:
            status, delay = DeliveryStatus.FAILED, 0.0
        else:
            status, delay = DeliveryStatus.PENDING, self._backoff(attempt, outcome.retry_after)
        last_error = outcome.error
        if status is DeliveryStatus.FAILED and outcome.retry:
            last_error = f"gave up after {attempt} attempts: {outcome.error}"
        async with self._pool.acquire() as conn, conn.transaction():
            mine = await conn.fetchval(
                "UPDATE webhook_deliveries SET status = $3, last_error = $4,"
                " next_attempt_at = now() + make_interval(secs => $5),"
                " delivered_at = CASE WHEN $3 = 'delivered' THEN now() END"
                " WHERE id = $1 AND attempts = $2 AND status = 'pending' RETURNING true",
                uuid.UUID(delivery_id),
                attempt,
                status.value,
                last_error,
                delay,
            )
            if mine:
                await conn.execute(
                    "INSERT INTO webhook_attempts (delivery_id, attempt, status_code, error,"
                    " duration_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    uuid.UUID(delivery_id),
                    attempt,
                    outcome.status_code,
                    outcome.error,
                    outcome.duration_ms,
                )
        what = f"webhook {webhook_id(delivery_id)} attempt {attempt}"
        if not mine:
            log.warning("%s: not recorded, the delivery was claimed again meanwhile", what)
        elif status is DeliveryStatus.DELIVERED:
            log.info("%s: delivered (HTTP %s)", what, outcome.status_code)
        elif status is DeliveryStatus.FAILED:
            log.warning("%s: failed for good: %s", what, last_error)
        else:
            log.info("%s: %s; trying again in %.1f s", what, outcome.error, delay)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before attempt `attempt + 1`: the receiver's Retry-After if it gave one,
        else the base doubled per attempt; capped, with a little jitter."""
        if retry_after is not None:
            return min(retry_after, MAX_BACKOFF_SECONDS)
        delay = min(self.base_backoff_seconds * 2.0 ** (attempt - 1), MAX_BACKOFF_SECONDS)
        return delay * (1 + 0.1 * random.random())

    # Waking up

    async def _until_next_due(self) -> float:
        """Seconds until the next pending delivery is due, at most POLL_SECONDS."""
        async with self._pool.acquire() as conn:
            seconds = await conn.fetchval(
                "SELECT extract(epoch FROM min(next_attempt_at) - clock_timestamp())::float8"
                " FROM webhook_deliveries WHERE status = 'pending'"
            )
        return POLL_SECONDS if seconds is None else max(0.01, min(float(seconds), POLL_SECONDS))


class _Listener:
    """A pool connection held to LISTEN on CHANNEL; each NOTIFY sets `wake`."""

    def __init__(self, pool: asyncpg.Pool, wake: asyncio.Event) -> None:
        self._pool = pool
        self._wake = wake
        self._conn: asyncpg.Connection | None = None

    @property
    def listening(self) -> bool:
        if self._conn is None:
            return False
        try:
            return not self._conn.is_closed()
        except asyncpg.InterfaceError:
            return False  # the pool took it back when it broke

    async def open(self) -> None:
        self._conn = await self._pool.acquire()
        await self._conn.add_listener(CHANNEL, self._notified)

    async def close(self) -> None:
        """Gives the connection back (a broken one too), without its listener: asyncpg warns
        of a connection released with one."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            await conn.remove_listener(CHANNEL, self._notified)
        with contextlib.suppress(Exception):
            await self._pool.release(conn)

    def _notified(self, *_: object) -> None:
        self._wake.set()


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


def _retry_after(value: str | None) -> float | None:
    """A Retry-After header's delay in seconds (given as seconds or as an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _delivery(row: asyncpg.Record, tries: Sequence[asyncpg.Record]) -> Delivery:
    return Delivery(
        id=str(row["id"]),
        tenant=row["tenant"],
        job_id=str(row["job_id"]),
        event_type=row["event_type"],
        url=row["url"],
        payload=row["payload"],
        status=DeliveryStatus(row["status"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        delivered_at=row["delivered_at"],
        history=tuple(
            DeliveryAttempt(
                attempt=t["attempt"],
                attempted_at=t["attempted_at"],
                status_code=t["status_code"],
                error=t["error"],
                duration_ms=t["duration_ms"],
            )
            for t in tries
        ),
    )
