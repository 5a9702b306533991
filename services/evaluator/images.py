"""Image files in, decoded RGB images out: checked and decoded once (services.common.images, the
same check as uploads), named by their SHA-256."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from PIL import Image

from services.common.images import decode_image


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


def decode(data: bytes, field: str) -> DecodedImage:
    """The file's RGB pixels, named by the file's SHA-256 (services.common.images checks it).
    CPU-bound: run it in a thread."""
    return DecodedImage(hashlib.sha256(data).hexdigest(), decode_image(data, field))
