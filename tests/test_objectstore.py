"""Both object-store backends through the one interface: the local folder with HMAC-signed URLs,
and S3 through `minio` against an S3 protocol server on 127.0.0.1 (moto's standalone server)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.errors import InvalidArgument, NotFound
from services.common.objectstore import LocalStore, S3Store, content_key, open_store
from services.common.settings import CommonSettings
from services.mesh import free_port

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, tmp_path: Path) -> S3Store:
    settings = CommonSettings(
        s3_endpoint=s3_endpoint,
        s3_access_key="test-access",
        s3_secret_key="test-secret",
        s3_bucket=f"imagegen-{tmp_path.name.lower().replace('_', '-')[:40]}",
        data_dir=tmp_path,
    )
    store = open_store(settings)
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "objects", b"key", "http://127.0.0.1:8080", ttl_seconds=60)


def test_content_keys_address_the_bytes() -> None:
    assert content_key(PNG, "images", "png") == content_key(PNG, "images", "png")
    assert content_key(PNG, "images", "png") != content_key(PNG + b"!", "images", "png")
    assert content_key(PNG, "images", "png").startswith("images/")


async def test_s3_put_get_exists_round_trip(s3: S3Store) -> None:
    key = content_key(PNG, "images", "png")
    assert not await s3.exists(key)
    await s3.put(key, PNG, "image/png")
    assert await s3.exists(key)
    assert await s3.get(key) == PNG


async def test_s3_missing_object_is_not_found(s3: S3Store) -> None:
    with pytest.raises(NotFound):
        await s3.get("images/00/missing.png")


async def test_s3_presigned_urls_download_and_upload_over_http(s3: S3Store) -> None:
    key = content_key(PNG, "uploads", "png")
    async with httpx.AsyncClient() as client:
        put = await client.put(s3.upload_url(key), content=PNG)
        assert put.status_code == 200
        got = await client.get(s3.download_url(key))
    assert got.status_code == 200 and got.content == PNG


async def test_s3_rejects_keys_outside_the_key_pattern(s3: S3Store) -> None:
    with pytest.raises(InvalidArgument):
        await s3.put("../etc/passwd", b"x", "text/plain")


async def test_local_put_get_exists_round_trip(local: LocalStore) -> None:
    key = content_key(PNG, "images", "png")
    assert not await local.exists(key)
    await local.put(key, PNG, "image/png")
    assert await local.exists(key) and await local.get(key) == PNG
    with pytest.raises(NotFound):
        await local.get("images/00/missing.png")


def test_local_signed_urls_verify_only_for_their_method_key_and_lifetime(
    local: LocalStore,
) -> None:
    url = httpx.URL(local.download_url("images/ab/x.png"))
    expires, signature = url.params["expires"], url.params["signature"]
    assert local.verify("GET", "images/ab/x.png", expires, signature)
    assert not local.verify("PUT", "images/ab/x.png", expires, signature)
    assert not local.verify("GET", "images/ab/y.png", expires, signature)
    assert not local.verify("GET", "images/ab/x.png", str(int(expires) + 1), signature)
    past = int(time.time()) - 1
    assert not local.verify(
        "GET", "images/ab/x.png", str(past), local.signature("GET", "images/ab/x.png", past)
    )
