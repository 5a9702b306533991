"""Object storage: content-addressed keys, two backends behind one interface.

`LocalStore` keeps objects in a folder and hands out HMAC-signed expiring URLs that the gateway
serves; `S3Store` uses MinIO/S3 through `minio` with presigned URLs. `open_store` picks one from
the settings, so nothing else knows which is in use.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import os
import re
import time
from pathlib import Path
from typing import Protocol

from services.common.errors import InvalidArgument, NotFound
from services.common.settings import CommonSettings

URL_STEP_SECONDS = 60
_MAX_SIGNED_URLS = 10_000
KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9/_.-]{0,254}$")


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
    def download_url(self, key: str) -> str: ...
    def upload_url(self, key: str) -> str: ...


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

    def signature(self, method: str, key: str, expires: int) -> str:
        message = f"{method}\n{key}\n{expires}".encode()
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

    def upload_url(self, key: str) -> str:
        return self._signed("PUT", key)

    def verify(self, method: str, key: str, expires: str, signature: str) -> bool:
        """True when a URL's signature is right and it has not expired."""
        if not expires.isdigit() or int(expires) < time.time():
            return False
        return hmac.compare_digest(self.signature(method, key, int(expires)), signature)


class S3Store:
    """MinIO/S3 through `minio` (a blocking client, so calls run in a thread)."""

    def __init__(self, settings: CommonSettings) -> None:
        from datetime import timedelta

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

    def download_url(self, key: str) -> str:
        url: str = self._client.presigned_get_object(self._bucket, check_key(key), self._ttl)
        return url

    def upload_url(self, key: str) -> str:
        url: str = self._client.presigned_put_object(self._bucket, check_key(key), self._ttl)
        return url


def open_store(settings: CommonSettings) -> LocalStore | S3Store:
    if settings.s3_endpoint:
        return S3Store(settings)
    return LocalStore(
        settings.objects_root(),
        settings.signing_key(),
        settings.public_base_url,
        settings.url_ttl_seconds,
    )
