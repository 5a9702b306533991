"""Prices, in cents, by the formula the replaced system charged.

Per variant 3 x megapixels (width x height / 1024^2); ControlNet +1; each guidance image +0.5;
the model's multiplier (1.5 for HD/v2 models); rounded up, at least 1. A cache hit costs 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.common.models import ModelSpec
from services.common.spec import Spec

CENTS_PER_MEGAPIXEL = 3.0
CONTROLNET_CENTS = 1.0
GUIDANCE_IMAGE_CENTS = 0.5
MINIMUM_CENTS = 1


@dataclass(frozen=True)
class Cost:
    base_cents: float
    controlnet_cents: float
    guidance_cents: float
    model_multiplier: float
    total_cents: int


def estimate(spec: Spec, model: ModelSpec) -> Cost:
    """The price of a resolved spec."""
    megapixels = spec.width * spec.height / 1024**2
    base = CENTS_PER_MEGAPIXEL * megapixels * spec.num_variants
    controlnet = CONTROLNET_CENTS if spec.controlnet is not None else 0.0
    guidance = GUIDANCE_IMAGE_CENTS * len(spec.guidance_images)
    raw = (base + controlnet + guidance) * model.price_multiplier
    # Round away float noise before ceil, so 3.0000000001 is 3, not 4.
    total = max(MINIMUM_CENTS, math.ceil(round(raw, 9)))
    return Cost(base, controlnet, guidance, model.price_multiplier, total)
