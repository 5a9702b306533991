"""Presigned uploads of guidance images: the client names the content's SHA-256, gets a
content-addressed key and an expiring URL, and PUTs the bytes straight to the object store."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

from services.common.errors import FieldViolation, InvalidArgument
from services.common.objectstore import ObjectStore

CONTENT_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Upload:
    key: str
    upload_url: str
    content_type: str
    expires_at: int


def upload_key(sha256: str, content_type: str) -> str:
    return f"uploads/{sha256[:2]}/{sha256}.{CONTENT_TYPES[content_type]}"


def presign(
    objects: ObjectStore, content_type: str, sha256: str, size_bytes: int, ttl_seconds: int
) -> Upload:
    bad = []
    if content_type not in CONTENT_TYPES:
        bad.append(FieldViolation("content_type", f"one of {sorted(CONTENT_TYPES)}"))
    if not _SHA256.match(sha256):
        bad.append(FieldViolation("sha256", "64 lowercase hex digits of the content's SHA-256"))
    if not 0 < size_bytes <= MAX_UPLOAD_BYTES:
        bad.append(FieldViolation("size_bytes", f"must be 1..{MAX_UPLOAD_BYTES}"))
    if bad:
        raise InvalidArgument(bad)
    key = upload_key(sha256, content_type)
    return Upload(key, objects.upload_url(key), content_type, int(time.time()) + ttl_seconds)


def check_upload(key: str, data: bytes) -> None:
    """An upload must be what its content-addressed key says it is."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise InvalidArgument.one("body", f"at most {MAX_UPLOAD_BYTES} bytes")
    digest = key.rsplit("/", 1)[-1].split(".", 1)[0]
    if hashlib.sha256(data).hexdigest() != digest:
        raise InvalidArgument.one("body", "the content does not match the key's SHA-256")
