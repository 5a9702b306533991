"""What a request asks for, checked and resolved, and the cache keys derived from it.

`Spec` is the plain domain form of a generation request, shared by the gRPC API, the HTTP facade,
the cache and the generator. `resolve` checks every field (collecting every violation, named by
its HTTP/JSON field name) and fills in the model's defaults and a seed, so that a resolved spec
says everything that decides the pixels.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass, replace
from typing import Any

from services.common.errors import FieldViolation, InvalidArgument
from services.common.models import ModelSpec, Registry
from services.common.objectstore import KEY_PATTERN

# Bumped whenever a change alters the bytes produced for the same request.
ENGINE_VERSION = "1"

MAX_PROMPT_CHARS = 2000
MAX_GUIDANCE_IMAGES = 5
MAX_SEED = 2**53 - 1  # exact in JSON numbers and JavaScript
GUIDANCE_ROLES = ("reference", "style", "texture")
CONTROLNET_NAMES = ("canny", "depth", "recoloring", "color_grid")


@dataclass(frozen=True)
class GuidanceImage:
    key: str
    role: str


@dataclass(frozen=True)
class ControlNet:
    name: str
    weight: float
    mask_key: str = ""


@dataclass(frozen=True)
class Spec:
    prompt: str = ""
    fibo_json: dict[str, Any] | None = None
    negative_prompt: str = ""
    model: str = ""
    seed: int | None = None
    width: int = 0
    height: int = 0
    num_variants: int = 0
    steps: int = 0
    guidance_scale: float | None = None
    guidance_images: tuple[GuidanceImage, ...] = ()
    controlnet: ControlNet | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Spec:
        controlnet = data.get("controlnet")
        return cls(
            **{k: v for k, v in data.items() if k not in ("guidance_images", "controlnet")},
            guidance_images=tuple(GuidanceImage(**g) for g in data.get("guidance_images", ())),
            controlnet=ControlNet(**controlnet) if controlnet else None,
        )

    def text_prompt(self) -> str:
        """The text a text-conditioned pipeline and CLIP see (a FIBO prompt as canonical JSON)."""
        if self.fibo_json is not None:
            return json.dumps(canonical_fibo(self.fibo_json), sort_keys=True)
        return self.prompt

    def reference_key(self) -> str:
        return next((g.key for g in self.guidance_images if g.role == "reference"), "")


def normalize_prompt(text: str) -> str:
    """Lowercase, trimmed, whitespace collapsed."""
    return re.sub(r"\s+", " ", text).strip().lower()


def canonical_fibo(value: Any) -> Any:
    """Keys sorted and nulls dropped, recursively (sorting is done by the JSON encoder); whole
    numbers as integers, since a protobuf Struct turns every number into a double."""
    if isinstance(value, dict):
        return {k: canonical_fibo(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [canonical_fibo(v) for v in value if v is not None]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def cache_keys(spec: Spec, model: ModelSpec) -> tuple[str, str]:
    """(seed-aware key, seed-agnostic key) of a resolved spec: SHA-256 over everything that
    changes the pixels, the engine and model versions included."""
    material: dict[str, Any] = {
        "engine": ENGINE_VERSION,
        "model": model.id,
        "model_version": model.version,
        "prompt": normalize_prompt(spec.prompt),
        "fibo": canonical_fibo(spec.fibo_json) if spec.fibo_json is not None else None,
        "negative": normalize_prompt(spec.negative_prompt),
        "size": [spec.width, spec.height],
        "steps": spec.steps,
        "guidance": spec.guidance_scale,
        "variants": spec.num_variants,
        "guidance_images": [asdict(g) for g in spec.guidance_images],
        "controlnet": asdict(spec.controlnet) if spec.controlnet else None,
    }

    def digest(extra: dict[str, Any]) -> str:
        blob = json.dumps({**material, **extra}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    return digest({"seed": spec.seed}), digest({})


def resolve(spec: Spec, registry: Registry, *, require_seed: bool = False) -> Spec:
    """Checks `spec` and fills in defaults and a seed; raises InvalidArgument naming every bad
    field. `require_seed` is for callers that must not get a random seed chosen for them."""
    bad: list[FieldViolation] = []

    def check(ok: bool, field: str, description: str) -> None:
        if not ok:
            bad.append(FieldViolation(field, description))

    has_text = bool(spec.prompt.strip())
    check(
        has_text != (spec.fibo_json is not None),
        "prompt",
        "give exactly one of prompt or fibo_json" if has_text else "must not be empty",
    )
    check(len(spec.prompt) <= MAX_PROMPT_CHARS, "prompt", f"at most {MAX_PROMPT_CHARS} chars")
    if spec.fibo_json is not None:
        check(bool(canonical_fibo(spec.fibo_json)), "fibo_json", "must be a non-empty object")
    check(len(spec.negative_prompt) <= MAX_PROMPT_CHARS, "negative_prompt", "too long")
    try:
        model = registry.get(spec.model)
    except InvalidArgument as error:
        raise InvalidArgument(error.violations + bad) from None

    width = spec.width or model.default_width
    height = spec.height or model.default_height
    for field, size in (("width", width), ("height", height)):
        check(
            model.min_size <= size <= model.max_size,
            field,
            f"must be between {model.min_size} and {model.max_size}",
        )
        check(
            size % model.size_multiple == 0, field, f"must be a multiple of {model.size_multiple}"
        )
    variants = spec.num_variants or 1
    check(1 <= variants <= model.max_variants, "num_variants", f"must be 1..{model.max_variants}")
    steps = spec.steps or model.default_steps
    check(1 <= steps <= model.max_steps, "steps", f"must be 1..{model.max_steps}")
    # Rounded here, for every caller: gRPC carries floats, JSON doubles; both must key alike.
    guidance = round(
        model.default_guidance if spec.guidance_scale is None else spec.guidance_scale, 4
    )
    check(0.0 <= guidance <= 30.0, "guidance_scale", "must be between 0 and 30")
    if spec.seed is None:
        check(not require_seed, "seed", "must be set")
        seed = secrets.randbelow(2**31)
    else:
        seed = spec.seed
        check(0 <= seed <= MAX_SEED - variants, "seed", f"must be 0..{MAX_SEED - variants}")
    check(
        len(spec.guidance_images) <= MAX_GUIDANCE_IMAGES,
        "guidance_images",
        f"at most {MAX_GUIDANCE_IMAGES}",
    )
    for i, image in enumerate(spec.guidance_images):
        check(
            bool(KEY_PATTERN.match(image.key)),
            f"guidance_images[{i}].key",
            "not a valid upload key",
        )
        check(
            image.role in GUIDANCE_ROLES, f"guidance_images[{i}].role", f"one of {GUIDANCE_ROLES}"
        )
    if spec.controlnet is not None:
        name, weight = spec.controlnet.name, round(spec.controlnet.weight, 4)
        check(name in CONTROLNET_NAMES, "controlnet.name", f"one of {CONTROLNET_NAMES}")
        check(
            name not in CONTROLNET_NAMES or name in model.controlnets,
            "controlnet.name",
            f"model {model.id} has no {name} ControlNet",
        )
        check(0.0 <= weight <= 1.0, "controlnet.weight", "must be between 0 and 1")
    if bad:
        raise InvalidArgument(bad)
    controlnet = spec.controlnet and replace(
        spec.controlnet, weight=round(spec.controlnet.weight, 4)
    )
    return replace(
        spec,
        controlnet=controlnet,
        model=model.id,
        width=width,
        height=height,
        num_variants=variants,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
    )
