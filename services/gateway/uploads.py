"""Presigned uploads of guidance images, bound to what was asked: the tenant, the content type
and the size.

A tenant names the content's SHA-256, type and size and gets a key of its own
(`uploads/<tenant>/<sha[:2]>/<sha>.<ext>`), an `uploads` row recording the grant, and a way to
send the bytes that cannot be stretched to other bytes:
- the local folder store: a PUT to the gateway's own route, whose signature covers the key,
  expiry, content type and byte limit; `receive_put` refuses before anything is stored;
- S3/MinIO: a presigned POST policy that the store itself holds to the key, content type and
  1..size bytes.

Nothing is trusted until it is checked: an upload must be the bytes its key names (SHA-256), an
image of the kind its key names, within the limits of services/common/images.py (magic bytes,
the size from the header, then a full decode by Pillow). A job that names an upload is admitted
only after `verify`, which checks the stored object again against the tenant's row. Another
tenant's key is refused exactly as one that does not exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import asyncpg

from services.common.errors import (
    FieldViolation,
    Forbidden,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
)
from services.common.images import MAX_IMAGE_BYTES, decode_image
from services.common.objectstore import LocalStore, ObjectStore, S3Store
from services.tenants.keys import check_tenant_name

CONTENT_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
MAX_UPLOAD_BYTES = MAX_IMAGE_BYTES
NO_SUCH_UPLOAD = "no such upload"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_EXPIRY = re.compile(r"[0-9]{1,20}")
_UPLOAD_KEY = re.compile(
    r"uploads/([a-z0-9][a-z0-9_-]{0,62})/([0-9a-f]{2})/([0-9a-f]{64})\.(png|jpg|webp)"
)
_VERIFIED_KEYS = 4096


@dataclass(frozen=True)
class Upload:
    """How to send one upload: `method` "PUT" (the gateway's checked PUT, with `headers`) or
    "POST" (an S3 POST policy: `fields` first, then the file, as multipart/form-data)."""

    key: str
    method: Literal["PUT", "POST"]
    upload_url: str
    headers: dict[str, str]
    fields: dict[str, str]
    content_type: str
    max_bytes: int
    expires_at: int  # unix seconds


@dataclass(frozen=True)
class UploadKey:
    """What an upload key says: whose it is, the content's SHA-256 and the image kind."""

    tenant: str
    sha256: str
    extension: str


def upload_key(tenant: str, sha256: str, content_type: str) -> str:
    return f"uploads/{tenant}/{sha256[:2]}/{sha256}.{CONTENT_TYPES[content_type]}"


def parse_upload_key(key: str, field: str = "key") -> UploadKey:
    """The parts of an upload key, as `upload_key` writes it; InvalidArgument naming `field`."""
    parsed = _parsed(key)
    if parsed is None:
        raise InvalidArgument.one(field, "not an upload key from /api/uploads/presign")
    return parsed


def upload_tenant(key: str) -> str | None:
    """The tenant an upload key belongs to; None for any other key."""
    parsed = _parsed(key)
    return None if parsed is None else parsed.tenant


def _parsed(key: str) -> UploadKey | None:
    match = _UPLOAD_KEY.fullmatch(key)
    if match is None or match[2] != match[3][:2]:
        return None
    return UploadKey(match[1], match[3], match[4])


def check_upload(key: str, data: bytes, content_type: str = "") -> None:
    """An upload must be what its content-addressed key says it is: those bytes, that kind of
    image. `content_type`, when the client declared one, must name the same kind."""
    parsed = parse_upload_key(key)
    declared = _media_type(content_type)
    if declared and CONTENT_TYPES.get(declared) != parsed.extension:
        raise InvalidArgument.one("Content-Type", f"the key is a .{parsed.extension} upload")
    if len(data) > MAX_UPLOAD_BYTES:
        raise InvalidArgument.one("body", f"at most {MAX_UPLOAD_BYTES} bytes")
    if hashlib.sha256(data).hexdigest() != parsed.sha256:
        raise InvalidArgument.one("body", "the content does not match the key's SHA-256")
    decode_image(data, "body", parsed.extension)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


@dataclass(frozen=True)
class _Grant:
    """An `uploads` row: what one tenant was allowed to upload to a key."""

    content_type: str
    max_bytes: int
    created_at: datetime


class Uploads:
    def __init__(self, objects: ObjectStore, pool: asyncpg.Pool, ttl_seconds: int) -> None:
        self._objects = objects
        self._pool = pool
        self._ttl = ttl_seconds
        # Grants whose object was checked in this process, by (tenant, key, grant): the bytes
        # are content-addressed, so a checked object stays good for as long as its grant.
        self._verified: OrderedDict[tuple[str, str, _Grant], None] = OrderedDict()

    async def presign(self, tenant: str, content_type: str, sha256: str, size_bytes: int) -> Upload:
        """Records the grant (a new one replaces the tenant's earlier grant of the key) and
        returns how to send the bytes."""
        check_tenant_name(tenant)
        bad = []
        if content_type not in CONTENT_TYPES:
            bad.append(FieldViolation("content_type", f"one of {sorted(CONTENT_TYPES)}"))
        if not _SHA256.match(sha256):
            bad.append(FieldViolation("sha256", "64 lowercase hex digits of the content's SHA-256"))
        if not 0 < size_bytes <= MAX_UPLOAD_BYTES:
            bad.append(FieldViolation("size_bytes", f"must be 1..{MAX_UPLOAD_BYTES}"))
        if bad:
            raise InvalidArgument(bad)
        key = upload_key(tenant, sha256, content_type)
        expires_at = int(time.time()) + self._ttl
        await self._pool.execute(
            "INSERT INTO uploads (key, tenant, content_type, max_bytes, sha256, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT (key) DO UPDATE SET content_type = EXCLUDED.content_type,"
            " max_bytes = EXCLUDED.max_bytes, sha256 = EXCLUDED.sha256, created_at = now(),"
            " expires_at = EXCLUDED.expires_at",
            key,
            tenant,
            content_type,
            size_bytes,
            sha256,
            datetime.fromtimestamp(expires_at, UTC),
        )
        if isinstance(self._objects, LocalStore):
            url = self._objects.put_url(key, content_type, size_bytes, expires_at)
            headers = {"Content-Type": content_type}
            return Upload(key, "PUT", url, headers, {}, content_type, size_bytes, expires_at)
        if isinstance(self._objects, S3Store):
            url, fields = self._objects.presigned_post(key, content_type, size_bytes, expires_at)
            return Upload(key, "POST", url, {}, fields, content_type, size_bytes, expires_at)
        raise TypeError(f"no upload method for {type(self._objects).__name__}")

    async def receive_put(
        self,
        key: str,
        params: Mapping[str, str],
        content_type: str,
        read_body: Callable[[int], Awaitable[bytes]],
    ) -> None:
        """The local store's PUT route: checks the URL's signed parameters (`expires`, `ct`,
        `max`, `signature`; Forbidden when they were changed or ran out), the Content-Type
        (InvalidArgument), reads at most `max` bytes with `read_body` (which raises
        PayloadTooLarge past its limit), checks the content, and only then stores it."""
        store = self._objects
        if not isinstance(store, LocalStore):
            raise Forbidden("uploads go to the object store, not through the gateway")
        expires, bound_type = params.get("expires", ""), params.get("ct", "")
        max_text, signature = params.get("max", ""), params.get("signature", "")
        if not store.verify_put(key, expires, bound_type, max_text, signature):
            if _EXPIRY.fullmatch(expires) and int(expires) < time.time():
                raise Forbidden("expires: the upload URL has expired; ask for another")
            raise Forbidden("signature: the upload URL is not one the gateway signed")
        parse_upload_key(key)
        if _media_type(content_type) != bound_type:
            raise InvalidArgument.one("Content-Type", f"this upload URL is for {bound_type}")
        max_bytes = int(max_text)
        data = await read_body(max_bytes)
        if len(data) > max_bytes:
            raise PayloadTooLarge("body", max_bytes)
        await asyncio.to_thread(check_upload, key, data, bound_type)
        await store.put(key, data, bound_type)

    async def verify(self, key: str, field: str, tenant: str) -> None:
        """Raises InvalidArgument naming `field` unless `key` is an upload `tenant` was granted
        and the object stored there is within the grant's size, an image of its type, and the
        bytes its key names."""
        parsed = parse_upload_key(key, field)
        if parsed.tenant != tenant:
            raise InvalidArgument.one(field, NO_SUCH_UPLOAD)
        row = await self._pool.fetchrow(
            "SELECT content_type, max_bytes, created_at FROM uploads"
            " WHERE key = $1 AND tenant = $2",
            key,
            tenant,
        )
        if row is None:
            raise InvalidArgument.one(field, NO_SUCH_UPLOAD)
        grant = _Grant(row["content_type"], row["max_bytes"], row["created_at"])
        cached = (tenant, key, grant)
        if cached in self._verified:
            self._verified.move_to_end(cached)
            return
        await self._check_object(key, parsed, grant, field)
        self._verified[cached] = None
        if len(self._verified) > _VERIFIED_KEYS:
            self._verified.popitem(last=False)

    async def _check_object(self, key: str, parsed: UploadKey, grant: _Grant, field: str) -> None:
        if CONTENT_TYPES.get(grant.content_type) != parsed.extension:
            raise InvalidArgument.one(field, f"the upload was granted as {grant.content_type}")
        limit = min(grant.max_bytes, MAX_UPLOAD_BYTES)
        try:
            # The size first: an object a store let through oversized is never read.
            if await self._objects.size(key) > limit:
                raise InvalidArgument.one(field, f"the upload is over its {limit} bytes")
            data = await self._objects.get(key)
        except NotFound:
            raise InvalidArgument.one(field, "nothing has been uploaded to this key yet") from None
        if len(data) > limit:
            raise InvalidArgument.one(field, f"the upload is over its {limit} bytes")
        if hashlib.sha256(data).hexdigest() != parsed.sha256:
            raise InvalidArgument.one(field, "the upload does not match the key's SHA-256")
        await asyncio.to_thread(decode_image, data, field, parsed.extension)
