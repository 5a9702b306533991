"""Uploads bound to what was asked: the tenant, the content type and the size. Real Postgres (the
`uploads` grants), a local folder store (the gateway's checked PUT, called directly and through a
small Starlette route using the facade's own body reader) and S3 through moto's server (the POST
policy). Whatever reaches a store is checked again by `verify` before a job may use it."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import asyncpg
import httpx
import pytest
import pytest_asyncio
from PIL import Image
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.common.db import connect
from services.common.errors import Forbidden, InvalidArgument, PayloadTooLarge
from services.common.objectstore import LocalStore, S3Store
from services.gateway.http_input import RequestContext, read_body
from services.gateway.uploads import NO_SUCH_UPLOAD, Upload, Uploads, upload_tenant
from services.tenants.keys import KeyStore
from tests.conftest import ServiceEnv

TTL = 600
FIELD = "guidance_images[0].key"
BASE_URL = "http://gateway.test"


def png(color: tuple[int, int, int] = (9, 90, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reader(data: bytes) -> tuple[Callable[[int], Awaitable[bytes]], list[int]]:
    """A body reader as the HTTP facade passes one (PayloadTooLarge past its limit), and the
    limits it was called with."""
    limits: list[int] = []

    async def read(limit: int) -> bytes:
        limits.append(limit)
        if len(data) > limit:
            raise PayloadTooLarge("body", limit)
        return data

    return read, limits


def signed_params(upload: Upload, **changes: str) -> dict[str, str]:
    params = dict(parse_qsl(urlsplit(upload.upload_url).query))
    params.update(changes)
    return params


@pytest_asyncio.fixture(scope="module")
async def pool(env: ServiceEnv) -> AsyncIterator[asyncpg.Pool]:
    opened = await connect(env.database_url)
    keys = KeyStore(opened)
    for tenant in ("tenant-a", "tenant-b"):
        await keys.ensure_tenant(tenant)
    yield opened
    await opened.close()


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "objects", b"test-signing-key", BASE_URL, ttl_seconds=TTL)


@pytest.fixture
def uploads(local: LocalStore, pool: asyncpg.Pool) -> Uploads:
    return Uploads(local, pool, TTL)


def put_route(uploads: Uploads) -> Starlette:
    """The PUT route as the facade serves it: the facade's body reader and error answers."""

    async def put_file(request: Request) -> Response:
        key = request.path_params["key"]
        await uploads.receive_put(
            key,
            request.query_params,
            request.headers.get("content-type", ""),
            lambda limit: read_body(request, limit),
        )
        return JSONResponse({"key": key}, status_code=201)

    return Starlette(
        routes=[Route("/files/{key:path}", put_file, methods=["PUT"])],
        middleware=[Middleware(RequestContext)],
    )


def fields_of(response: httpx.Response) -> list[str]:
    return [v["field"] for v in response.json()["error"].get("field_violations", [])]


# The gateway's checked PUT (local folder store)


async def test_a_put_of_the_declared_bytes_to_the_presigned_url_is_stored(
    uploads: Uploads, local: LocalStore
) -> None:
    data = png()
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data))
    assert upload.method == "PUT" and upload.fields == {}
    assert upload.key == f"uploads/tenant-a/{sha(data)[:2]}/{sha(data)}.png"
    assert upload.headers == {"Content-Type": "image/png"} and upload.max_bytes == len(data)
    url = urlsplit(upload.upload_url)
    transport = httpx.ASGITransport(app=put_route(uploads))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        response = await client.put(f"{url.path}?{url.query}", content=data, headers=upload.headers)
    assert response.status_code == 201, response.text
    assert await local.get(upload.key) == data
    await uploads.verify(upload.key, FIELD, "tenant-a")


async def test_presign_records_the_grant_of_the_tenant(
    uploads: Uploads, pool: asyncpg.Pool
) -> None:
    data = png((1, 1, 1))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data))
    row = await pool.fetchrow("SELECT * FROM uploads WHERE key = $1", upload.key)
    assert row is not None
    assert (row["tenant"], row["content_type"], row["max_bytes"], row["sha256"]) == (
        "tenant-a",
        "image/png",
        len(data),
        sha(data),
    )
    assert int(row["expires_at"].timestamp()) == upload.expires_at


@pytest.mark.parametrize(
    ("content_type", "digest", "size_bytes", "field"),
    [
        ("image/gif", "ab" * 32, 10, "content_type"),
        ("image/png", "AB" * 32, 10, "sha256"),
        ("image/png", "ab" * 32, 0, "size_bytes"),
        ("image/png", "ab" * 32, 20 * 1024 * 1024 + 1, "size_bytes"),
    ],
    ids=["gif", "uppercase-sha", "empty", "over-the-limit"],
)
async def test_presign_refuses_what_cannot_be_uploaded_naming_the_field(
    uploads: Uploads, content_type: str, digest: str, size_bytes: int, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await uploads.presign("tenant-a", content_type, digest, size_bytes)
    assert [v.field for v in caught.value.violations] == [field]


async def test_a_body_over_the_declared_size_is_refused_with_413_and_nothing_is_stored(
    uploads: Uploads, local: LocalStore
) -> None:
    data = png((2, 2, 2))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data) - 1)
    url = urlsplit(upload.upload_url)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused while it streams
        yield data[:64]
        yield data[64:]

    transport = httpx.ASGITransport(app=put_route(uploads))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        for body in (data, chunks()):
            response = await client.put(
                f"{url.path}?{url.query}", content=body, headers=upload.headers
            )
            assert response.status_code == 413, response.text
            assert fields_of(response) == ["body"]
    assert not await local.exists(upload.key)


async def test_receive_put_reads_no_more_than_the_declared_size(
    uploads: Uploads, local: LocalStore
) -> None:
    data = png((3, 3, 3))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data) - 1)
    read, limits = reader(data)
    with pytest.raises(PayloadTooLarge):
        await uploads.receive_put(upload.key, signed_params(upload), "image/png", read)
    assert limits == [len(data) - 1]
    assert not await local.exists(upload.key)


async def test_a_put_of_another_content_type_is_refused_naming_content_type(
    uploads: Uploads, local: LocalStore
) -> None:
    data = png((4, 4, 4))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data))
    read, limits = reader(data)
    with pytest.raises(InvalidArgument) as caught:
        await uploads.receive_put(upload.key, signed_params(upload), "image/jpeg", read)
    assert [v.field for v in caught.value.violations] == ["Content-Type"]
    assert limits == [] and not await local.exists(upload.key)


@pytest.mark.parametrize(
    "changes",
    [
        {"ct": "image/jpeg"},
        {"max": str(20 * 1024 * 1024)},
        {"expires": "9999999999"},
        {"signature": "0" * 64},
        {"signature": "é"},
        {"max": "²"},
        {"expires": "1" * 5000},
    ],
    ids=[
        "content-type",
        "max-size",
        "expiry",
        "signature",
        "non-ascii-signature",
        "non-ascii",
        "5000-digits",
    ],
)
async def test_changing_a_signed_parameter_of_the_put_url_is_forbidden(
    uploads: Uploads, local: LocalStore, changes: dict[str, str]
) -> None:
    data = png((5, 5, 5))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data))
    read, limits = reader(data)
    content_type = changes.get("ct", "image/png")
    with pytest.raises(Forbidden) as caught:
        await uploads.receive_put(upload.key, signed_params(upload, **changes), content_type, read)
    assert caught.value.message.split(":")[0] == "signature"
    assert limits == [] and not await local.exists(upload.key)


async def test_a_put_url_is_bound_to_its_key(uploads: Uploads, local: LocalStore) -> None:
    data, other = png((6, 6, 6)), png((7, 7, 7))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data))
    other_key = f"uploads/tenant-a/{sha(other)[:2]}/{sha(other)}.png"
    read, _ = reader(other)
    with pytest.raises(Forbidden):
        await uploads.receive_put(other_key, signed_params(upload), "image/png", read)
    assert not await local.exists(other_key)


async def test_an_expired_put_url_is_forbidden(local: LocalStore, pool: asyncpg.Pool) -> None:
    expired = Uploads(local, pool, ttl_seconds=-1)
    data = png((8, 8, 8))
    upload = await expired.presign("tenant-a", "image/png", sha(data), len(data))
    read, limits = reader(data)
    with pytest.raises(Forbidden) as caught:
        await expired.receive_put(upload.key, signed_params(upload), "image/png", read)
    assert caught.value.message.split(":")[0] == "expires"
    assert limits == [] and not await local.exists(upload.key)


async def test_a_put_of_other_bytes_than_the_key_names_is_refused(
    uploads: Uploads, local: LocalStore
) -> None:
    data, other = png((9, 9, 9)), png((10, 10, 10))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(other))
    read, _ = reader(other)
    with pytest.raises(InvalidArgument) as caught:
        await uploads.receive_put(upload.key, signed_params(upload), "image/png", read)
    assert [v.field for v in caught.value.violations] == ["body"]
    assert not await local.exists(upload.key)


async def test_the_put_route_takes_nothing_when_uploads_go_to_s3(
    s3: S3Store, pool: asyncpg.Pool, local: LocalStore
) -> None:
    data = png((11, 11, 11))
    signed = await Uploads(local, pool, TTL).presign("tenant-a", "image/png", sha(data), len(data))
    read, limits = reader(data)
    with pytest.raises(Forbidden):
        await Uploads(s3, pool, TTL).receive_put(
            signed.key, signed_params(signed), "image/png", read
        )
    assert limits == [] and not await s3.exists(signed.key)


# Checked again when used


def test_upload_tenant_names_the_owner_of_upload_keys_only() -> None:
    digest = "ab" * 32
    assert upload_tenant(f"uploads/tenant-a/ab/{digest}.png") == "tenant-a"
    assert upload_tenant(f"uploads/ab/{digest}.png") is None  # the old, tenant-less form
    assert upload_tenant(f"uploads/tenant-a/cd/{digest}.png") is None
    assert upload_tenant(f"images/ab/{digest}.png") is None


async def test_another_tenants_upload_is_refused_exactly_as_a_missing_one(
    uploads: Uploads, local: LocalStore
) -> None:
    data = png((12, 12, 12))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data))
    await local.put(upload.key, data, "image/png")
    await uploads.verify(upload.key, FIELD, "tenant-a")  # verified (and remembered) for a

    never = png((13, 13, 13))
    missing_own = f"uploads/tenant-b/{sha(never)[:2]}/{sha(never)}.png"
    # tenant-b's key for the same bytes: stored (as an S3 client could) but never granted to b.
    copied = f"uploads/tenant-b/{sha(data)[:2]}/{sha(data)}.png"
    await local.put(copied, data, "image/png")
    refusals = []
    for key in (upload.key, copied, missing_own):
        with pytest.raises(InvalidArgument) as caught:
            await uploads.verify(key, FIELD, "tenant-b")
        refusals.append([(v.field, v.description) for v in caught.value.violations])
    assert refusals == [[(FIELD, NO_SUCH_UPLOAD)]] * 3


async def test_an_object_larger_than_its_grant_is_refused_when_used(
    uploads: Uploads, local: LocalStore
) -> None:
    data = png((14, 14, 14))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data) - 1)
    await local.put(upload.key, data, "image/png")  # past the gateway, as an S3 client could
    with pytest.raises(InvalidArgument) as caught:
        await uploads.verify(upload.key, FIELD, "tenant-a")
    assert [v.field for v in caught.value.violations] == [FIELD]


async def test_an_object_of_another_type_than_its_grant_is_refused_when_used(
    uploads: Uploads, local: LocalStore
) -> None:
    data = jpeg()
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data))
    await local.put(upload.key, data, "image/png")  # a JPEG under the .png grant
    with pytest.raises(InvalidArgument) as caught:
        await uploads.verify(upload.key, FIELD, "tenant-a")
    assert [v.field for v in caught.value.violations] == [FIELD]


async def test_a_grant_with_nothing_uploaded_yet_is_refused_when_used(uploads: Uploads) -> None:
    data = png((15, 15, 15))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data))
    with pytest.raises(InvalidArgument) as caught:
        await uploads.verify(upload.key, FIELD, "tenant-a")
    assert [v.field for v in caught.value.violations] == [FIELD]


async def test_a_key_not_from_presign_is_refused_naming_the_field(uploads: Uploads) -> None:
    for key in (
        f"uploads/{'0' * 2}/{'0' * 64}.png",  # the old, tenant-less form
        f"uploads/tenant-a/zz/{'0' * 64}.png",
        f"images/00/{'0' * 64}.png",
    ):
        with pytest.raises(InvalidArgument) as caught:
            await uploads.verify(key, FIELD, "tenant-a")
        assert [v.field for v in caught.value.violations] == [FIELD], key


async def test_a_new_grant_of_a_verified_key_is_checked_again(
    uploads: Uploads, local: LocalStore
) -> None:
    data = png((16, 16, 16))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data))
    await local.put(upload.key, data, "image/png")
    await uploads.verify(upload.key, FIELD, "tenant-a")
    await uploads.presign("tenant-a", "image/png", sha(data), len(data) - 1)
    with pytest.raises(InvalidArgument):
        await uploads.verify(upload.key, FIELD, "tenant-a")


# S3: the POST policy


async def test_the_s3_post_policy_form_stores_the_upload(s3: S3Store, pool: asyncpg.Pool) -> None:
    uploads = Uploads(s3, pool, TTL)
    data = png((17, 17, 17))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data))
    assert upload.method == "POST" and upload.headers == {}
    assert upload.fields["key"] == upload.key
    assert upload.fields["Content-Type"] == "image/png"
    async with httpx.AsyncClient() as client:
        posted = await client.post(
            upload.upload_url,
            data=upload.fields,
            files={"file": ("guide.png", data, "image/png")},
        )
    assert posted.status_code in (200, 201, 204), posted.text
    assert await s3.get(upload.key) == data
    await uploads.verify(upload.key, FIELD, "tenant-a")


async def test_an_s3_object_the_store_let_through_oversized_is_refused_when_used(
    s3: S3Store, pool: asyncpg.Pool
) -> None:
    """Real S3 and MinIO hold a POST to the policy's length range; whatever a store let through
    anyway (or a client with the bucket's credentials put) is refused when used."""
    uploads = Uploads(s3, pool, TTL)
    data = png((18, 18, 18))
    upload = await uploads.presign("tenant-a", "image/png", sha(data), len(data) - 1)
    await s3.put(upload.key, data, "image/png")
    with pytest.raises(InvalidArgument) as caught:
        await uploads.verify(upload.key, FIELD, "tenant-a")
    assert [v.field for v in caught.value.violations] == [FIELD]
