"""Both object-store backends through the one interface: the local folder with HMAC-signed URLs,
and S3 through `minio` against an S3 protocol server on 127.0.0.1 (moto's standalone server)."""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from services.common.errors import InvalidArgument, NotFound
from services.common.objectstore import LocalStore, S3Store, content_key

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


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


async def test_s3_presigned_post_uploads_and_presigned_get_downloads_over_http(
    s3: S3Store,
) -> None:
    key = content_key(PNG, "uploads", "png")
    url, fields = s3.presigned_post(key, "image/png", len(PNG))
    async with httpx.AsyncClient() as client:
        posted = await client.post(url, data=fields, files={"file": ("x.png", PNG, "image/png")})
        assert posted.status_code == 204, posted.text
        got = await client.get(s3.download_url(key))
    assert got.status_code == 200 and got.content == PNG
    assert got.headers["content-type"] == "image/png"


def test_s3_post_policy_binds_the_key_content_type_size_and_expiry(s3: S3Store) -> None:
    """The conditions S3 and MinIO enforce on the POST (moto's server stores whatever is
    posted, so they are read from the signed policy here; uploads are checked again when
    used)."""
    key = content_key(PNG, "uploads", "png")
    expires = int(time.time()) + 300
    _, fields = s3.presigned_post(key, "image/png", 1234, expires)
    assert (fields["key"], fields["Content-Type"]) == (key, "image/png")
    policy = json.loads(base64.b64decode(fields["policy"]))
    conditions = policy["conditions"]
    assert ["eq", "$key", key] in conditions
    assert ["eq", "$Content-Type", "image/png"] in conditions
    assert ["content-length-range", 1, 1234] in conditions
    signed_expiry = datetime.fromisoformat(policy["expiration"].replace("Z", "+00:00"))
    assert int(signed_expiry.timestamp()) == expires


async def test_s3_size_and_delete_and_deleting_a_missing_object_is_fine(s3: S3Store) -> None:
    key = content_key(PNG, "images", "png")
    await s3.put(key, PNG, "image/png")
    assert await s3.size(key) == len(PNG)
    await s3.delete(key)
    assert not await s3.exists(key)
    await s3.delete(key)
    with pytest.raises(NotFound):
        await s3.size(key)


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


async def test_local_size_and_delete_and_deleting_a_missing_object_is_fine(
    local: LocalStore,
) -> None:
    key = content_key(PNG, "images", "png")
    await local.put(key, PNG, "image/png")
    assert await local.size(key) == len(PNG)
    await local.delete(key)
    assert not await local.exists(key)
    await local.delete(key)
    with pytest.raises(NotFound):
        await local.size(key)


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


def test_local_put_urls_verify_only_for_their_key_type_size_and_lifetime(
    local: LocalStore,
) -> None:
    key = "uploads/tenant-a/ab/x.png"
    url = httpx.URL(local.put_url(key, "image/png", 100, int(time.time()) + 60))
    assert url.path == f"/files/{key}"
    signed = {name: url.params[name] for name in ("expires", "ct", "max", "signature")}
    assert signed["ct"] == "image/png" and signed["max"] == "100"

    def verify(**changes: str) -> bool:
        params = {**signed, "key": key, **changes}
        return local.verify_put(
            params["key"], params["expires"], params["ct"], params["max"], params["signature"]
        )

    assert verify()
    assert not verify(key="uploads/tenant-b/ab/x.png")
    assert not verify(ct="image/jpeg")
    assert not verify(max="101")
    assert not verify(expires=str(int(signed["expires"]) + 1))
    assert not verify(max="²", signature="é")
    # A bound PUT signature is no GET signature, and no unbound PUT is ever accepted.
    assert not local.verify("GET", key, signed["expires"], signed["signature"])
    assert not local.verify("PUT", key, signed["expires"], signed["signature"])
    past = int(time.time()) - 1
    expired = local.signature("PUT", key, past, "image/png", 100)
    assert not local.verify_put(key, str(past), "image/png", "100", expired)
