"""Presigned uploads of guidance images: the client names the content's SHA-256, gets a
content-addressed key and an expiring URL, and PUTs the bytes straight to the object store.

Nothing is trusted until it is checked: an upload must be the bytes its key names (SHA-256), an
image of the kind its key names, within the limits of services/common/images.py (magic bytes,
the size from the header, then a full decode by Pillow). The gateway's own PUT route checks
before it stores; S3 presigned PUTs bypass the gateway, so admission checks the stored object
with `verify_stored_upload`.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

from services.common.errors import FieldViolation, InvalidArgument, NotFound
from services.common.images import MAX_IMAGE_BYTES, decode_image
from services.common.objectstore import ObjectStore

CONTENT_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
MAX_UPLOAD_BYTES = MAX_IMAGE_BYTES
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UPLOAD_KEY = re.compile(r"uploads/([0-9a-f]{2})/([0-9a-f]{64})\.(png|jpg|webp)")
_VERIFIED_KEYS = 4096


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


def _parse_key(key: str, field: str) -> tuple[str, str]:
    """(SHA-256, extension) of an upload key, as `upload_key` writes it."""
    match = _UPLOAD_KEY.fullmatch(key)
    if match is None or match[1] != match[2][:2]:
        raise InvalidArgument.one(field, "not an upload key from /api/uploads/presign")
    return match[2], match[3]


def check_upload(key: str, data: bytes, content_type: str = "") -> None:
    """An upload must be what its content-addressed key says it is: those bytes, that kind of
    image. `content_type`, when the client declared one, must name the same kind."""
    digest, extension = _parse_key(key, "key")
    declared = content_type.split(";", 1)[0].strip().lower()
    if declared and CONTENT_TYPES.get(declared) != extension:
        raise InvalidArgument.one("Content-Type", f"the key is a .{extension} upload")
    if len(data) > MAX_UPLOAD_BYTES:
        raise InvalidArgument.one("body", f"at most {MAX_UPLOAD_BYTES} bytes")
    if hashlib.sha256(data).hexdigest() != digest:
        raise InvalidArgument.one("body", "the content does not match the key's SHA-256")
    decode_image(data, "body", extension)


# Keys already verified in this process. Keys are content-addressed (the content must hash to
# the key), so a key verified once stays verified.
_verified: OrderedDict[str, None] = OrderedDict()


async def verify_stored_upload(objects: ObjectStore, key: str, field: str) -> None:
    """Raises InvalidArgument naming `field` unless the object stored at `key` is a valid
    upload: there, its bytes matching the key's SHA-256, an allowed image within the limits."""
    if key in _verified:
        _verified.move_to_end(key)
        return
    digest, extension = _parse_key(key, field)
    try:
        data = await objects.get(key)
    except NotFound:
        raise InvalidArgument.one(field, "no such upload") from None
    if len(data) > MAX_UPLOAD_BYTES:
        raise InvalidArgument.one(field, f"the upload is over {MAX_UPLOAD_BYTES} bytes")
    if hashlib.sha256(data).hexdigest() != digest:
        raise InvalidArgument.one(field, "the upload does not match the key's SHA-256")
    await asyncio.to_thread(decode_image, data, field, extension)
    _verified[key] = None
    if len(_verified) > _VERIFIED_KEYS:
        _verified.popitem(last=False)
