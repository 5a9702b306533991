"""`AsyncClient` and `Client`: the public API with retries, stream resumption and downloads.

The target picks the transport: `http://` and `https://` the HTTP facade (JSON and SSE),
`grpc://` and `grpcs://` the gRPC API; a bare `host:port` takes `transport=`. The API key
comes from `api_key` or IMAGEGEN_API_KEY, the target from IMAGEGEN_URL (else
http://127.0.0.1:8080; for `transport="grpc"`, IMAGEGEN_GRPC_URL, else 127.0.0.1:50051).

`Client` is `AsyncClient` run on a private event loop thread: the same calls, the same
behaviour, blocking.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import mimetypes
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, Unpack

import httpx

from imagegen.errors import (
    FieldViolation,
    InvalidArgument,
    JobFailed,
    NotFound,
    PermissionDenied,
    Unavailable,
    WaitTimeout,
)
from imagegen.grpc_transport import GrpcTransport
from imagegen.http_transport import HttpTransport, error_from_response, network_error
from imagegen.retry import RetryPolicy, with_retries
from imagegen.transport import USER_AGENT, PresignedUpload, Transport
from imagegen.types import (
    CacheHit,
    Estimate,
    Event,
    Final,
    Job,
    JobStatus,
    Model,
    Spec,
    SpecFields,
    SubmitFields,
    Variant,
    check_digest,
    make_options,
    make_spec,
    write_png,
)

T = TypeVar("T")
TransportName = Literal["http", "grpc"]
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_GRPC = "127.0.0.1:50051"
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
}


def resolve_target(target: str | None, transport: str | None) -> tuple[TransportName, str, bool]:
    """(transport, address, TLS) for a target URL, the environment's, or the default."""
    if transport not in (None, "http", "grpc"):
        raise ValueError(f"transport must be 'http' or 'grpc', not {transport!r}")
    if not target:
        env_url = os.environ.get("IMAGEGEN_URL", "")
        if transport == "grpc":
            grpc_url = env_url if env_url.startswith(("grpc://", "grpcs://")) else ""
            target = os.environ.get("IMAGEGEN_GRPC_URL") or grpc_url or DEFAULT_GRPC
        else:
            target = env_url or DEFAULT_URL
    scheme, sep, rest = target.partition("://")
    scheme = scheme.lower() if sep else ""
    if not sep:
        rest = target
    kinds: dict[str, tuple[TransportName, bool]] = {
        "http": ("http", False),
        "https": ("http", True),
        "grpc": ("grpc", False),
        "grpcs": ("grpc", True),
    }
    if scheme and scheme not in kinds:
        raise ValueError(f"{target!r}: the scheme must be http, https, grpc or grpcs")
    kind: TransportName
    if scheme:
        kind, secure = kinds[scheme]
    else:
        kind, secure = ("grpc" if transport == "grpc" else "http"), False
    if transport is not None and transport != kind:
        raise ValueError(f"{target!r} is not a {transport} target")
    if kind == "http":
        return kind, f"{'https' if secure else 'http'}://{rest.rstrip('/')}", secure
    return kind, rest.rstrip("/"), secure


def _http_fallback() -> str | None:
    """The HTTP facade a gRPC client asks for what gRPC does not offer, from the environment."""
    env_url = os.environ.get("IMAGEGEN_URL", "")
    return os.environ.get("IMAGEGEN_HTTP_URL") or (
        env_url if env_url.startswith(("http://", "https://")) else None
    )


def content_type_of(data: bytes, name: str = "") -> str | None:
    for signature, kind in _SIGNATURES.items():
        if data.startswith(signature):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return mimetypes.guess_type(name)[0] if name else None


class AsyncClient:
    """The imagegen API, asynchronous. Use `async with AsyncClient(...) as client:` or call
    `aclose()`. Every call is retried as `retry` says (submits safely: each carries an
    idempotency key, the same on every try)."""

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        transport: TransportName | None = None,
        http_url: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        kind, address, secure = resolve_target(target, transport)
        self.transport: TransportName = kind
        self.target = address
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get("IMAGEGEN_API_KEY", "")
        self._http = httpx.AsyncClient(headers={"User-Agent": USER_AGENT}, follow_redirects=False)
        self._transport: Transport
        if kind == "http":
            self._transport = HttpTransport(address, key, self._http, timeout)
        else:
            fallback_url = http_url or _http_fallback()
            fallback = None
            if fallback_url:
                _, fallback_address, _ = resolve_target(fallback_url, "http")
                fallback = HttpTransport(fallback_address, key, self._http, timeout)
            self._transport = GrpcTransport(address, key, timeout, secure, fallback)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()
        await self._http.aclose()

    async def _retrying(self, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return await with_retries(self.retry, call)

    # Jobs

    async def submit(
        self, spec: str | Spec | None = None, /, **fields: Unpack[SubmitFields]
    ) -> Job:
        """Creates a job and returns it at once (queued, or completed from the cache). `spec`
        is a prompt or a Spec; keyword arguments set Spec fields and how to run the job
        (`cache`, `priority`, `max_cost_cents`, `webhook`, `seed_agnostic_cache`,
        `idempotency_key`: one is made when not given, so a retried submit returns the same
        job)."""
        request = make_spec(spec, fields)
        options = make_options(fields)
        key = fields.get("idempotency_key") or f"sdk-{uuid.uuid4()}"
        return await self._retrying(lambda: self._transport.create(request, options, key))

    async def get(self, job_id: str) -> Job:
        """The job as it is now."""
        return await self._retrying(lambda: self._transport.get(job_id))

    async def cancel(self, job_id: str) -> Job:
        """Cancels a queued job at once, a running one at its next step; the job after."""
        return await self._retrying(lambda: self._transport.cancel(job_id))

    async def stream(self, job_id: str, after: str | None = None) -> AsyncIterator[Event]:
        """The job's events after the event id `after` (from the start when None), then live
        ones, ending with its `Final` event. A dropped connection is resumed after the last
        event received, so no event is lost or repeated."""
        last: tuple[str, str] = (after or "", "")
        failures = 0
        while True:
            received = 0
            try:
                async for event in self._transport.watch(job_id, last[0]):
                    kind = type(event).__name__
                    if _seen(last, event.id, kind):
                        continue
                    last, received, failures = (event.id, kind), received + 1, 0
                    yield event
                    if isinstance(event, Final):
                        return
            except Unavailable as error:
                failures += 1
                wait = self.retry.delay(failures, error)
                if wait is None:
                    raise
                await asyncio.sleep(wait)
                continue
            if received == 0:
                return  # nothing after `last`: the job had ended before it
            failures += 1  # the server closed the stream early (it is shutting down)
            wait = self.retry.delay(failures, Unavailable("the event stream ended early"))
            if wait is None:
                raise Unavailable(f"the event stream of job {job_id} keeps ending early")
            await asyncio.sleep(wait)

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the API's: WaitTimeout, the job goes on
        check: bool = True,
    ) -> Job:
        """The job once it has ended. Raises JobFailed when it failed or was cancelled (unless
        `check` is false) and WaitTimeout after `timeout` seconds (the job goes on)."""
        try:
            async with asyncio.timeout(timeout):
                job = await self.get(job_id)
                if not job.done:
                    job = await self._follow(job_id, None)
        except TimeoutError:
            raise WaitTimeout(f"job {job_id} did not end within {timeout}s", job_id) from None
        if check and job.status != JobStatus.COMPLETED:
            raise JobFailed(job)
        return job

    async def _follow(self, job_id: str, on_event: Callable[[Event], Any] | None) -> Job:
        async for event in self.stream(job_id):
            if on_event is not None:
                on_event(event)
            if isinstance(event, Final):
                return event.job
        return await self.get(job_id)

    async def generate(
        self,
        spec: str | Spec | None = None,
        /,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - as in wait
        on_event: Callable[[Event], Any] | None = None,
        **fields: Unpack[SubmitFields],
    ) -> Job:
        """Submits a job and follows it to its end: the completed job, its variants ready to
        download (`download`, `save`, or `variant.save(path)`). `on_event` sees each event
        as it comes. Raises JobFailed when the job fails or is cancelled, WaitTimeout after
        `timeout` seconds."""
        submitted = await self.submit(spec, **fields)
        job = submitted
        try:
            async with asyncio.timeout(timeout):
                if not submitted.done:
                    job = await self._follow(submitted.id, on_event)
        except TimeoutError:
            raise WaitTimeout(
                f"job {submitted.id} did not end within {timeout}s", submitted.id
            ) from None
        job = dataclasses.replace(
            job, estimate=submitted.estimate, idempotent_replay=submitted.idempotent_replay
        )
        if job.status != JobStatus.COMPLETED:
            raise JobFailed(job)
        return job

    # Prices, the cache, models

    async def estimate(
        self, spec: str | Spec | None = None, /, **fields: Unpack[SpecFields]
    ) -> Estimate:
        """The price of a request, with its breakdown, without running it."""
        request = make_spec(spec, fields)
        return await self._retrying(lambda: self._transport.estimate(request))

    async def lookup(
        self,
        spec: str | Spec | None = None,
        /,
        *,
        seed_agnostic: bool = False,
        **fields: Unpack[SpecFields],
    ) -> CacheHit | None:
        """The cached result for a request, or None. `seed_agnostic` takes one made with any
        seed. (Over gRPC: asks the HTTP facade; see `http_url`.)"""
        request = make_spec(spec, fields)
        return await self._retrying(lambda: self._transport.lookup(request, seed_agnostic))

    async def models(self) -> list[Model]:
        """The served models (over gRPC: from the HTTP facade; see `http_url`)."""
        return await self._retrying(self._transport.models)

    # Files

    async def upload(
        self, source: str | PathLike[str] | bytes, content_type: str | None = None
    ) -> str:
        """Uploads a PNG, JPEG or WebP image (a path or the bytes) and returns its key, for
        `GuidanceImage(key, role)`. The bytes go to a presigned URL (PUT, or an S3 POST form),
        never with the API key."""
        if isinstance(source, bytes):
            data, name = source, ""
        else:
            path = Path(source)
            data, name = await asyncio.to_thread(path.read_bytes), path.name
        kind = content_type or content_type_of(data, name)
        if kind is None:
            raise InvalidArgument(
                "invalid request: content_type: not a PNG, JPEG or WebP image; give content_type",
                [FieldViolation("content_type", "not a PNG, JPEG or WebP image")],
            )
        digest = hashlib.sha256(data).hexdigest()
        target = await self._retrying(lambda: self._transport.presign(kind, digest, len(data)))
        await self._retrying(lambda: self._send_upload(target, data, kind))
        return target.key

    async def _send_upload(self, target: PresignedUpload, data: bytes, kind: str) -> None:
        try:
            if target.method == "POST":
                response = await self._http.post(
                    target.upload_url,
                    data=target.fields,
                    files={"file": ("upload", data, kind)},
                    timeout=self.timeout,
                )
            else:
                response = await self._http.put(
                    target.upload_url, content=data, headers=target.headers, timeout=self.timeout
                )
        except httpx.TransportError as error:
            raise network_error("upload", error, "") from None
        if not response.is_success:
            raise error_from_response(response)

    async def download(self, variant: Variant) -> bytes:
        """The variant's PNG, checked against its SHA-256. An expired (or missing) URL is
        renewed by reading the job again."""
        if variant.url:
            try:
                return await self._retrying(lambda: self._fetch(variant, variant.url))
            except (PermissionDenied, NotFound):
                pass  # the signed URL ran out: ask for a fresh one
        fresh = await self.get(variant.job_id)
        urls = [v.url for v in fresh.variants if v.index == variant.index and v.url]
        if urls:
            return await self._retrying(lambda: self._fetch(variant, urls[0]))
        raise NotFound(f"job {variant.job_id} has no variant {variant.index}")

    async def _fetch(self, variant: Variant, url: str) -> bytes:
        try:
            response = await self._http.get(url, timeout=self.timeout)
        except httpx.TransportError as error:
            raise network_error("download", error, "") from None
        if response.status_code != 200:
            raise error_from_response(response)
        return check_digest(variant, response.content)

    async def save(self, variant: Variant, path: str | PathLike[str]) -> Path:
        """Downloads the variant to `path` (a folder: `<job id>-<index>.png` in it)."""
        data = await self.download(variant)
        return await asyncio.to_thread(write_png, variant, data, path)


def _order(event_id: str) -> tuple[int, ...] | None:
    """An event id ("<ms>-<seq>") as numbers that sort as the stream does."""
    try:
        return tuple(int(part) for part in event_id.split("-"))
    except ValueError:
        return None


def _seen(last: tuple[str, str], event_id: str, kind: str) -> bool:
    """Whether an event was already yielded: at or before the last one. The server may end a
    stream whose events were lost with a Final carrying the last event's id; that is new."""
    last_id, last_kind = last
    if not last_id:
        return False
    before, now = _order(last_id), _order(event_id)
    if before is None or now is None:
        return event_id == last_id and kind == last_kind
    return now < before or (now == before and kind == last_kind)


class _Loop:
    """A private event loop on a daemon thread, which runs the AsyncClient's coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="imagegen-client", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C in the caller's thread: stop the call too
            raise

    def iterate(self, events: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> T:
            return await anext(events)

        try:
            while True:
                try:
                    yield self.run(step())
                except StopAsyncIteration:
                    return
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                self.run(close())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Client:
    """The imagegen API, blocking: the same calls as AsyncClient (which it runs on a private
    event loop thread). Use `with Client(...) as client:` or call `close()`."""

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        transport: TransportName | None = None,
        http_url: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._loop = _Loop()

        async def make() -> AsyncClient:
            return AsyncClient(
                target,
                api_key=api_key,
                transport=transport,
                http_url=http_url,
                timeout=timeout,
                retry=retry,
            )

        try:
            self._client = self._loop.run(make())
        except BaseException:
            self._loop.stop()
            raise
        self.transport = self._client.transport
        self.target = self._client.target

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._client.aclose())
        finally:
            self._loop.stop()

    def submit(self, spec: str | Spec | None = None, /, **fields: Unpack[SubmitFields]) -> Job:
        """See AsyncClient.submit."""
        return self._loop.run(self._client.submit(spec, **fields))

    def get(self, job_id: str) -> Job:
        return self._loop.run(self._client.get(job_id))

    def cancel(self, job_id: str) -> Job:
        return self._loop.run(self._client.cancel(job_id))

    def stream(self, job_id: str, after: str | None = None) -> Iterator[Event]:
        """See AsyncClient.stream."""
        return self._loop.iterate(self._client.stream(job_id, after))

    def wait(self, job_id: str, *, timeout: float | None = None, check: bool = True) -> Job:
        return self._loop.run(self._client.wait(job_id, timeout=timeout, check=check))

    def generate(
        self,
        spec: str | Spec | None = None,
        /,
        *,
        timeout: float | None = None,
        on_event: Callable[[Event], Any] | None = None,
        **fields: Unpack[SubmitFields],
    ) -> Job:
        """See AsyncClient.generate (`on_event` runs on the client's thread)."""
        return self._loop.run(
            self._client.generate(spec, timeout=timeout, on_event=on_event, **fields)
        )

    def estimate(self, spec: str | Spec | None = None, /, **fields: Unpack[SpecFields]) -> Estimate:
        return self._loop.run(self._client.estimate(spec, **fields))

    def lookup(
        self,
        spec: str | Spec | None = None,
        /,
        *,
        seed_agnostic: bool = False,
        **fields: Unpack[SpecFields],
    ) -> CacheHit | None:
        return self._loop.run(self._client.lookup(spec, seed_agnostic=seed_agnostic, **fields))

    def models(self) -> list[Model]:
        return self._loop.run(self._client.models())

    def upload(self, source: str | PathLike[str] | bytes, content_type: str | None = None) -> str:
        return self._loop.run(self._client.upload(source, content_type))

    def download(self, variant: Variant) -> bytes:
        return self._loop.run(self._client.download(variant))

    def save(self, variant: Variant, path: str | PathLike[str]) -> Path:
        return self._loop.run(self._client.save(variant, path))
