"""Image files in, decoded RGB images out: checked once, decoded once, named by their SHA-256.

Only PNG, JPEG and WebP are read (magic bytes first, then Pillow restricted to that format), at
most MAX_IMAGE_BYTES bytes and MAX_IMAGE_SIDE x MAX_IMAGE_SIDE pixels, the size checked before
the pixels are decoded, as the gateway checks uploads (services/gateway/uploads.py): a
decompression bomb is refused from its header. A bad file is an InvalidArgument naming the
request field it came in.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image

from services.common.errors import InvalidArgument

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """An image's pixels (RGB) and the SHA-256 that identifies them (of the file, or of the
    pixels when there was no file)."""

    digest: str
    image: Image.Image

    @classmethod
    def of(cls, image: Image.Image) -> DecodedImage:
        """An image already in memory, named by its size and pixels."""
        rgb = image.convert("RGB")
        digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes())
        return cls("pixels:" + digest.hexdigest(), rgb)


def sniff(data: bytes) -> str | None:
    """The image kind the magic bytes announce (an extension), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def decode_image(data: bytes, field: str) -> DecodedImage:
    """The RGB pixels of an image file; InvalidArgument naming `field` unless it is a whole PNG,
    JPEG or WebP image within the limits. CPU-bound: run it in a thread."""
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidArgument.one(field, f"at most {MAX_IMAGE_BYTES} bytes")
    kind = sniff(data)
    if kind is None:
        raise InvalidArgument.one(field, "not an image (PNG, JPEG or WebP)")
    try:
        with Image.open(io.BytesIO(data), formats=[_FORMATS[kind]]) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS or max(width, height) > MAX_IMAGE_SIDE:
                raise InvalidArgument.one(
                    field, f"{width}x{height} is over {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels"
                )
            rgb = image.convert("RGB")  # decodes every pixel: a truncated file fails here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own, larger limit (a warning, or an error past twice it): refused the same.
        raise InvalidArgument.one(field, f"over {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels") from None
    except InvalidArgument:
        raise
    except Exception:  # noqa: BLE001 - Pillow raises many kinds of error on corrupt input
        raise InvalidArgument.one(field, f"not a decodable {kind} image") from None
    return DecodedImage(hashlib.sha256(data).hexdigest(), rgb)
