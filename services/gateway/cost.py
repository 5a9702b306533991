"""Prices, in cents: the replaced system's formula, with the denoising part scaled by steps.

    base     = 3 x megapixels (width x height / 1024^2) x variants, at the model's default steps
    steps    = steps / the model's default steps (a 40-step job costs about twice a 20-step one)
    total    = (base x steps + ControlNet 1 + 0.5 per guidance image) x the model's multiplier
               (1.5 for HD/v2 models), rounded up, at least 1

ControlNet and guidance images are counted once per job, not per variant or step. A cache hit
costs 0 (the caller's business: this prices the rendering). Every estimate carries its breakdown.
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
    steps_factor: float
    controlnet_cents: float
    guidance_cents: float
    model_multiplier: float
    total_cents: int


def estimate(spec: Spec, model: ModelSpec) -> Cost:
    """The price of a resolved spec."""
    megapixels = spec.width * spec.height / 1024**2
    base = CENTS_PER_MEGAPIXEL * megapixels * spec.num_variants
    steps_factor = spec.steps / max(model.default_steps, 1)
    controlnet = CONTROLNET_CENTS if spec.controlnet is not None else 0.0
    guidance = GUIDANCE_IMAGE_CENTS * len(spec.guidance_images)
    raw = (base * steps_factor + controlnet + guidance) * model.price_multiplier
    # Round away float noise before ceil, so 3.0000000001 is 3, not 4.
    total = max(MINIMUM_CENTS, math.ceil(round(raw, 9)))
    return Cost(
        base_cents=base,
        steps_factor=steps_factor,
        controlnet_cents=controlnet,
        guidance_cents=guidance,
        model_multiplier=model.price_multiplier,
        total_cents=total,
    )
