"""Image files from clients (uploads, images sent to the evaluator): PNG, JPEG or WebP only, at
most MAX_IMAGE_BYTES bytes and MAX_IMAGE_SIDE x MAX_IMAGE_SIDE pixels. The kind is read from the
magic bytes and Pillow is held to it; the size is checked from the header, before a pixel is
decoded, so a decompression bomb is refused unread. A bad file is an InvalidArgument naming the
request field it came in.
"""

from __future__ import annotations

import io

from PIL import Image

from services.common.errors import InvalidArgument

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
_PILLOW_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def sniff(data: bytes) -> str | None:
    """The image kind the magic bytes announce (an extension: png, jpg, webp), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def decode_image(data: bytes, field: str, kind: str | None = None) -> Image.Image:
    """The RGB pixels of an image file, decoded in full (a truncated file fails); InvalidArgument
    naming `field` unless it is a PNG, JPEG or WebP image within the limits, and of `kind` (an
    extension) when one is given. CPU-bound: run it in a thread."""
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidArgument.one(field, f"at most {MAX_IMAGE_BYTES} bytes")
    found = sniff(data)
    if found is None:
        raise InvalidArgument.one(field, "not a PNG, JPEG or WebP image")
    if kind is not None and found != kind:
        raise InvalidArgument.one(field, f"a {found} image, but its key says {kind}")
    try:
        with Image.open(io.BytesIO(data), formats=[_PILLOW_FORMAT[found]]) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS or max(width, height) > MAX_IMAGE_SIDE:
                raise InvalidArgument.one(
                    field, f"{width}x{height} is over {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels"
                )
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own, larger limit (a warning, or an error past twice it): refused the same.
        raise InvalidArgument.one(field, f"over {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels") from None
    except InvalidArgument:
        raise
    except Exception:  # noqa: BLE001 - Pillow raises many kinds of error on corrupt input
        raise InvalidArgument.one(field, f"not a decodable {found} image") from None
