"""Object storage: content-addressed keys, two backends behind one interface.

`LocalStore` keeps objects in a folder and hands out HMAC-signed expiring URLs that the gateway
serves: GET URLs to read, and PUT URLs bound to one content type and a byte limit. `S3Store` uses
MinIO/S3 through `minio`: presigned GET URLs to read, presigned POST policies (key, content type
and a length range the store enforces) to write. `open_store` picks one from the settings, so
nothing else knows which is in use.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import urlencode

from services.common.errors import InvalidArgument, NotFound
from services.common.settings import CommonSettings

URL_STEP_SECONDS = 60
_MAX_SIGNED_URLS = 10_000
KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9/_.-]{0,254}$")
_NUMBER = re.compile(r"[0-9]{1,20}")  # ASCII digits only: str.isdigit would pass '²' to int()


def content_key(data: bytes, prefix: str, extension: str) -> str:
    """`prefix/ab/abcdef....ext`: the same bytes always get the same key."""
    digest = hashlib.sha256(data).hexdigest()
    return f"{prefix}/{digest[:2]}/{digest}.{extension}"


def check_key(key: str, field: str = "key") -> str:
    if not KEY_PATTERN.match(key) or ".." in key:
        raise InvalidArgument.one(field, "not a valid object key")
    return key


class ObjectStore(Protocol):
    async def put(self, key: str, data: bytes, content_type: str) -> None: ...
    async def get(self, key: str) -> bytes: ...
    async def exists(self, key: str) -> bool: ...
    async def size(self, key: str) -> int:
        """The object's length in bytes; NotFound when there is none."""
        ...

    async def delete(self, key: str) -> None:
        """Removes the object; one that is not there is not an error."""
        ...

    def download_url(self, key: str) -> str: ...


class LocalStore:
    """Objects as files under `root`; URLs point at the gateway's /files route."""

    def __init__(self, root: Path, signing_key: bytes, base_url: str, ttl_seconds: int) -> None:
        self.root = root
        self._signing_key = signing_key
        self._base_url = base_url.rstrip("/")
        self._ttl = ttl_seconds
        self._urls: dict[tuple[str, str], str] = {}
        self._urls_expire = 0
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(self._write, self._path(key), data)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: a reader never sees half an object

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFound(f"object {key} not found") from None

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    async def size(self, key: str) -> int:
        path = self._path(key)
        try:
            return (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError:
            raise NotFound(f"object {key} not found") from None

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    def signature(
        self,
        method: str,
        key: str,
        expires: int,
        content_type: str | None = None,
        max_bytes: int | None = None,
    ) -> str:
        """HMAC of what a URL allows: the method, key and expiry, and for a bound PUT the
        content type and byte limit too, so that none of them can be changed."""
        parts = [method, key, str(expires)]
        if content_type is not None or max_bytes is not None:
            parts += [content_type or "", str(max_bytes or 0)]
        if any("\n" in part for part in parts):
            raise ValueError("a signed URL's parts cannot hold a line break")
        message = "\n".join(parts).encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    def _signed(self, method: str, key: str) -> str:
        """A URL valid for the TTL plus up to URL_STEP_SECONDS: the expiry is rounded up to a
        step, so a URL is signed once per step and stays the same (browser-cacheable) within it."""
        now = int(time.time())
        expires = (now // URL_STEP_SECONDS + 1) * URL_STEP_SECONDS + self._ttl
        if expires != self._urls_expire:
            self._urls.clear()
            self._urls_expire = expires
        url = self._urls.get((method, key))
        if url is None:
            signature = self.signature(method, key, expires)
            url = f"{self._base_url}/files/{check_key(key)}?expires={expires}&signature={signature}"
            if len(self._urls) < _MAX_SIGNED_URLS:
                self._urls[(method, key)] = url
        return url

    def download_url(self, key: str) -> str:
        return self._signed("GET", key)

    def put_url(self, key: str, content_type: str, max_bytes: int, expires: int) -> str:
        """A URL for one PUT of at most `max_bytes` bytes of `content_type` to `key` before
        `expires` (unix seconds); the gateway's PUT route checks it with `verify_put`."""
        query = urlencode(
            {
                "expires": expires,
                "ct": content_type,
                "max": max_bytes,
                "signature": self.signature("PUT", key, expires, content_type, max_bytes),
            }
        )
        return f"{self._base_url}/files/{check_key(key)}?{query}"

    def verify(self, method: str, key: str, expires: str, signature: str) -> bool:
        """True when a URL's signature is right and it has not expired. Only reads: a PUT URL
        is bound to a content type and a size, and is checked with `verify_put`."""
        if method == "PUT" or not self._fresh(expires) or not signature.isascii():
            return False
        return hmac.compare_digest(self.signature(method, key, int(expires)), signature)

    def verify_put(
        self, key: str, expires: str, content_type: str, max_bytes: str, signature: str
    ) -> bool:
        """True when a PUT URL's signature covers this key, expiry, content type and limit, and
        it has not expired."""
        well_formed = _NUMBER.fullmatch(max_bytes) and signature.isascii()
        if not well_formed or "\n" in content_type or not self._fresh(expires):
            return False
        expected = self.signature("PUT", key, int(expires), content_type, int(max_bytes))
        return hmac.compare_digest(expected, signature)

    @staticmethod
    def _fresh(expires: str) -> bool:
        return _NUMBER.fullmatch(expires) is not None and int(expires) >= time.time()


class S3Store:
    """MinIO/S3 through `minio` (a blocking client, so calls run in a thread)."""

    def __init__(self, settings: CommonSettings) -> None:
        from minio import Minio

        self._client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
        self._bucket = settings.s3_bucket
        self._ttl = timedelta(seconds=settings.url_ttl_seconds)
        scheme = "https" if settings.s3_secure else "http"
        self._bucket_url = f"{scheme}://{settings.s3_endpoint}/{self._bucket}"
        if not self._client.bucket_exists(self._bucket):
            self._client.make_bucket(self._bucket)

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(
            self._client.put_object,
            self._bucket,
            check_key(key),
            io.BytesIO(data),
            len(data),
            content_type=content_type,
        )

    async def get(self, key: str) -> bytes:
        from minio.error import S3Error

        def read() -> bytes:
            response = self._client.get_object(self._bucket, check_key(key))
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        try:
            return await asyncio.to_thread(read)
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(f"object {key} not found") from None
            raise

    async def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            await asyncio.to_thread(self._client.stat_object, self._bucket, check_key(key))
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise
        return True

    async def size(self, key: str) -> int:
        from minio.error import S3Error

        try:
            stat = await asyncio.to_thread(self._client.stat_object, self._bucket, check_key(key))
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                raise NotFound(f"object {key} not found") from None
            raise
        return int(stat.size or 0)

    async def delete(self, key: str) -> None:
        from minio.error import S3Error

        try:
            await asyncio.to_thread(self._client.remove_object, self._bucket, check_key(key))
        except S3Error as error:
            if error.code not in ("NoSuchKey", "NoSuchObject", "NotFound"):
                raise

    def download_url(self, key: str) -> str:
        url: str = self._client.presigned_get_object(self._bucket, check_key(key), self._ttl)
        return url

    def presigned_post(
        self, key: str, content_type: str, max_bytes: int, expires: int | None = None
    ) -> tuple[str, dict[str, str]]:
        """The URL and form fields of a browser-style POST upload to `key` that the store itself
        holds to this key, this Content-Type and 1..`max_bytes` bytes, until `expires` (unix
        seconds; default the URL lifetime). The client sends the fields, then the file."""
        from minio.datatypes import PostPolicy

        if expires is None:
            expiration = datetime.now(UTC) + self._ttl
        else:
            expiration = datetime.fromtimestamp(expires, UTC)
        policy = PostPolicy(self._bucket, expiration)
        policy.add_equals_condition("key", check_key(key))
        policy.add_equals_condition("Content-Type", content_type)
        policy.add_content_length_range_condition(1, max_bytes)
        signed: dict[str, str] = self._client.presigned_post_policy(policy)
        return self._bucket_url, {"key": key, "Content-Type": content_type, **signed}


def open_store(settings: CommonSettings) -> LocalStore | S3Store:
    if settings.s3_endpoint:
        return S3Store(settings)
    return LocalStore(
        settings.objects_root(),
        settings.signing_key(),
        settings.public_base_url,
        settings.url_ttl_seconds,
    )
